"""dinotxt-fast: fused kernels and a state-dict-compatible DINO.txt model (DINOv2/DINOv3 + text tower).

    import dinotxt_fast as dtf
    model = dtf.create_model("dinov2_vitl14_reg4_dinotxt")
    model.load_official(backbone=..., vision_head=..., text_encoder=...)
    ids = dtf.tokenize(["a photo of a dog."])
"""
from . import evaluate, ops
from .inference import IMAGENET_TEMPLATES, ZeroShotClassifier, segment
from .models.config import PRESETS, DinoTxtConfig
from .models.dinotxt import DinoTxt, create_model
from .models.foreign import load_backbone
from .models.onnx_export import export_onnx
from .models.pretrained import from_pretrained
from .models.tokenizer import tokenize
from .nn import patch_model
from .ops import backends, use_backend
from .version import __version__

__all__ = [
    "__version__", "ops", "backends", "use_backend", "create_model", "DinoTxt", "DinoTxtConfig", "PRESETS", "tokenize",
    "ZeroShotClassifier", "IMAGENET_TEMPLATES", "segment",
    "patch_model", "from_pretrained", "load_backbone", "export_onnx", "evaluate",
]

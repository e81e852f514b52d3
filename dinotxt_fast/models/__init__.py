"""The DINO.txt model: backbones (DINOv2, DINOv3), vision head, text tower, tokenizer, presets, checkpoint I/O
(official release files, timm and Hugging Face transformers backbones, the model folder, ONNX export)."""
from .config import PRESETS, DinoTxtConfig, make_config
from .dinotxt import DinoTxt, create_model
from .foreign import load_backbone
from .pretrained import from_pretrained
from .tokenizer import tokenize

__all__ = ["PRESETS", "DinoTxtConfig", "make_config", "DinoTxt", "create_model", "from_pretrained", "load_backbone",
           "tokenize"]

"""ONNX export of a DinoTxt model, checked with onnxruntime (docs/design.md, "Public API").

    files = export_onnx(model, "onnx/")   # onnx/image_encoder.onnx, onnx/text_encoder.onnx (+ .data for big models)

- image_encoder.onnx: `images` float32 [B, 3, H, W] (ImageNet-normalised; B, H, W dynamic, H and W multiples of the
  patch size) -> `image_embedding` [B, embed_dim] (cat(head cls, mean head patch), unnormalised, as encode_image) and
  `patch_tokens` [B, (H/p)*(W/p), vision_dim] (the head's patch tokens after ln_final, row-major grid, as the second
  output of image_tokens).
- text_encoder.onnx: `ids` int64 [B, context_length] (dinotxt_fast.tokenize) -> `text_embedding` [B, embed_dim].

dinotxt-fast's fused kernels are torch.library custom ops, which the exporter cannot see into; the export traces the
model inside `models.layers.traceable()`, where attention is F.scaled_dot_product_attention and position tables are
computed in the graph, and the check compares onnxruntime's outputs with the PyTorch model's (its own kernels) at
the export size and at another one.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .dinotxt import DinoTxt
from .layers import traceable

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
OPSET = 18              # Resize with antialias (the DINOv2 position-embedding resize) needs opset 18
CHECK_RTOL = 1e-4       # max |onnx - torch| / max |torch| per output
MAX_GRID = 1024         # largest patch grid side the exported image graph accepts
_EXTERNAL_DATA_BYTES = 1 << 30  # protobuf files stop at 2 GiB: larger weights go to a .data file beside the model


class ImageEncoder(nn.Module):
    """images -> (embedding, head patch tokens): encode_image and image_tokens' head patches from one forward."""

    def __init__(self, model: DinoTxt) -> None:
        super().__init__()
        self.backbone, self.head = model.backbone, model.head
        self.first_patch = 1 + model.config.num_register_tokens

    def forward(self, images: torch.Tensor):
        tokens = self.head(self.backbone(images))
        patches = tokens[:, self.first_patch:]
        return torch.cat((tokens[:, 0], patches.mean(dim=1)), dim=-1), patches


class TextEncoder(nn.Module):
    def __init__(self, model: DinoTxt) -> None:
        super().__init__()
        self.text = model.text

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids)


def example_ids(model: DinoTxt, batch: int, seed: int = 0) -> torch.Tensor:
    """Token ids shaped like tokenize's: SOT, random tokens, EOT at different positions, zero padding."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    eot_id, sot_id = cfg.vocab_size - 1, cfg.vocab_size - 2
    ids = torch.zeros(batch, cfg.context_length, dtype=torch.int64)
    for row in range(batch):
        length = 2 + int(torch.randint(0, cfg.context_length - 1, (1,), generator=gen))
        ids[row, :length] = torch.randint(1, max(2, sot_id), (length,), generator=gen)
        ids[row, 0], ids[row, length - 1] = sot_id, eot_id
    return ids


def _onnx_export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes,
                 opset: int) -> None:
    # The exporter's notes on torchvision ops it skips come as log records, its deprecations as warnings: neither
    # concerns this model.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with traceable(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False)
    finally:
        registration.setLevel(level)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(os.fspath(path), external_data=size > _EXTERNAL_DATA_BYTES)


def export_onnx(model: DinoTxt, out_dir: Union[str, os.PathLike], *, image_size: Optional[int] = None,
                opset: int = OPSET, check: bool = True) -> dict:
    """Write `out_dir`/image_encoder.onnx and `out_dir`/text_encoder.onnx (module docstring) from a float32 model.

    `image_size` is the side of the example image traced (default 16 patches; the graph takes any multiple of the
    patch). With `check` (needs onnxruntime), both files are run on the CPU against the PyTorch model, also at a
    non-square size other than the example's, and a relative error above CHECK_RTOL raises. Returns
    {"image_encoder": path, "text_encoder": path, "max_relative_error": {...} (with check)}."""
    if not isinstance(model, DinoTxt):
        raise TypeError(f"export_onnx takes a DinoTxt model, got {type(model).__name__}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise TypeError(f"export_onnx needs a float32 model (onnxruntime's CPU kernels), this one holds "
                        f"{sorted(str(d) for d in dtypes)}: export model.float()")
    patch = model.config.patch_size
    image_size = image_size or 16 * patch
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    if check:
        _require_onnxruntime()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        from torch.export import Dim

        grid = {2: patch * Dim("grid_h", min=1, max=MAX_GRID), 3: patch * Dim("grid_w", min=1, max=MAX_GRID)}
        images = torch.randn(2, 3, image_size, image_size, device=device)
        _onnx_export(ImageEncoder(model), (images,), out / IMAGE_FILE, ["images"], ["image_embedding", "patch_tokens"],
                     ({0: Dim("batch", min=1), **grid},), opset)
        ids = example_ids(model, 2).to(device)
        _onnx_export(TextEncoder(model), (ids,), out / TEXT_FILE, ["ids"], ["text_embedding"],
                     ({0: Dim("batch", min=1)},), opset)
        files = {"image_encoder": out / IMAGE_FILE, "text_encoder": out / TEXT_FILE}
        if check:
            files["max_relative_error"] = check_onnx(model, out, image_size=image_size)
    finally:
        model.train(was_training)
    return files


def _require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("checking the ONNX export needs onnxruntime: pip install 'dinotxt-fast[onnx]' "
                          "(or pass check=False)") from exc
    return onnxruntime


def _relative_error(got, want: torch.Tensor) -> float:
    want = want.detach().float().cpu()
    return float((torch.as_tensor(got) - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check_onnx(model: DinoTxt, out_dir: Union[str, os.PathLike], *, image_size: Optional[int] = None,
               rtol: float = CHECK_RTOL) -> dict:
    """Run the exported files with onnxruntime on the CPU against `model` (its own kernels): images at
    `image_size` and at a non-square other size, a batch of texts. Returns the max relative errors; raises
    RuntimeError naming the output when one exceeds `rtol`."""
    ort = _require_onnxruntime()
    out, patch = Path(out_dir), model.config.patch_size
    image_size = image_size or 16 * patch
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    sizes = [(image_size, image_size), (image_size + 2 * patch, max(patch, image_size - 3 * patch))]
    errors = {}
    image_session = ort.InferenceSession(os.fspath(out / IMAGE_FILE), providers=["CPUExecutionProvider"])
    for h, w in sizes:
        images = torch.randn(3, 3, h, w, generator=gen)
        embedding, patches = image_session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            x = images.to(device)
            errors[f"image embedding {h}x{w}"] = _relative_error(embedding, model.encode_image(x))
            errors[f"image patch_tokens {h}x{w}"] = _relative_error(patches, model.image_tokens(x)[1])
    text_session = ort.InferenceSession(os.fspath(out / TEXT_FILE), providers=["CPUExecutionProvider"])
    ids = example_ids(model, 3, seed=1)
    (text,) = text_session.run(None, {"ids": ids.numpy()})
    with torch.no_grad():
        errors["text embedding"] = _relative_error(text, model.encode_text(ids.to(device)))
    bad = {name: err for name, err in errors.items() if not err <= rtol}
    if bad:
        raise RuntimeError(f"ONNX export in {os.fspath(out)!r} differs from the PyTorch model beyond the relative "
                           f"tolerance {rtol}: " + ", ".join(f"{k}: {v:.2e}" for k, v in bad.items()))
    return errors

"""Zero-shot classification: template-ensembled text classifiers (the CLIP recipe) on top of a DinoTxt model."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .templates import Template, format_prompt, resolve_templates

TemplatesArg = Union[None, str, Sequence[Template]]


@contextlib.contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no drop-path) and no autograd for the duration; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` on `device`'s type; no autocast for None or float32 (the model's own precision).
    The one switch between full and mixed precision for the CLI's commands and the trainer."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (what its inputs should be cast to)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_class_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a list of strings, got the single string {class_names!r}")
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty: give at least one class")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"class_names[{i}] must be a str, got {type(name).__name__}")
        if not name.strip():
            raise ValueError(f"class_names[{i}] is empty or whitespace")
    return names


def _progress(total: int, enabled: Optional[bool]):
    from tqdm.auto import tqdm

    # None: show the bar only for work of several chunks, and only on a terminal (tqdm's disable=None).
    disable = (not enabled) if enabled is not None else (True if total <= 1 else None)
    return tqdm(total=total, desc="encoding class prompts", unit="batch", disable=disable, leave=False)


def build_text_classifier(model: nn.Module, class_names: Sequence[str], templates: TemplatesArg = None, *,
                          batch_size: int = 256, progress: Optional[bool] = None) -> torch.Tensor:
    """Zero-shot weights [C, embed_dim] (float32, rows L2-normalised, on the model's device).

    Per class: encode every template's prompt, L2-normalise each embedding, average them, L2-normalise the mean
    (CLIP's prompt ensembling). Prompts of all classes are encoded together in batches of `batch_size`, so the
    memory held is [C, embed_dim] plus one batch whatever the number of classes and templates.
    """
    from ..models.tokenizer import tokenize

    names = check_class_names(class_names)
    templates = resolve_templates(templates)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    context_length = model.config.context_length
    num_t = len(templates)
    total = len(names) * num_t
    sums: Optional[torch.Tensor] = None
    n_chunks = math.ceil(total / batch_size)
    with inference_mode(model), _progress(n_chunks, progress) as bar:
        for start in range(0, total, batch_size):
            flat = range(start, min(start + batch_size, total))  # prompt k = class k // T, template k % T
            prompts = [format_prompt(templates[k % num_t], names[k // num_t]) for k in flat]
            ids = tokenize(prompts, context_length=context_length).to(device)
            emb = F.normalize(model.encode_text(ids, normalize=False).float(), dim=-1)
            if sums is None:
                sums = torch.zeros(len(names), emb.shape[-1], dtype=torch.float32, device=device)
            owner = torch.tensor([k // num_t for k in flat], device=device)
            sums.index_add_(0, owner, emb)
            bar.update(1)
    return F.normalize(sums / num_t, dim=-1)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] (ImageNet-normalised RGB), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point (ImageNet-normalised), got {images.dtype}")


class ZeroShotClassifier(nn.Module):
    """Zero-shot image classifier: logits = exp(logit_scale) * normalize(image embedding) @ text_embeddings.T.

    The class weights are computed once at construction (`build_text_classifier`) and kept in the
    `text_embeddings` buffer [C, embed_dim], so they follow `.to(device)`. `logit_scale` (log of the scale)
    defaults to the model's `logit_scale`; it only sets the softmax temperature, never the ranking.
    """

    def __init__(self, model: nn.Module, class_names: Sequence[str], templates: TemplatesArg = None,
                 batch_size: int = 256, *, logit_scale: Optional[float] = None, progress: Optional[bool] = None):
        super().__init__()
        self.model = model
        self.class_names = check_class_names(class_names)
        self.templates = resolve_templates(templates)
        self.register_buffer("text_embeddings", build_text_classifier(
            model, self.class_names, self.templates, batch_size=batch_size, progress=progress))
        self._logit_scale = logit_scale

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The log of the logit scale, a 0-d float32 tensor."""
        if self._logit_scale is not None:
            return torch.tensor(float(self._logit_scale), device=self.text_embeddings.device)
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            raise RuntimeError("the model has no logit_scale; pass ZeroShotClassifier(..., logit_scale=...)")
        return scale.detach().float().reshape(())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images [B, 3, H, W] -> logits [B, C] (float32)."""
        _check_images(images)
        device = self.text_embeddings.device
        img = self.model.encode_image(images.to(device=device, dtype=model_dtype(self.model)), normalize=False)
        # The cosine logits are computed in fp32 even under autocast: a bf16 matmul would round probabilities.
        with torch.autocast(device.type, enabled=False):
            img = F.normalize(img.float(), dim=-1)
            return self.logit_scale.to(device).exp() * img @ self.text_embeddings.T

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class indices [B] (int64), in eval mode and without autograd."""
        with inference_mode(self.model):
            return self(images).argmax(dim=-1)

    def topk(self, images: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities [B, k], class indices [B, k]) of the k most likely classes (softmax over all C)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        with inference_mode(self.model):
            probs = self(images).softmax(dim=-1)
        return probs.topk(min(k, self.num_classes), dim=-1)


__all__ = ["ZeroShotClassifier", "build_text_classifier", "inference_mode", "check_class_names"]

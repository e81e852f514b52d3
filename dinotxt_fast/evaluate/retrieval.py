"""Image-text retrieval on COCO / Flickr30k (Karpathy split): every image and caption embedded with the full
2048-d embeddings, L2-normalised, ranked by cosine; image->text and text->image recall@1/5/10 (the columns of the
DINOv3 paper's Table 16). Preprocessing as for zero-shot classification (the release's resize / crop)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .image_data import RetrievalDataset
from .metrics import retrieval_recall
from .runtime import Meter, describe_model, make_loader
from .zeroshot import default_preprocessing, stack_images


def encode_texts(model: nn.Module, texts: list, batch_size: int = 256) -> torch.Tensor:
    """[T, embed_dim] float32 L2-normalised text embeddings, `batch_size` captions per forward pass."""
    from ..inference.zeroshot import model_device
    from ..models.tokenizer import tokenize

    device = model_device(model)
    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenize(texts[start:start + batch_size], context_length=model.config.context_length).to(device)
        out.append(F.normalize(model.encode_text(ids).float(), dim=-1))
    return torch.cat(out)


def evaluate_retrieval(model: nn.Module, dataset: RetrievalDataset, *, resize: Optional[int] = None,
                       crop: Optional[int] = None, batch_size: int = 64, limit: Optional[int] = None,
                       num_workers: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                       progress: Optional[bool] = None, model_info: Optional[dict] = None) -> dict:
    """Rank the captions of `dataset` (the first `limit` images and their captions) for every image and the images
    for every caption; returns the result dict (JSON keys: task, dataset, num_images, num_texts, image_to_text and
    text_to_image (each {"R@1", "R@5", "R@10"}, fractions), preprocessing, images_per_s, seconds, peak_memory_mb,
    peak_memory_kind, device, model)."""
    from ..inference.zeroshot import autocast, inference_mode, model_device, model_dtype

    device = model_device(model)
    default_resize, default_crop = default_preprocessing(model)
    resize, crop = resize or default_resize, crop or default_crop
    data = dataset.head(limit).preprocess(resize, crop)
    texts = data.texts
    with inference_mode(model), autocast(device, dtype):
        meter = Meter(len(data), f"{data.benchmark} images", device, progress)
        try:
            parts = []
            for batch in make_loader(data, batch_size, num_workers, device, collate=list):
                images = stack_images(batch).to(device=device, dtype=model_dtype(model), non_blocking=True)
                parts.append(F.normalize(model.encode_image(images).float(), dim=-1))
                meter.update(len(batch))
            text_emb = encode_texts(model, texts, batch_size=max(batch_size, 256))
        finally:
            timing = meter.close()
    recall = retrieval_recall(torch.cat(parts), text_emb, data.text_to_image)
    return {
        "task": "retrieval", "dataset": data.benchmark, "root": str(data.root), "num_images": len(data),
        "num_texts": len(texts), **recall,
        "preprocessing": {"resize": resize, "crop": crop, "interpolation": "bicubic (PIL)",
                          "normalize": "ImageNet mean/std"},
        "captions_per_image": len(data.captions[0]), "batch_size": batch_size,
        "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
        **timing, "device": str(device),
        "model": model_info if model_info is not None else describe_model(model),
    }


__all__ = ["evaluate_retrieval", "encode_texts"]

"""Inference with DINO.txt models: zero-shot classification, open-vocabulary segmentation, image loading."""
from .images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    classification_transform,
    denormalize,
    load_classification_batch,
    load_image,
    load_image_tensor,
    load_label_mask,
    normalize_tensor,
    to_tensor,
)
from .segmentation import dense_text_embeddings, mean_iou, segment, short_side_size, sliding_window_boxes
from .templates import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, TEMPLATE_SETS, format_prompt, resolve_templates
from .zeroshot import ZeroShotClassifier, build_text_classifier

__all__ = [
    "ZeroShotClassifier", "build_text_classifier", "segment", "mean_iou", "sliding_window_boxes",
    "short_side_size", "dense_text_embeddings", "IMAGENET_TEMPLATES", "SIMPLE_TEMPLATES", "TEMPLATE_SETS",
    "format_prompt", "resolve_templates", "IMAGENET_MEAN", "IMAGENET_STD", "load_image", "to_tensor",
    "normalize_tensor", "denormalize", "classification_transform", "load_classification_batch",
    "load_image_tensor", "load_label_mask",
]

"""Benchmark evaluation: the paper's open-vocabulary segmentation, zero-shot classification and retrieval tables on
the standard datasets in their standard on-disk layouts (the API of `dinotxt-fast eval`).

    from dinotxt_fast import evaluate as ev
    ds = ev.segmentation_dataset("ade20k", "data/ade/ADEChallengeData2016")
    result = ev.evaluate_segmentation(model, ds)                 # the official slide protocol by default
    ev.write_report(result, "results/ade20k.json")               # + results/ade20k.md
    print(ev.summary(result))

    ev.evaluate_zeroshot(model, ev.imagenet_dataset("data/imagenet"))          # top1, top5, per class
    ev.evaluate_retrieval(model, ev.karpathy_dataset("coco", "data/coco"))     # R@1/5/10 both ways

Every result is a JSON-ready dict whose metrics are fractions in [0, 1]; mIoU is mmsegmentation's (classes with a
non-empty union, one confusion matrix over the dataset).
"""
from .classnames import imagenet_classes, imagenet_subset_wnids, segmentation_class_names
from .files import DatasetError
from .image_data import (
    RETRIEVAL_DATASETS, ZEROSHOT_DATASETS, ClassificationDataset, RetrievalDataset, imagefolder_dataset,
    imagenet_dataset, karpathy_dataset,
)
from .metrics import ConfusionMatrix, retrieval_recall, segmentation_scores, topk_hits
from .report import markdown, summary, write_json, write_report
from .retrieval import evaluate_retrieval
from .runtime import describe_model
from .segmentation import evaluate_segmentation, model_predictor
from .segmentation_data import SEGMENTATION_DATASETS, SegmentationDataset, segmentation_dataset
from .zeroshot import default_preprocessing, evaluate_zeroshot


def zeroshot_dataset(name: str, root, split: str = "val", class_names=None) -> ClassificationDataset:
    """One of ZEROSHOT_DATASETS: "imagenet" (split folder `split`), "imagenet-a", "imagenet-r", or "imagefolder"
    (`split` used when <root>/<split> exists; `class_names` replaces the folder names)."""
    if name == "imagefolder":
        from pathlib import Path

        return imagefolder_dataset(root, split if (Path(root).expanduser() / split).is_dir() else None, class_names)
    if class_names is not None:
        raise ValueError(f"class_names only applies to imagefolder; {name} uses the vendored CLIP class names")
    if name in ("imagenet", "imagenet-a", "imagenet-r"):
        return imagenet_dataset(root, split=split, variant=name)
    raise ValueError(f"unknown zero-shot dataset {name!r}; choose from {', '.join(ZEROSHOT_DATASETS)}")


__all__ = [
    "evaluate_segmentation", "evaluate_zeroshot", "evaluate_retrieval",
    "segmentation_dataset", "zeroshot_dataset", "imagenet_dataset", "imagefolder_dataset", "karpathy_dataset",
    "SegmentationDataset", "ClassificationDataset", "RetrievalDataset", "DatasetError",
    "SEGMENTATION_DATASETS", "ZEROSHOT_DATASETS", "RETRIEVAL_DATASETS",
    "ConfusionMatrix", "segmentation_scores", "topk_hits", "retrieval_recall",
    "model_predictor", "default_preprocessing", "describe_model",
    "write_report", "write_json", "markdown", "summary",
    "segmentation_class_names", "imagenet_classes", "imagenet_subset_wnids",
]

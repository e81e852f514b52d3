"""The JSON file (fractions, NaN as null), the Markdown tables and the console summary of each task."""
import json
import math

import pytest

from dinotxt_fast.evaluate import markdown, summary, write_report

TIMING = {"images_per_s": 12.5, "seconds": 4.0, "peak_memory_mb": 321.0, "peak_memory_kind": "cuda_max_allocated",
          "device": "cuda:0", "model": None}

RESULTS = {
    "segmentation": {"task": "segmentation", "dataset": "ade20k", "split": "validation", "num_images": 2,
                     "num_classes": 2, "miou": 0.25, "pixel_accuracy": 0.5, "mean_accuracy": math.nan,
                     "per_class_iou": {"wall": 0.5, "sky": None}, "protocol": {"mode": "slide"}, **TIMING},
    "zeroshot": {"task": "zeroshot", "dataset": "imagenet", "num_images": 10, "num_classes": 1000, "top1": 0.8,
                 "top5": 0.95, "mean_per_class_accuracy": 0.75, "per_class_accuracy": {"tench": 1.0, "goldfish": None},
                 **TIMING},
    "retrieval": {"task": "retrieval", "dataset": "coco", "num_images": 5000, "num_texts": 25000,
                  "image_to_text": {"R@1": 0.625, "R@5": 0.8, "R@10": 0.9},
                  "text_to_image": {"R@1": 0.45, "R@5": 0.7, "R@10": 0.8}, **TIMING},
}


@pytest.mark.parametrize("task", list(RESULTS))
def test_report_files(tmp_path, task):
    result = RESULTS[task]
    json_path, md_path = write_report(result, tmp_path / f"{task}.json", markdown_path=tmp_path / "t" / "table.md")
    saved = json.loads(json_path.read_text())  # strict JSON: no NaN tokens
    assert saved["task"] == task and md_path.read_text() == markdown(result)
    lines = summary(result).splitlines()
    assert len(lines) == 2 and "12.50 images/s" in lines[1] and "321.0 MB" in lines[1]


def test_nan_becomes_null_and_percentages(tmp_path):
    path, _ = write_report(RESULTS["segmentation"], tmp_path / "r.json")
    assert "NaN" not in path.read_text()
    saved = json.loads(path.read_text())
    assert saved["mean_accuracy"] is None and saved["per_class_iou"] == {"wall": 0.5, "sky": None}
    table = markdown(RESULTS["segmentation"])
    assert "| ade20k validation | 2 | 25.00 | 50.00 | - | 12.50 | 321.0 |" in table and "| sky | - |" in table
    assert "| coco | 5000 | 25000 | 62.50 | 80.00 | 90.00 | 45.00 | 70.00 | 80.00 |" in markdown(RESULTS["retrieval"])
    assert "top-1 80.00%  top-5 95.00%" in summary(RESULTS["zeroshot"])  # percent only with its sign

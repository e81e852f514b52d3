"""evaluate_segmentation: exact metrics from stub and oracle predictors on every benchmark layout, the tiny model
against a hand-written loop over `segment`, and the result's keys."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinotxt_fast.evaluate import (
    SEGMENTATION_DATASETS, evaluate_segmentation, segmentation_dataset, write_report,
)
from dinotxt_fast.evaluate.segmentation_data import image_input
from dinotxt_fast.inference import IMAGENET_TEMPLATES, dense_text_embeddings, mean_iou, segment
from dinotxt_fast.models.tokenizer import tokenize
from tests.inference.tiny_model import make_tiny

from .layouts import write_segmentation


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def pattern(shape, num_classes):
    """The stub's prediction: a fixed function of the pixel position."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    return (x // 5 * 3 + y // 7) % num_classes


def expected_scores(preds, targets, num_classes):
    """IoU by set counting per class over all valid pixels (no confusion matrix)."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    correct = total = 0
    for p, t in zip(preds, targets):
        valid = t != 255
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (t == c) & valid)
            union[c] += np.sum(((p == c) | (t == c)) & valid)
        correct += np.sum((p == t) & valid)
        total += np.sum(valid)
    iou = [inter[c] / union[c] if union[c] else None for c in range(num_classes)]
    present = [v for v in iou if v is not None]
    return sum(present) / len(present), correct / total, iou


@pytest.mark.parametrize("name", SEGMENTATION_DATASETS)
def test_stub_predictor_gives_exact_metrics(tmp_path, name):
    targets = write_segmentation(name, tmp_path)
    ds = segmentation_dataset(name, tmp_path)
    c = ds.num_classes
    preds = [pattern(t.shape, c) for t in targets]

    def predictor(images):
        return [torch.from_numpy(pattern(img.shape[1:], c)) for img in images]

    result = evaluate_segmentation(None, ds, predictor=predictor, batch_size=2, num_workers=0, progress=False)
    miou, pixel_acc, iou = expected_scores(preds, targets, c)
    assert result["miou"] == pytest.approx(miou, rel=1e-12)
    assert result["pixel_accuracy"] == pytest.approx(pixel_acc, rel=1e-12)
    got = list(result["per_class_iou"].values())
    assert list(result["per_class_iou"]) == ds.class_names
    assert [g is None for g in got] == [e is None for e in iou]
    assert [g for g in got if g is not None] == pytest.approx([e for e in iou if e is not None], rel=1e-12)
    assert result["num_images"] == len(targets) and result["task"] == "segmentation"


def test_oracle_predictor_scores_one(tmp_path):
    targets = write_segmentation("cityscapes", tmp_path)
    ds = segmentation_dataset("cityscapes", tmp_path)
    queue = iter(targets)

    def oracle(images):
        return [torch.from_numpy(np.where(t == 255, 0, t)) for t, _ in zip(queue, images)]

    result = evaluate_segmentation(None, ds, predictor=oracle, batch_size=2, num_workers=0, progress=False)
    assert result["miou"] == 1.0 and result["pixel_accuracy"] == 1.0 and result["mean_accuracy"] == 1.0
    present = {int(v) for t in targets for v in np.unique(t) if v != 255}
    for k, (name, iou) in enumerate(result["per_class_iou"].items()):
        assert (iou == 1.0) if k in present else (iou is None), name


def official_dense_embeddings(model, names, templates):
    """The DINOv3 notebook's recipe written out: per class and template, normalise the second half of the text
    embedding; average over templates; normalise."""
    vd = model.config.vision_dim
    rows = []
    with torch.no_grad():
        for name in names:
            ids = tokenize([t.replace("{}", name) for t in templates])
            halves = F.normalize(model.encode_text(ids)[:, vd:], dim=-1)
            rows.append(F.normalize(halves.mean(0), dim=-1))
    return torch.stack(rows)


def test_dense_text_embeddings_follow_the_official_recipe(tiny):
    names = ["wall", "sky", "person"]
    got = dense_text_embeddings(tiny, names, IMAGENET_TEMPLATES[:5])
    want = official_dense_embeddings(tiny, names, IMAGENET_TEMPLATES[:5])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode,features", [("slide", "head"), ("whole", "backbone")])
def test_tiny_model_matches_a_loop_over_segment(tmp_path, tiny, mode, features):
    write_segmentation("voc21", tmp_path)
    ds = segmentation_dataset("voc21", tmp_path)
    knobs = dict(mode=mode, short_side=42, window=28, stride=14, features=features)
    result = evaluate_segmentation(tiny, ds, templates="none", batch_size=2, num_workers=0, progress=False,
                                   **knobs)
    text = official_dense_embeddings(tiny, ds.class_names, ["{}"])  # [C, vision_dim] class vectors
    preds, targets = [], []
    for i in range(len(ds)):
        item = ds[i]
        preds.append(segment(tiny, [image_input(item["image"])], text, **knobs)[0])
        targets.append(item["target"])
    miou, per_class = mean_iou(preds, targets, ds.num_classes)
    assert result["miou"] == pytest.approx(miou, rel=1e-12)
    assert [v if v is not None else math.nan for v in result["per_class_iou"].values()] == pytest.approx(
        per_class.tolist(), rel=1e-12, nan_ok=True)
    protocol = result["protocol"]
    assert protocol["mode"] == mode and protocol["features"] == features and protocol["short_side"] == 42
    assert protocol["window_softmax"] == (mode == "slide")


def test_background_threshold(tmp_path, tiny):
    targets = write_segmentation("voc21", tmp_path)
    ds = segmentation_dataset("voc21", tmp_path)
    # Above every score: every pixel becomes background (class 0).
    result = evaluate_segmentation(tiny, ds, templates="none", short_side=28, window=28, stride=14,
                                   background_threshold=2.0, num_workers=0, progress=False)
    miou, pixel_acc, _ = expected_scores([np.zeros_like(t) for t in targets], targets, 21)
    assert result["miou"] == pytest.approx(miou) and result["pixel_accuracy"] == pytest.approx(pixel_acc)
    assert result["protocol"]["background_threshold"] == 2.0
    write_segmentation("voc20", tmp_path)
    with pytest.raises(ValueError, match="class 0 is background"):
        evaluate_segmentation(tiny, segmentation_dataset("voc20", tmp_path), background_threshold=0.5)


def test_limit_result_keys_and_report(tmp_path, tiny):
    write_segmentation("ade20k", tmp_path)
    ds = segmentation_dataset("ade20k", tmp_path)
    result = evaluate_segmentation(tiny, ds, templates="none", short_side=28, window=28, stride=14, limit=2,
                                   num_workers=0, progress=False, model_info={"preset": "tiny", "files": {}})
    assert result["num_images"] == 2
    for key in ("task", "dataset", "num_images", "miou", "pixel_accuracy", "per_class_iou", "protocol",
                "images_per_s", "peak_memory_mb", "model"):
        assert key in result, key
    assert 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["pixel_accuracy"] <= 1.0
    assert result["images_per_s"] > 0 and result["peak_memory_mb"] > 0
    assert result["model"] == {"preset": "tiny", "files": {}}
    json_path, md_path = write_report(result, tmp_path / "out" / "ade.json")
    saved = json.loads(json_path.read_text())
    assert saved["per_class_iou"]["wall"] == result["per_class_iou"]["wall"]
    assert list(saved["per_class_iou"]) == ds.class_names  # class-index order survives the file
    assert md_path.name == "ade.md" and "| ade20k validation | 2 |" in md_path.read_text()
    with pytest.raises(ValueError, match="model or a predictor"):
        evaluate_segmentation(None, ds)

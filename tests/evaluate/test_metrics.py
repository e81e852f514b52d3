"""The metrics against independent definitions: torchmetrics (what the official DINOv3 dino.txt notebook scores
with), hand-counted examples and brute-force ranking."""
import math

import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from dinotxt_fast.evaluate import ConfusionMatrix, retrieval_recall, segmentation_scores, topk_hits


def random_maps(seed, num_classes=12, absent=(3, 7), pred_only=(9,), batch=4, shape=(30, 40)):
    """Random label maps where the classes in `absent` occur in neither map, those in `pred_only` only in the
    predictions, and ~10% of the targets are ignored (255)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (batch, *shape), generator=g)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.4, target,
                       torch.randint(0, num_classes, target.shape, generator=g))
    for c in absent:
        target[target == c] = 0
        pred[pred == c] = 1
    for c in pred_only:
        target[target == c] = 2
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    return pred, target


@pytest.mark.parametrize("seed", range(4))
def test_confusion_and_miou_match_torchmetrics(seed):
    c = 12
    pred, target = random_maps(seed, c)
    ours = ConfusionMatrix(c)
    for p, t in zip(pred, target):  # accumulated image by image, as the evaluation does
        ours.update(p, t)
    reference = MulticlassConfusionMatrix(c, ignore_index=255)
    reference.update(pred, target)
    assert torch.equal(ours.matrix, reference.compute().long())  # the counts, exactly

    scores = ours.scores()
    macro = MulticlassJaccardIndex(c, average="macro", ignore_index=255)
    macro.update(pred, target)
    # torchmetrics computes in float32 and leaves out classes with an empty union, like mmseg.
    assert scores["miou"] == pytest.approx(float(macro.compute()), abs=1e-6)
    per_class = MulticlassJaccardIndex(c, average="none", ignore_index=255)
    per_class.update(pred, target)
    expected = per_class.compute().tolist()
    for k, (got, want) in enumerate(zip(scores["per_class_iou"], expected)):
        if k in (3, 7):
            assert got is None and want == 0.0  # torchmetrics reports 0 there but leaves it out of the mean
        else:
            assert got == pytest.approx(want, abs=1e-6)
    assert scores["per_class_iou"][9] == 0.0  # predicted, never present: counted as 0 in the mean
    # Leaving the absent classes in the mean would give a different, lower number.
    present = [v for v in scores["per_class_iou"] if v is not None]
    assert scores["miou"] == pytest.approx(sum(present) / len(present))
    assert scores["miou"] > sum(present) / c


def test_scores_by_hand():
    # rows = target, columns = prediction
    confusion = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    s = segmentation_scores(confusion)
    assert s["per_class_iou"] == [pytest.approx(3 / 6), pytest.approx(4 / 7), None]
    assert s["miou"] == pytest.approx((3 / 6 + 4 / 7) / 2)
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)
    assert s["mean_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    empty = segmentation_scores(torch.zeros(2, 2, dtype=torch.int64))
    assert math.isnan(empty["miou"]) and math.isnan(empty["pixel_accuracy"])
    assert empty["per_class_iou"] == [None, None]


def test_confusion_ignores_and_checks_labels():
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 255], [1, 2]]))
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert cm.matrix.dtype == torch.int64
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\)"):
        cm.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.int64))
    cm.update(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))  # an all-ignored image


def test_topk_hits():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.1, 0.2]])
    hits = topk_hits(logits, torch.tensor([1, 2, 0]), (1, 2, 5))
    assert hits[1].tolist() == [True, False, False]
    assert hits[2].tolist() == [True, True, False]
    assert hits[5].tolist() == [True, True, True]  # k beyond the class count: every class


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_retrieval_recall_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    n, per, e = 7, 3, 16
    images = torch.nn.functional.normalize(torch.randn(n, e, generator=g), dim=-1)
    owner = torch.arange(n).repeat_interleave(per)
    texts = torch.nn.functional.normalize(images[owner] + 0.9 * torch.randn(n * per, e, generator=g), dim=-1)
    got = retrieval_recall(images, texts, owner, ks=(1, 2, 5), chunk=chunk)
    sims = images @ texts.T
    for k in (1, 2, 5):
        i2t = sum(any(owner[j] == i for j in sims[i].argsort(descending=True)[:k]) for i in range(n)) / n
        t2i = sum(owner[t] in sims[:, t].argsort(descending=True)[:k] for t in range(n * per)) / (n * per)
        assert got["image_to_text"][f"R@{k}"] == pytest.approx(i2t)
        assert got["text_to_image"][f"R@{k}"] == pytest.approx(t2i)
    assert 0 < got["image_to_text"]["R@1"] < 1  # the noise makes the test discriminating

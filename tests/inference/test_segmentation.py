"""Open-vocabulary segmentation: the window grid, the protocol against a float64 reference, inputs and mIoU (CPU,
tiny models)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dinotxt_fast.inference import dense_text_embeddings, mean_iou, segment, short_side_size, sliding_window_boxes


def test_sliding_window_boxes_mmseg_grid():
    boxes = sliding_window_boxes(512, 683, 384, 192)
    assert boxes.tolist() == [[0, 0, 384, 384], [0, 192, 384, 576], [0, 299, 384, 683],
                              [128, 0, 512, 384], [128, 192, 512, 576], [128, 299, 512, 683]]
    assert sliding_window_boxes(300, 200, 384, 192).tolist() == [[0, 0, 300, 200]]
    for h, w, win, stride in [(97, 61, 30, 17), (30, 30, 30, 7), (5, 400, 64, 64)]:
        cover = torch.zeros(h, w, dtype=torch.int64)
        for y0, x0, y1, x1 in sliding_window_boxes(h, w, win, stride).tolist():
            assert (y1 - y0, x1 - x0) == (min(win, h), min(win, w))
            cover[y0:y1, x0:x1] += 1
        assert bool((cover > 0).all())


def test_short_side_size():
    assert short_side_size(480, 640, 512) == (512, 682)
    assert short_side_size(640, 480, 512) == (682, 512)
    assert short_side_size(100, 100, 512) == (512, 512)
    assert short_side_size(37, 91, None) == (37, 91)


def reference_segment(model, image, text, mode, short_side, window, stride, features):
    """The protocol written out with F.interpolate, full-resolution maps and explicit loops (float64)."""
    patch, d = model.config.patch_size, model.config.vision_dim
    h, w = image.shape[-2:]
    if short_side is None:
        hc, wc = h, w
    elif h <= w:
        hc, wc = short_side, int(short_side * w / h)
    else:
        hc, wc = int(short_side * h / w), short_side
    canvas = image[None]
    if (hc, wc) != (h, w):
        canvas = F.interpolate(canvas, size=(hc, wc), mode="bicubic", align_corners=False, antialias=True)
    if mode == "whole":
        boxes = [(0, 0, hc, wc)]
    else:
        boxes = []
        for i in range(max(hc - window + stride - 1, 0) // stride + 1):
            for j in range(max(wc - window + stride - 1, 0) // stride + 1):
                y1, x1 = min(i * stride + window, hc), min(j * stride + window, wc)
                boxes.append((max(y1 - window, 0), max(x1 - window, 0), y1, x1))
    dense_text = F.normalize(text[:, d:], dim=-1)
    total = torch.zeros(text.shape[0], hc, wc, dtype=torch.float64)
    count = torch.zeros(hc, wc, dtype=torch.float64)
    for y0, x0, y1, x1 in boxes:
        crop = canvas[..., y0:y1, x0:x1]
        sh, sw = math.ceil((y1 - y0) / patch) * patch, math.ceil((x1 - x0) / patch) * patch
        if (sh, sw) != (y1 - y0, x1 - x0):
            crop = F.interpolate(crop, size=(sh, sw), mode="bicubic", align_corners=False)
        with torch.no_grad():
            _, head, backbone = model.image_tokens(crop)
        tokens = (head if features == "head" else backbone)[0].reshape(sh // patch, sw // patch, d)
        logits = torch.einsum("hwd,cd->chw", F.normalize(tokens, dim=-1), dense_text)
        up = F.interpolate(logits[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        total[:, y0:y1, x0:x1] += up.softmax(0) if mode == "slide" else up
        count[y0:y1, x0:x1] += 1
    seg = F.interpolate((total / count)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return seg


@pytest.mark.parametrize("mode, features, shape, short_side, window, stride", [
    ("slide", "head", (50, 77), 40, 30, 17),        # downscale, 30 -> 42 stretch, overlapping windows
    ("slide", "backbone", (33, 45), 56, 28, 14),    # upscale, windows already patch multiples
    ("slide", "head", (40, 25), None, 64, 32),      # canvas smaller than the window: one stretched crop
    ("whole", "head", (45, 61), 30, 384, 192),
    ("whole", "backbone", (29, 40), None, 384, 192),
])
def test_segment_matches_float64_reference(tiny64, mode, features, shape, short_side, window, stride):
    image = torch.randn(3, *shape, dtype=torch.float64)
    text = torch.randn(5, tiny64.config.embed_dim, dtype=torch.float64)
    labels, scores = segment(tiny64, image[None], text, mode=mode, short_side=short_side, window=window,
                             stride=stride, features=features, return_scores=True)
    seg = reference_segment(tiny64, image, text, mode, short_side, window, stride, features)
    top2 = seg.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-9  # ties can go either way
    assert labels.shape == (1, *shape) and labels.dtype == torch.int64
    assert float(clear.double().mean()) > 0.99
    assert torch.equal(labels[0][clear], seg.argmax(0)[clear])
    torch.testing.assert_close(scores[0], top2[0], atol=1e-9, rtol=1e-9)


def test_class_names_full_embeddings_and_class_vectors_segment_alike(tiny):
    """Class names give the recipe's vectors (each prompt's patch-aligned half normalised, averaged, normalised); a
    [C, vision_dim] tensor of them, or full [C, embed_dim] embeddings with those halves, give the same labels."""
    from dinotxt_fast.inference import SIMPLE_TEMPLATES

    names = ["red", "green", "blue"]
    vectors = dense_text_embeddings(tiny, names, SIMPLE_TEMPLATES[:3])
    assert vectors.shape == (3, tiny.config.vision_dim)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    full = torch.cat([torch.randn_like(vectors), 2.5 * vectors], dim=1)  # only the second half counts
    image = torch.randn(1, 3, 42, 56)
    knobs = dict(short_side=None, window=28, stride=14, return_scores=True)
    by_name = segment(tiny, image, names, templates=SIMPLE_TEMPLATES[:3], **knobs)
    for classes in (vectors, full):
        labels, scores = segment(tiny, image, classes, **knobs)
        assert torch.equal(labels, by_name[0])
        torch.testing.assert_close(scores, by_name[1])


def test_head_and_backbone_features_differ(tiny):
    image = torch.randn(1, 3, 42, 56)
    text = torch.randn(6, 128)
    _, s_head = segment(tiny, image, text, short_side=None, window=28, stride=14, return_scores=True)
    _, s_back = segment(tiny, image, text, short_side=None, window=28, stride=14, features="backbone",
                        return_scores=True)
    assert not torch.allclose(s_head, s_back)


def test_segment_batch_list_and_modes(tiny):
    batch = torch.randn(2, 3, 45, 60)
    kw = dict(short_side=32, window=24, stride=12)
    for mode in ("slide", "whole"):
        labels = segment(tiny, batch, ["dog", "cat", "sky"], mode=mode, templates="none", **kw)
        assert labels.shape == (2, 45, 60) and labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) < 3
        # a batch is the same as its images one by one
        one = segment(tiny, [batch[1]], ["dog", "cat", "sky"], mode=mode, templates="none", **kw)
        assert torch.equal(labels[1], one[0])
    images = [torch.randn(3, 45, 60), torch.randn(3, 71, 30)]
    labels, scores = segment(tiny, images, ["dog", "cat", "sky"], templates="none", return_scores=True,
                             batch_size=2, **kw)
    assert isinstance(labels, list) and [tuple(l.shape) for l in labels] == [(45, 60), (71, 30)]
    assert [tuple(s.shape) for s in scores] == [(45, 60), (71, 30)]
    assert all(bool(((s > 0) & (s <= 1)).all()) for s in scores)  # averaged softmax probabilities


def test_segment_class_names_equal_their_embeddings(tiny):
    image = torch.randn(1, 3, 40, 52)
    names = ["a dog", "a cat", "grass"]
    was_training = tiny.training
    tiny.train()  # segment() and the class vectors run the model in eval mode and leave its flag as it was
    by_name = segment(tiny, image, names, templates="simple", short_side=None, window=28, stride=14)
    assert tiny.training
    text = dense_text_embeddings(tiny, names, "simple")
    assert tiny.training
    tiny.train(was_training)
    assert torch.equal(by_name, segment(tiny, image, text, short_side=None, window=28, stride=14))


@pytest.mark.parametrize("num_classes", [1, 3, 150])
def test_segment_class_counts(tiny, num_classes):
    image = torch.randn(1, 3, 37, 50)
    labels = segment(tiny, image, torch.randn(num_classes, 128), short_side=None, window=28, stride=14)
    assert labels.shape == (1, 37, 50)
    assert int(labels.min()) >= 0 and int(labels.max()) < num_classes
    if num_classes == 1:
        assert bool((labels == 0).all())
    if num_classes == 150:
        assert len(labels.unique()) > 1


def test_segment_bad_inputs(tiny):
    img = torch.randn(1, 3, 28, 28)
    with pytest.raises(ValueError, match=r"images\[None\]"):
        segment(tiny, img[0], ["a"])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        segment(tiny, torch.randn(1, 4, 28, 28), ["a"])
    with pytest.raises(TypeError, match="floating-point"):
        segment(tiny, [torch.zeros(3, 28, 28, dtype=torch.uint8)], ["a"])
    with pytest.raises(ValueError, match="empty list"):
        segment(tiny, [], ["a"])
    with pytest.raises(ValueError, match="class_names is empty"):
        segment(tiny, img, [])
    with pytest.raises(ValueError, match=r"embed_dim=128\] full text embeddings or \[C, vision_dim=64\]"):
        segment(tiny, img, torch.randn(3, 48))
    with pytest.raises(ValueError, match="mode"):
        segment(tiny, img, ["a"], mode="tiles")
    with pytest.raises(ValueError, match="features"):
        segment(tiny, img, ["a"], features="cls")
    with pytest.raises(ValueError, match="stride <= window"):
        segment(tiny, img, ["a"], window=16, stride=32)


def test_mean_iou_hand_example():
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 3]])
    # class 0: inter 1, union |{pred 0}|=2 + |{tgt 0}|=2 - 1 = 3 -> 1/3 (the ignored pixel is dropped)
    # class 1: pred {01,02,03}, tgt {02,03,13} -> inter 2, union 3+3-2 = 4 -> 1/2
    # class 2: pred {10}, tgt {10,11} -> 1/2 ; class 3: pred {13}, tgt {} -> 0 ; class 4: absent -> NaN
    miou, per_class = mean_iou(pred, target, num_classes=5)
    expected = torch.tensor([1 / 3, 1 / 2, 1 / 2, 0.0, float("nan")], dtype=torch.float64)
    torch.testing.assert_close(per_class, expected, equal_nan=True)
    assert miou == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 0) / 4)
    # a list accumulates intersections and unions over images, not per-image IoUs
    miou2, per2 = mean_iou([pred, pred], [target, target], num_classes=5)
    torch.testing.assert_close(per2, expected, equal_nan=True)
    with pytest.raises(ValueError, match="outside"):
        mean_iou(pred, target, num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        mean_iou(pred[:1], target, num_classes=5)

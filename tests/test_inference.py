"""Inference API: templates, zero-shot classifier, segmentation protocol, mIoU, image loading (CPU, tiny models)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinotxt_fast.inference import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENET_TEMPLATES,
    SIMPLE_TEMPLATES,
    ZeroShotClassifier,
    build_text_classifier,
    classification_transform,
    load_image,
    load_image_tensor,
    load_label_mask,
    mean_iou,
    resolve_templates,
    segment,
    short_side_size,
    sliding_window_boxes,
)
from dinotxt_fast.inference.images import center_crop, resize_short_side
from dinotxt_fast.models.dinotxt import create_model
from dinotxt_fast.models.tokenizer import tokenize

TINY = dict(vision_dim=64, vision_depth=2, vision_heads=4, pos_embed_grid=4, text_dim=64, text_layers=2,
            text_heads=4)


def make_tiny(dtype=torch.float32):
    torch.manual_seed(0)
    model = create_model("dinov2_vitl14_reg4_dinotxt", **TINY)
    # LayerScale starts at 1e-5, which makes head tokens ~= backbone tokens; make the head matter.
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


@pytest.fixture(scope="module")
def tiny64():
    return make_tiny(torch.float64)


# ------------------------------------------------------------------------------------------------ templates
def test_imagenet_templates_are_clips_80():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[35] == "a {} in a video game."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert len(SIMPLE_TEMPLATES) == 7 and set(SIMPLE_TEMPLATES) <= set(IMAGENET_TEMPLATES)


def test_resolve_templates():
    assert resolve_templates(None) == IMAGENET_TEMPLATES
    assert resolve_templates("simple") == SIMPLE_TEMPLATES
    assert resolve_templates("none") == ("{}",)
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_templates("imagenet81")
    with pytest.raises(TypeError, match="wrap the single template"):
        resolve_templates("a photo of a {}.")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["no placeholder"])
    with pytest.raises(ValueError, match="empty"):
        resolve_templates([])


# ------------------------------------------------------------------------------------------------ zero-shot
def test_text_classifier_matches_hand_computation(tiny):
    names = ["dog", "red {car}", "tree"]
    templates = ["a photo of a {}.", lambda c: f"art of {c}", "{}"]
    tiny.train()
    # batch_size 4 puts prompts of different classes in one batch and splits classes across batches.
    weights = build_text_classifier(tiny, names, templates, batch_size=4)
    assert tiny.training, "the model's training flag must be restored"
    tiny.eval()
    with torch.no_grad():
        expected = []
        for name in names:
            prompts = ["a photo of a " + name + ".", "art of " + name, name]
            emb = F.normalize(tiny.encode_text(tokenize(prompts)).double(), dim=-1)
            expected.append(F.normalize(emb.mean(0), dim=-1))
    assert weights.shape == (3, tiny.config.embed_dim) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), torch.stack(expected), atol=1e-6, rtol=1e-5)


def test_zero_shot_classifier_logits_and_predict(tiny):
    names = ["dog", "cat", "bird", "car"]
    clf = ZeroShotClassifier(tiny, names, templates="simple")
    assert clf.text_embeddings.shape == (4, 128) and clf.num_classes == 4
    images = torch.randn(3, 3, 28, 42)
    with torch.no_grad():
        logits = clf(images)
        img = F.normalize(tiny.encode_image(images), dim=-1)
    expected = tiny.logit_scale.exp() * img @ build_text_classifier(tiny, names, SIMPLE_TEMPLATES).T
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(clf.predict(images), logits.argmax(-1))
    probs, idx = clf.topk(images, k=10)  # k is capped at the class count
    assert probs.shape == idx.shape == (3, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    fixed = ZeroShotClassifier(tiny, names, templates="simple", logit_scale=0.0)
    torch.testing.assert_close(fixed(images), logits / tiny.logit_scale.exp(), atol=1e-5, rtol=1e-5)


def test_zero_shot_bad_inputs(tiny):
    with pytest.raises(ValueError, match="empty"):
        ZeroShotClassifier(tiny, [])
    with pytest.raises(TypeError, match="single string"):
        ZeroShotClassifier(tiny, "dog")
    with pytest.raises(TypeError, match=r"class_names\[1\]"):
        build_text_classifier(tiny, ["dog", 3], "none")
    clf = ZeroShotClassifier(tiny, ["dog"], templates="none")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clf(torch.randn(3, 28, 28))
    with pytest.raises(TypeError, match="floating point"):
        clf(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ segmentation
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
    by_name = segment(tiny, image, names, templates="simple", short_side=None, window=28, stride=14)
    text = build_text_classifier(tiny, names, "simple")
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
    with pytest.raises(ValueError, match=r"embed_dim=128"):
        segment(tiny, img, torch.randn(3, 64))
    with pytest.raises(ValueError, match="mode"):
        segment(tiny, img, ["a"], mode="tiles")
    with pytest.raises(ValueError, match="features"):
        segment(tiny, img, ["a"], features="cls")
    with pytest.raises(ValueError, match="stride <= window"):
        segment(tiny, img, ["a"], window=16, stride=32)


# ------------------------------------------------------------------------------------------------ mIoU
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


# ------------------------------------------------------------------------------------------------ images
def test_image_loading_and_transforms(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    x = load_image_tensor(tmp_path / "a.png")
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(x * std + mean, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert load_image(tmp_path / "gray.png").mode == "RGB"

    img = Image.fromarray(rgb)  # 50 wide, 30 high
    assert resize_short_side(img, 256).size == (426, 256)  # int(256 * 50 / 30)
    assert resize_short_side(Image.new("RGB", (30, 50)), 256).size == (256, 426)
    crop = center_crop(Image.fromarray(rgb), 20)
    assert np.array_equal(np.asarray(crop), rgb[5:25, 15:35])
    assert classification_transform(img).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="crop_size"):
        classification_transform(img, resize_size=100, crop_size=224)


def test_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="corrupt.png"):
        load_image(bad)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb_mask.png")
    with pytest.raises(ValueError, match="single-channel"):
        load_label_mask(tmp_path / "rgb_mask.png")
    Image.fromarray(np.array([[0, 1], [255, 2]], np.uint8)).save(tmp_path / "mask.png")
    assert load_label_mask(tmp_path / "mask.png").tolist() == [[0, 1], [255, 2]]

"""The trainer's data layer: synthetic set, transforms, deterministic distributed batching, shard/CSV/folder
loading with skip accounting, evaluation sets. CPU-only, small images, a few seconds in all."""
import io
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dinotxt_fast.inference.images import IMAGENET_MEAN, IMAGENET_STD, classification_transform, to_tensor
from dinotxt_fast.models.tokenizer import decode
from dinotxt_fast.train.data import (
    CsvCaptions, GlobalBatchSampler, ImageFolder, ShardSource, SkipCounter, build_dataset, build_segmentation_set,
    build_zero_shot_set, make_loader,
)
from dinotxt_fast.train.synthetic import COLOURS, SEGMENTATION_CLASS_NAMES, SyntheticShapes
from dinotxt_fast.train.transforms import (
    EvalTransform, FixedCropTransform, TrainTransform, random_resized_crop_params, sample_generator,
)

wds = pytest.importorskip("webdataset")

S = 32  # image size used throughout: small keeps the suite fast


def _image(seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _caption_of(ids):
    """The caption behind token ids, spaces removed (CLIP's decode re-spaces digits and punctuation)."""
    return decode([int(t) for t in ids if t not in (0, 49406, 49407)]).replace(" ", "")


def _squash(text):
    return text.lower().replace(" ", "")


# ------------------------------------------------------------------------------------------ synthetic

def test_synthetic_is_deterministic_and_splits_differ():
    a, b = SyntheticShapes(20, 48, seed=3), SyntheticShapes(20, 48, seed=3)
    for i in (0, 7, 19):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and x["label"] == y["label"]
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
        assert np.array_equal(x["mask"], y["mask"])
        assert x["mask"].dtype == np.int64 and x["mask"].shape == (48, 48)
        assert x["image"].size == (48, 48) and x["image"].mode == "RGB"
    other_seed, val = SyntheticShapes(20, 48, seed=4), SyntheticShapes(20, 48, seed=3, split="val")
    for other in (other_seed, val):
        assert any(not np.array_equal(np.asarray(a[i]["image"]), np.asarray(other[i]["image"])) for i in range(5))
    assert a[-1]["caption"] == a[19]["caption"]
    with pytest.raises(IndexError):
        a[20]
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(4, 48, split="test")
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes(4, 8)


def test_synthetic_caption_names_exactly_the_mask_colours():
    ds = SyntheticShapes(60, 64, seed=0)
    multi = 0
    for i in range(len(ds)):
        item = ds[i]
        words = item["caption"].rstrip(".").replace(",", " ").split()
        caption_colours = {w for w in words if w in COLOURS}
        mask_colours = {SEGMENTATION_CLASS_NAMES[c] for c in np.unique(item["mask"]) if c != 0}
        assert caption_colours == mask_colours, (item["caption"], mask_colours)
        assert caption_colours == {c for c, _, _ in item["objects"]}
        if not item["objects"]:  # an object-free sample (test_synthetic_background_only_samples)
            continue
        main_colour, main_shape, _ = item["objects"][0]
        assert item["label"] == COLOURS.index(main_colour)
        assert ds.class_names[item["label"]] == main_colour
        assert main_shape in item["caption"] or "shape" in item["caption"]
        # The main object is the largest: its colour owns the most object pixels.
        counts = np.bincount(item["mask"].ravel(), minlength=len(SEGMENTATION_CLASS_NAMES))[1:]
        if len(item["objects"]) == 1:
            assert counts.argmax() == item["label"]
        multi += len(item["objects"]) > 1
        # Object pixels have the object's colour family; background pixels are muted greys.
        pixels = np.asarray(item["image"]).astype(int)
        bg = pixels[item["mask"] == 0]
        assert (bg.max(axis=1) - bg.min(axis=1)).max() <= 40
    assert 10 < multi < 50  # both single- and multi-object images occur


def test_synthetic_background_only_samples():
    """The train split holds DEFAULT_BACKGROUND_SHARE object-free images captioned as a background (the segmentation
    prompt "the background." then has a target, issue #13); the val split, hence every evaluation set, has none;
    which samples is drawn on its own, so the others are the images they were without the share."""
    from dinotxt_fast.train.synthetic import BACKGROUND_CAPTIONS, BACKGROUNDS, DEFAULT_BACKGROUND_SHARE

    n = 400
    train, plain = SyntheticShapes(n, 32, seed=0), SyntheticShapes(n, 32, seed=0, background_share=0.0)
    empty = [i for i in range(n) if not train[i]["objects"]]
    assert abs(len(empty) / n - DEFAULT_BACKGROUND_SHARE) < 0.04 and train.background_share == 0.1
    for i in empty[:5]:
        item = train[i]
        assert item["label"] == -1 and set(item["labels"].values()) == {-1}
        assert item["mask"].dtype == np.int64 and item["mask"].shape == (32, 32) and not item["mask"].any()
        assert any(item["caption"] == c.format(background=b) for c in BACKGROUND_CAPTIONS for b in BACKGROUNDS)
        assert not {w.strip(".") for w in item["caption"].split()} & set(COLOURS)
        pixels = np.asarray(item["image"]).astype(int)
        assert (pixels.max(axis=2) - pixels.min(axis=2)).max() <= 40  # a muted background, no object colour
    for i in range(20):
        if train[i]["objects"]:
            assert train[i]["caption"] == plain[i]["caption"]
            assert np.array_equal(np.asarray(train[i]["image"]), np.asarray(plain[i]["image"]))
    assert all(plain[i]["objects"] for i in range(n))
    val = SyntheticShapes(n, 32, seed=0, split="val")
    assert val.background_share == 0.0 and all(val[i]["objects"] for i in range(n))
    seg = build_segmentation_set(64, 32)
    assert all((m > 0).any() for m in seg.masks)  # every evaluation image shows an object
    assert SyntheticShapes(8, 32, background_share=0.5).background_share == 0.5
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="background_share"):
            SyntheticShapes(8, 32, background_share=bad)


def test_synthetic_label_sets():
    shape = SyntheticShapes(10, 32, label_set="shape")
    both = SyntheticShapes(10, 32, label_set="colour_shape")
    assert len(shape.class_names) == 6 and len(both.class_names) == 48
    for i in range(10):
        colour, kind, _ = shape[i]["objects"][0]
        assert shape.class_names[shape[i]["label"]] == kind
        assert both.class_names[both[i]["label"]] == f"{colour} {kind}"
    prompts = [t("orange") for t in SyntheticShapes(1, 32).templates]
    assert "a photo of an orange shape." in prompts


# ----------------------------------------------------------------------------------------- transforms

def test_train_transform_is_a_function_of_the_generator():
    t = TrainTransform(S)
    img = _image(0, (50, 37))
    x1, x2 = t(img, sample_generator(0, 1, 5)), t(img, sample_generator(0, 1, 5))
    assert x1.shape == (3, S, S) and x1.dtype == torch.float32
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, t(img, sample_generator(0, 1, 6)))
    assert not torch.equal(x1, t(img, sample_generator(0, 2, 5)))
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (x1.amin(dim=(1, 2)) >= lo - 1e-6).all() and (x1.amax(dim=(1, 2)) <= hi + 1e-6).all()
    # random.Random works as well, and the global RNG is not touched.
    state = torch.get_rng_state()
    assert torch.equal(t(img, random.Random(3)), t(img, random.Random(3)))
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(TypeError, match="Generator"):
        t(img)


def test_train_transform_flip_and_crop_geometry():
    img = _image(1, (S, S))
    full = TrainTransform(S, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)(img, torch.Generator())
    flipped = TrainTransform(S, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(img, torch.Generator())
    assert torch.allclose(full, to_tensor(img), atol=1e-6)  # whole image, no resize needed
    assert torch.equal(flipped, full.flip(-1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = random_resized_crop_params(40, 30, (0.08, 1.0), (3 / 4, 4 / 3), gen)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40 and h > 0 and w > 0
    # No 10:1 box fits a square image: torchvision's fallback is the centred crop with the closest ratio.
    assert random_resized_crop_params(100, 100, (0.5, 1.0), (10.0, 10.0), gen) == (45, 0, 10, 100)
    for bad in (dict(image_size=0), dict(scale=(0.5, 0.1)), dict(ratio=(0, 1)), dict(hflip=1.5)):
        with pytest.raises(ValueError):
            TrainTransform(**bad)


def test_eval_and_fixed_crop_transforms():
    img = _image(2, (300, 260))
    assert torch.allclose(EvalTransform(224)(img), classification_transform(img), atol=1e-6)
    assert EvalTransform(S)(img).shape == (3, S, S)
    square = _image(3, (S, S))
    assert torch.allclose(FixedCropTransform(S)(square), to_tensor(square), atol=1e-6)
    wide = FixedCropTransform(S)(_image(4, (90, 45)))
    assert wide.shape == (3, S, S)
    with pytest.raises(ValueError, match="resize_size"):
        EvalTransform(64, resize_size=32)
    with pytest.raises(ValueError, match="image_size"):
        FixedCropTransform(-1)


# ------------------------------------------------------------------------------------------- batching

def test_rank_slices_concatenate_to_the_global_batch():
    n, g = 50, 12
    one = GlobalBatchSampler(n, g, seed=7)
    for world in (2, 4):
        ranks = [GlobalBatchSampler(n, g, seed=7, rank=r, world=world) for r in range(world)]
        for step in range(10):  # 4 steps per epoch: crosses epoch boundaries
            assert sum((s.indices(step) for s in ranks), []) == one.indices(step)
    # drop_last: every epoch is a fresh permutation without repeats; epochs differ.
    epoch0 = sum((one.indices(s) for s in range(4)), [])
    epoch1 = sum((one.indices(s) for s in range(4, 8)), [])
    assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48 and epoch0 != epoch1
    assert GlobalBatchSampler(n, g, seed=8).indices(0) != one.indices(0)
    padded = GlobalBatchSampler(10, 4, drop_last=False, shuffle=False)
    assert [padded.indices(s) for s in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(n, 10, world=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 8)
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchSampler(n, 8, rank=2, world=2)


def test_sampler_resume_and_state():
    full = GlobalBatchSampler(30, 6, seed=1, num_steps=12)
    batches = list(full)
    assert len(batches) == 12
    resumed = GlobalBatchSampler(30, 6, seed=1, start_step=7, num_steps=12)
    assert list(resumed) == batches[7:]
    other = GlobalBatchSampler(30, 6, seed=1, num_steps=12)
    other.load_state_dict({"step": 7, "n": 30, "global_batch": 6, "seed": 1})
    assert list(other) == batches[7:] and other.state_dict()["step"] == 12
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict({"step": 1, "seed": 2})


def _take(loader, k):
    out = []
    for images, ids in loader:
        out.append((images, ids))
        if len(out) == k:
            break
    return out


def test_loader_ranks_resume_and_workers_agree():
    ds = SyntheticShapes(24, S, seed=0)
    kw = dict(global_batch=8, seed=5, image_size=S)
    single = _take(make_loader(ds, **kw), 5)  # 3 steps per epoch: crosses an epoch
    assert single[0][0].shape == (8, 3, S, S) and single[0][1].shape == (8, 77)
    assert single[0][1].dtype == torch.long
    halves = [_take(make_loader(ds, rank=r, world=2, **kw), 5) for r in range(2)]
    for step in range(5):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), single[step][0])
        assert torch.equal(torch.cat([halves[0][step][1], halves[1][step][1]]), single[step][1])
    resumed = make_loader(ds, start_step=3, **kw)
    for (a, b), (c, d) in zip(_take(resumed, 2), single[3:]):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert resumed.state_dict()["step"] == 5
    workers = make_loader(ds, num_workers=2, **kw)
    for (a, b), (c, d) in zip(_take(workers, 4), single):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert workers.step == 4
    # A new pass continues where the consumer stopped, not where the workers' prefetching got to.
    a, _ = next(iter(workers))
    assert torch.equal(a, single[4][0])


def test_loader_from_spec_and_captions():
    loader = make_loader("synthetic:16", global_batch=4, image_size=S, train=False)
    batches = list(loader)
    assert len(batches) == 4 and loader.skips.total == 0
    ds = SyntheticShapes(16, S)
    assert _caption_of(batches[1][1][2]) == _squash(ds[6]["caption"])


# ---------------------------------------------------------------------------------------- webdataset

def _write_shards(tmp_path, n_shards=2, per_shard=5, bad=True):
    """Shards of PNG/JPEG samples with unique captions; with `bad`, one corrupt JPEG and one sample without a
    caption in the first shard."""
    captions = []
    for s in range(n_shards):
        with wds.TarWriter(str(tmp_path / f"shard-{s:04d}.tar")) as sink:
            for k in range(per_shard):
                key = f"{s:04d}{k:04d}"
                caption = f"sample number {s * per_shard + k}"
                encode = _png_bytes if k % 2 else _jpeg_bytes
                sink.write({"__key__": key, "jpg" if k % 2 == 0 else "png": encode(_image(s * 100 + k)),
                            "txt": caption, "json": {"key": key}})
                captions.append(caption)
            if bad and s == 0:
                sink.write({"__key__": "bad_jpeg", "jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg",
                            "txt": "a corrupt image"})
                sink.write({"__key__": "no_caption", "png": _png_bytes(_image(999))})
    return str(tmp_path / ("shard-{0000..%04d}.tar" % (n_shards - 1))), captions


def test_webdataset_skips_and_counts_bad_samples(tmp_path):
    pattern, captions = _write_shards(tmp_path)
    source = build_dataset(pattern)
    assert isinstance(source, ShardSource) and len(source) == 2
    loader = make_loader(source, global_batch=4, image_size=S, train=False)
    batches = list(loader)
    seen = [_caption_of(ids) for _, ids in batches for ids in ids]
    assert sorted(seen) == sorted(map(_squash, captions))
    assert all(images.shape[1:] == (3, S, S) for images, _ in batches)
    assert loader.skips.as_dict() == {"corrupt_image": 1, "missing_caption": 1}
    # Two ranks read disjoint shards that together cover the set.
    per_rank = []
    for r in range(2):
        rank_loader = make_loader(pattern, global_batch=4, rank=r, world=2, image_size=S, train=False)
        per_rank.append({_caption_of(ids) for _, ids in rank_loader for ids in ids})
    assert per_rank[0] | per_rank[1] == set(map(_squash, captions)) and not per_rank[0] & per_rank[1]
    # A truncated shard: its readable samples are used, the broken tail is counted.
    data = (tmp_path / "shard-0001.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "a.tar").write_bytes(data[:len(data) // 2 + 100])
    with pytest.warns(RuntimeWarning, match="unreadable tar data"):
        cut = make_loader(str(tmp_path / "cut"), global_batch=2, image_size=S, train=False)
        assert 0 < sum(len(images) for images, _ in cut) < 5
    assert cut.skips["tar_error"] == 1
    # Directory and glob specs find the same shards.
    assert build_dataset(str(tmp_path)).urls == source.urls == build_dataset(str(tmp_path / "*.tar")).urls


def test_webdataset_training_stream_resumes(tmp_path):
    pattern, captions = _write_shards(tmp_path, n_shards=3, per_shard=4, bad=False)
    kw = dict(global_batch=4, seed=1, image_size=S, shuffle_buffer=6)
    full = _take(make_loader(pattern, **kw), 6)  # 12 samples per epoch: crosses two epochs
    first_epoch = {_caption_of(ids) for _, b in full[:3] for ids in b}
    assert first_epoch == set(map(_squash, captions))
    resumed = _take(make_loader(pattern, start_step=4, **kw), 2)
    for (a, b), (c, d) in zip(resumed, full[4:]):
        assert torch.equal(a, c) and torch.equal(b, d)
    again = _take(make_loader(pattern, **kw), 6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, full))
    # With workers (one shard each here) a resumed stream still continues exactly where the run stopped.
    kw.update(num_workers=2, global_batch=2)
    full = _take(make_loader(pattern, **kw), 7)
    resumed = _take(make_loader(pattern, start_step=3, **kw), 4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, full[3:]))


# ------------------------------------------------------------------------------------------ CSV / TSV

def _write_images(folder, n):
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        _image(k).save(os.path.join(folder, f"img{k}.png"))


def test_csv_and_tsv_skip_missing_files(tmp_path):
    _write_images(tmp_path / "imgs", 5)
    rows = [f"imgs/img{k}.png,caption {k}" for k in range(5)]
    rows.insert(2, "imgs/missing.png,a lost image")
    (tmp_path / "pairs.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    loader = make_loader(str(tmp_path / "pairs.csv"), global_batch=3, image_size=S, train=False)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [3, 3]  # the missing row is replaced: batches stay full
    assert loader.skips.as_dict() == {"missing_file": 1}
    assert _caption_of(batches[0][1][2]) == "caption2"  # row 2 (missing) -> the next row
    tsv = tmp_path / "pairs.tsv"
    rows = [f"tsv caption {k}\t{tmp_path}/imgs/img{k}.png" for k in range(4)] + [f"\t{tmp_path}/imgs/img4.png"]
    tsv.write_text("Title\tImage\n" + "\n".join(rows) + "\n")  # absolute paths; the last row has no caption
    ds = build_dataset(str(tsv))
    assert isinstance(ds, CsvCaptions) and len(ds) == 5
    tsv_loader = make_loader(ds, global_batch=5, image_size=S, train=False)
    (images, ids), = list(tsv_loader)
    assert images.shape == (5, 3, S, S) and tsv_loader.skips.as_dict() == {"missing_caption": 1}
    (tmp_path / "bad.csv").write_text("url,caption\nx.png,y\n")
    with pytest.raises(ValueError, match="image column"):
        build_dataset(str(tmp_path / "bad.csv"))
    (tmp_path / "empty.csv").write_text("filepath,caption\n")
    with pytest.raises(ValueError, match="no samples"):
        build_dataset(str(tmp_path / "empty.csv"))


# -------------------------------------------------------------------------------------------- errors

def test_dataset_spec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        build_dataset(str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError, match="no shards matched"):
        build_dataset(str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_dataset(str(tmp_path / "shards-{0000..0003}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        build_dataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no class subfolders"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "cats").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="imagefolder path not found"):
        build_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="unknown dataset spec 'laion'.*synthetic.*csv.*imagefolder"):
        build_dataset("laion")
    with pytest.raises(ValueError, match="positive integer"):
        build_dataset("synthetic:many")
    (tmp_path / "empty" / "cats" / "a.png").write_bytes(_png_bytes(_image(0)))
    with pytest.raises(TypeError, match="evaluation"):
        make_loader(f"imagefolder:{tmp_path / 'empty'}", global_batch=2)


def test_skip_counter():
    c = SkipCounter()
    c.add("corrupt_image")
    c.update({"corrupt_image": 2, "missing_file": 1})
    c.update(SkipCounter({"missing_file": 1}))
    assert c.total == 5 and c["corrupt_image"] == 3 and c["nothing"] == 0
    assert c == {"corrupt_image": 3, "missing_file": 2}
    assert "corrupt_image=3" in repr(c)


# ---------------------------------------------------------------------------------------- eval sets

def test_imagefolder_zero_shot_set(tmp_path):
    for name, n in (("red_car", 3), ("blue_bus", 2)):
        _write_images(tmp_path / "val" / name, n)
    (tmp_path / "val" / "blue_bus" / "notes.txt").write_text("not an image")
    folder = build_dataset(f"imagefolder:{tmp_path / 'val'}")
    assert isinstance(folder, ImageFolder) and folder.class_names == ["blue bus", "red car"]
    zs = build_zero_shot_set(f"imagefolder:{tmp_path / 'val'}", S, batch_size=2)
    assert zs.class_names == ["blue bus", "red car"] and zs.templates is None
    assert zs.labels.tolist() == [0, 0, 1, 1, 1]
    batches = list(zs.batches())
    assert [b[0].shape for b in batches] == [(2, 3, S, S), (2, 3, S, S), (1, 3, S, S)]
    assert torch.equal(torch.cat([b[1] for b in batches]), zs.labels)
    expected = EvalTransform(S)(Image.open(folder.paths[0]).convert("RGB"))
    assert torch.allclose(batches[0][0][0], expected)


def test_synthetic_zero_shot_and_segmentation_sets():
    images, labels, class_names, templates = build_zero_shot_set(None, S, num_samples=40)
    assert images.shape == (40, 3, S, S) and labels.shape == (40,) and labels.dtype == torch.long
    assert class_names == list(COLOURS) and len(set(labels.tolist())) >= 6
    assert build_zero_shot_set("synthetic:8", S).images.shape[0] == 8
    ds = SyntheticShapes(40, S, split="val", max_objects=1)
    assert torch.equal(images[5], to_tensor(ds[5]["image"]))
    seg = build_segmentation_set(6, S)
    assert seg.images.shape == (6, 3, S, S) and seg.masks.shape == (6, S, S) and seg.masks.dtype == torch.long
    assert seg.class_names[0] == "background" and len(seg.class_names) == 9
    assert 0 <= seg.masks.min() and seg.masks.max() < 9 and (seg.masks > 0).any()
    assert [t(name) for t in seg.templates for name in ("background", "orange")] == [
        "the background.", "an orange shape."]
    with pytest.raises(ValueError, match="zero-shot"):
        build_zero_shot_set("/data/x.csv", S)

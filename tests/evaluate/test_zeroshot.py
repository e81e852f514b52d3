"""Zero-shot benchmarks in their class-folder layouts, and evaluate_zeroshot against ZeroShotClassifier."""
import pytest
import torch

from dinotxt_fast.evaluate import (
    DatasetError, evaluate_zeroshot, imagenet_classes, imagenet_subset_wnids, zeroshot_dataset,
)
from dinotxt_fast.inference import ZeroShotClassifier
from dinotxt_fast.inference.images import classification_transform, load_image
from tests.inference.tiny_model import make_tiny

from .layouts import class_folders


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def test_vendored_imagenet_metadata():
    wnids, names = imagenet_classes()
    assert len(wnids) == len(set(wnids)) == len(names) == 1000 and wnids == sorted(wnids)
    assert (wnids[0], names[0]) == ("n01440764", "tench")
    assert (wnids[207], names[207]) == ("n02099601", "Golden Retriever")
    assert (wnids[999], names[999]) == ("n15075141", "toilet paper")
    for subset in ("imagenet-a", "imagenet-r"):
        kept = imagenet_subset_wnids(subset)
        assert len(kept) == len(set(kept)) == 200 and set(kept) <= set(wnids)
        assert kept == sorted(kept)
    assert imagenet_subset_wnids("imagenet-a")[0] == "n01498041"  # stingray, ImageNet-A's class 0
    assert imagenet_subset_wnids("imagenet-r")[0] == "n01443537"  # goldfish, ImageNet-R's class 0


def test_imagenet_val_layout(tmp_path):
    wnids, names = imagenet_classes()
    folders = [wnids[0], wnids[1], wnids[999]]
    written = class_folders(tmp_path / "val", folders)
    ds = zeroshot_dataset("imagenet", tmp_path)
    assert ds.num_classes == 1000 and ds.class_names == names
    assert [str(p) for p in ds.paths] == [str(p) for p, _ in written]
    assert ds.labels == [wnids.index(f) for _, f in written]
    same = zeroshot_dataset("imagenet", tmp_path / "val")  # the split folder itself
    assert same.paths == ds.paths


def test_imagenet_layout_errors(tmp_path):
    class_folders(tmp_path / "val", ["n01440764", "cats"])
    with pytest.raises(DatasetError, match="cats is not an ImageNet-1k class"):
        zeroshot_dataset("imagenet", tmp_path)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(DatasetError, match="no class folders in .*flat .*class-folder layout"):
        zeroshot_dataset("imagenet", flat)
    empty = tmp_path / "empty" / "val" / "n01440764"
    empty.mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        zeroshot_dataset("imagenet", tmp_path / "empty")


@pytest.mark.parametrize("variant", ["imagenet-a", "imagenet-r"])
def test_imagenet_subsets(tmp_path, variant):
    wnids, names = imagenet_classes()
    kept = imagenet_subset_wnids(variant)
    class_folders(tmp_path / variant, kept[:2], suffix=".jpg")
    ds = zeroshot_dataset(variant, tmp_path)
    assert ds.num_classes == 200 and ds.class_names[0] == names[wnids.index(kept[0])]
    assert ds.labels == [0, 0, 1, 1]
    outsider = next(w for w in wnids if w not in kept)
    class_folders(tmp_path / variant, [outsider], suffix=".jpg")
    with pytest.raises(DatasetError, match=f"{outsider} is not one of the 200 {variant} classes"):
        zeroshot_dataset(variant, tmp_path)


def test_imagefolder(tmp_path):
    class_folders(tmp_path / "val", ["golden_retriever", "tabby_cat"], suffix=".png")
    ds = zeroshot_dataset("imagefolder", tmp_path)
    assert ds.class_names == ["golden retriever", "tabby cat"] and ds.labels == [0, 0, 1, 1]
    named = zeroshot_dataset("imagefolder", tmp_path, class_names=["dog", "cat"])
    assert named.class_names == ["dog", "cat"]
    with pytest.raises(DatasetError, match="3 class names for 2 class folders"):
        zeroshot_dataset("imagefolder", tmp_path, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="only applies to imagefolder"):
        zeroshot_dataset("imagenet", tmp_path, class_names=["a"])


def test_evaluate_matches_the_classifier(tmp_path, tiny):
    class_folders(tmp_path, ["dog", "cat", "car"], per_class=3, suffix=".jpg")
    ds = zeroshot_dataset("imagefolder", tmp_path)
    result = evaluate_zeroshot(tiny, ds, templates="simple", resize=32, crop=28, batch_size=4, num_workers=0,
                               progress=False)
    clf = ZeroShotClassifier(tiny, ds.class_names, "simple", progress=False)
    images = torch.stack([classification_transform(load_image(p), resize_size=32, crop_size=28) for p in ds.paths])
    labels = torch.tensor(ds.labels)
    with torch.no_grad():
        top = clf(images).topk(3, dim=1).indices
    assert result["top1"] == pytest.approx((top[:, 0] == labels).float().mean().item())
    assert result["top5"] == 1.0  # 3 classes: always within the top 5
    for c, name in enumerate(ds.class_names):
        mine = labels == c
        assert result["per_class_accuracy"][name] == pytest.approx((top[mine, 0] == c).float().mean().item())
    assert result["num_images"] == 9 and result["num_classes"] == 3
    assert result["preprocessing"]["resize"] == 32 and result["preprocessing"]["crop"] == 28


def test_release_preprocessing_and_duplicate_names(tmp_path, tiny):
    wnids, _ = imagenet_classes()
    class_folders(tmp_path / "val", [wnids[744], wnids[836]], per_class=1)
    ds = zeroshot_dataset("imagenet", tmp_path)
    result = evaluate_zeroshot(tiny, ds, templates="none", num_workers=0, progress=False, limit=1)
    assert result["preprocessing"]["resize"] == 256 and result["preprocessing"]["crop"] == 224  # v2 release
    acc = result["per_class_accuracy"]
    assert len(acc) == 1000 and "missile [657]" in acc and "missile [744]" in acc and "sunglasses [836]" in acc
    assert acc["missile [744]"] in (0.0, 1.0) and acc["missile [657]"] is None and acc["tench"] is None
    assert result["num_images"] == 1


def test_unreadable_image_is_one_line(tmp_path, tiny):
    written = class_folders(tmp_path, ["dog", "cat"], suffix=".jpg")
    broken = written[1][0]
    broken.write_bytes(b"\x00not an image")
    ds = zeroshot_dataset("imagefolder", tmp_path)
    with pytest.raises(DatasetError) as exc:
        evaluate_zeroshot(tiny, ds, templates="none", resize=32, crop=28, num_workers=1, progress=False)
    assert str(broken) in str(exc.value) and "\n" not in str(exc.value)

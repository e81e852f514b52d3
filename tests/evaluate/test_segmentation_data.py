"""Each segmentation benchmark read from its standard layout, and the one-line errors for broken ones."""
import numpy as np
import pytest
import torch
from PIL import Image

from dinotxt_fast.evaluate import (
    SEGMENTATION_DATASETS, DatasetError, evaluate_segmentation, segmentation_class_names, segmentation_dataset,
)
from dinotxt_fast.evaluate.files import LoadFailure
from dinotxt_fast.evaluate.segmentation_data import image_input
from dinotxt_fast.inference import load_image_tensor

from .layouts import SIZES, save_mask, write_segmentation

NUM_CLASSES = {"ade20k": 150, "cityscapes": 19, "voc20": 20, "voc21": 21, "context59": 59, "context60": 60,
               "coco-stuff": 171}


@pytest.mark.parametrize("name", SEGMENTATION_DATASETS)
def test_layout_reads_images_and_mapped_targets(tmp_path, name):
    expected = write_segmentation(name, tmp_path)
    ds = segmentation_dataset(name, tmp_path)
    assert len(ds) == len(SIZES) and ds.num_classes == NUM_CLASSES[name]
    assert ds.class_names == segmentation_class_names(name)
    for i, (h, w) in enumerate(SIZES):
        item = ds[i]
        assert not isinstance(item, LoadFailure), item
        assert item["image"].shape == (3, h, w) and item["image"].dtype == torch.uint8
        assert item["target"].dtype == torch.int64
        assert np.array_equal(item["target"].numpy(), expected[i]), name
    # The model input made from the uint8 image is exactly what inference's own loader gives.
    assert torch.equal(image_input(ds[0]["image"]), load_image_tensor(ds.samples[0].image))


def test_class_names_as_published():
    ade = segmentation_class_names("ade20k")
    assert ade[:3] == ["wall", "building", "sky"] and ade[7] == "bed" and ade[-1] == "flag"
    assert segmentation_class_names("cityscapes")[-1] == "bicycle"
    assert segmentation_class_names("voc21")[:2] == ["background", "aeroplane"]
    assert segmentation_class_names("voc20")[0] == "aeroplane"
    assert segmentation_class_names("context60")[0] == "background"
    assert segmentation_class_names("context59")[-1] == "wood"
    stuff = segmentation_class_names("coco-stuff")
    assert stuff[0] == "person" and stuff[80] == "banner" and stuff[90] == "ceiling-other" and stuff[-1] == "wood"
    for name, n in NUM_CLASSES.items():
        names = segmentation_class_names(name)
        assert len(names) == n and len(set(names)) == n


def test_root_may_include_the_top_folder(tmp_path):
    write_segmentation("ade20k", tmp_path)
    a = segmentation_dataset("ade20k", tmp_path)
    b = segmentation_dataset("ade20k", tmp_path / "ADEChallengeData2016")
    assert a.root == b.root and len(a) == len(b)
    write_segmentation("voc21", tmp_path)
    assert len(segmentation_dataset("voc21", tmp_path / "VOCdevkit" / "VOC2012")) == len(SIZES)


def test_class_names_override(tmp_path):
    write_segmentation("voc20", tmp_path)
    names = [f"class {i}" for i in range(20)]
    assert segmentation_dataset("voc20", tmp_path, class_names=names).class_names == names
    with pytest.raises(ValueError, match="20 classes but 3 class names"):
        segmentation_dataset("voc20", tmp_path, class_names=["a", "b", "c"])


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_split_folder(tmp_path):
    write_segmentation("ade20k", tmp_path)
    with pytest.raises(DatasetError) as exc:
        segmentation_dataset("ade20k", tmp_path, split="training")
    assert "images/training" in one_line(exc)
    with pytest.raises(DatasetError, match="root folder not found"):
        segmentation_dataset("cityscapes", tmp_path / "nowhere")
    write_segmentation("voc21", tmp_path)
    with pytest.raises(DatasetError) as exc:
        segmentation_dataset("voc21", tmp_path, split="test")
    assert "ImageSets/Segmentation/test.txt" in one_line(exc)


def test_image_without_annotation(tmp_path):
    write_segmentation("coco-stuff", tmp_path)
    ann = tmp_path / "coco_stuff164k" / "annotations" / "val2017" / "000000000140_labelTrainIds.png"
    ann.unlink()
    with pytest.raises(DatasetError) as exc:
        segmentation_dataset("coco-stuff", tmp_path)
    text = one_line(exc)
    assert "000000000140.jpg has no annotation" in text and str(ann) in text


def test_cityscapes_image_without_annotation(tmp_path):
    write_segmentation("cityscapes", tmp_path)
    (tmp_path / "cityscapes/gtFine/val/bremen/bremen_000002_000019_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(DatasetError) as exc:
        segmentation_dataset("cityscapes", tmp_path)
    assert "bremen_000002_000019_leftImg8bit.png has no annotation" in one_line(exc)


def test_split_file_naming_a_missing_image(tmp_path):
    write_segmentation("context59", tmp_path)
    split = tmp_path / "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"
    split.write_text(split.read_text() + "2010_999999\n")
    with pytest.raises(DatasetError) as exc:
        segmentation_dataset("context59", tmp_path)
    assert "2010_999999.jpg" in one_line(exc)


def test_empty_dataset(tmp_path):
    for sub in ("images", "annotations"):
        (tmp_path / "ADEChallengeData2016" / sub / "validation").mkdir(parents=True)
    with pytest.raises(DatasetError) as exc:
        segmentation_dataset("ade20k", tmp_path)
    assert "no images found" in one_line(exc)
    with pytest.raises(DatasetError, match="split file .*val.txt is empty"):
        base = tmp_path / "VOCdevkit" / "VOC2012"
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (base / sub).mkdir(parents=True)
        (base / "ImageSets/Segmentation/val.txt").write_text("\n")
        segmentation_dataset("voc20", tmp_path)


def stub(images):
    return [torch.zeros(img.shape[1:], dtype=torch.int64) for img in images]


@pytest.mark.parametrize("workers", [0, 1])
def test_annotation_of_the_wrong_size(tmp_path, workers):
    write_segmentation("ade20k", tmp_path)
    ann = tmp_path / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    save_mask(ann, np.ones((10, 12), dtype=np.int64))
    ds = segmentation_dataset("ade20k", tmp_path)
    with pytest.raises(DatasetError) as exc:  # the worker's failure arrives as the same single line
        evaluate_segmentation(None, ds, predictor=stub, num_workers=workers, progress=False)
    text = one_line(exc)
    assert f"annotation {ann} is 12x10 but its image" in text and "ADE_val_00000002.jpg is 40x56" in text


@pytest.mark.parametrize("name,value", [("ade20k", 151), ("cityscapes", 34), ("voc21", 21), ("context60", 60),
                                        ("coco-stuff", 171)])
def test_label_out_of_range(tmp_path, name, value):
    write_segmentation(name, tmp_path)
    ds = segmentation_dataset(name, tmp_path)
    sample = ds.samples[1]
    raw = np.array(Image.open(sample.annotation))
    raw[2, 3] = value
    save_mask(sample.annotation, raw)
    item = ds[1]
    assert isinstance(item, LoadFailure)
    assert f"annotation {sample.annotation} has label value(s) {value} outside the valid values" in item.message
    with pytest.raises(DatasetError) as exc:
        evaluate_segmentation(None, ds, predictor=stub, num_workers=0, progress=False)
    assert str(sample.annotation) in one_line(exc)


def test_unreadable_image(tmp_path):
    write_segmentation("voc20", tmp_path)
    image = tmp_path / "VOCdevkit/VOC2012/JPEGImages/2007_000000.jpg"
    image.write_bytes(b"not a jpeg")
    ds = segmentation_dataset("voc20", tmp_path)
    with pytest.raises(DatasetError) as exc:
        evaluate_segmentation(None, ds, predictor=stub, num_workers=0, progress=False)
    assert str(image) in one_line(exc)

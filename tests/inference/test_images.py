"""Image loading and the classification transform: values, sizes and errors that name the file."""
import numpy as np
import pytest
import torch
from PIL import Image

from dinotxt_fast.inference import (
    IMAGENET_MEAN, IMAGENET_STD, classification_transform, load_image, load_image_tensor, load_label_mask,
)
from dinotxt_fast.inference.images import center_crop, resize_short_side


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

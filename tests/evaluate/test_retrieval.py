"""Karpathy-split retrieval sets, and evaluate_retrieval against brute-force ranking of the model's embeddings."""
import json

import pytest
import torch
import torch.nn.functional as F

from dinotxt_fast.evaluate import DatasetError, evaluate_retrieval, karpathy_dataset
from dinotxt_fast.inference.images import classification_transform, load_image
from dinotxt_fast.models.tokenizer import tokenize
from tests.inference.tiny_model import make_tiny

from .layouts import karpathy


@pytest.mark.parametrize("name", ["coco", "flickr30k"])
def test_karpathy_layout(tmp_path, name):
    karpathy(tmp_path, name, num_images=4)
    ds = karpathy_dataset(name, tmp_path)
    assert len(ds) == 4  # the train image is left out
    assert all(len(c) == 5 for c in ds.captions)  # the first 5 captions, also for images with 6
    assert ds.captions[1][0] == "a photo of a cat number 0."
    assert len(ds.texts) == 20 and ds.text_to_image.tolist() == [i for i in range(4) for _ in range(5)]
    folder = "val2014" if name == "coco" else "flickr30k-images"
    assert all(p.parent.name == folder and p.is_file() for p in ds.paths)
    assert len(karpathy_dataset(name, tmp_path, split="train")) == 1


def test_karpathy_errors(tmp_path):
    with pytest.raises(DatasetError, match="Karpathy split file not found"):
        karpathy_dataset("coco", tmp_path)
    ann = karpathy(tmp_path, "coco", num_images=2)
    (tmp_path / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    with pytest.raises(DatasetError, match="image not found: .*COCO_val2014_000000000001.jpg"):
        karpathy_dataset("coco", tmp_path)
    data = json.loads(ann.read_text())
    data["images"][0]["sentences"] = data["images"][0]["sentences"][:3]
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"images\[0\] .* has 3 captions, fewer than 5"):
        karpathy_dataset("coco", tmp_path, annotations=ann)
    ann.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetError, match="no 'images' list"):
        karpathy_dataset("coco", tmp_path)
    ann.write_text("{broken")
    with pytest.raises(DatasetError, match="cannot read"):
        karpathy_dataset("coco", tmp_path)


def test_evaluate_matches_brute_force(tmp_path):
    tiny = make_tiny()
    karpathy(tmp_path, "flickr30k", num_images=6)
    ds = karpathy_dataset("flickr30k", tmp_path)
    result = evaluate_retrieval(tiny, ds, resize=32, crop=28, batch_size=4, num_workers=0, progress=False)
    images = torch.stack([classification_transform(load_image(p), resize_size=32, crop_size=28) for p in ds.paths])
    with torch.no_grad():
        img = F.normalize(tiny.encode_image(images), dim=-1)
        txt = F.normalize(tiny.encode_text(tokenize(ds.texts)), dim=-1)
    sims = img @ txt.T
    owner = ds.text_to_image
    for k in (1, 5, 10):
        i2t = sum(bool((owner[sims[i].topk(k).indices] == i).any()) for i in range(len(ds))) / len(ds)
        t2i = sum(bool((sims[:, t].topk(min(k, len(ds))).indices == owner[t]).any())
                  for t in range(len(owner))) / len(owner)
        assert result["image_to_text"][f"R@{k}"] == pytest.approx(i2t)
        assert result["text_to_image"][f"R@{k}"] == pytest.approx(t2i)
    assert result["num_images"] == 6 and result["num_texts"] == 30 and result["task"] == "retrieval"
    assert result["text_to_image"]["R@10"] == 1.0  # only 6 images

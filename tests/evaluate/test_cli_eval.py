"""`dinotxt-fast eval` on tiny official-layout weight files: the JSON equals the Python API's result."""
import json

import pytest

from dinotxt_fast import cli
from dinotxt_fast import evaluate as ev
from dinotxt_fast.models.dinotxt import create_model
from tests.inference.tiny_model import TINY, make_tiny

from .layouts import class_folders, karpathy, write_segmentation

OVERRIDES = [arg for k, v in TINY.items() for arg in ("--override", f"{k}={v}")]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    make_tiny().export_official(root)
    files = {n: root / f"{n}.pth" for n in ("backbone", "vision_head", "text_encoder")}
    model = create_model("dinov2_vitl14_reg4_dinotxt", **TINY).load_official(**files).eval()
    args = ["--backbone", files["backbone"], "--vision-head", files["vision_head"], "--text-encoder",
            files["text_encoder"], "--device", "cpu", "--workers", "0", "--no-progress", *OVERRIDES]
    return model, [str(a) for a in args]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_segmentation(tmp_path, capsys, release):
    model, weights = release
    write_segmentation("ade20k", tmp_path)
    out = tmp_path / "res" / "ade.json"
    code, stdout, err = run(capsys, "eval", "segmentation", "--dataset", "ade20k", "--root", tmp_path,
                            "--short-side", "28", "--window", "28", "--stride", "14", "--templates", "none",
                            "--limit", "2", "--out", out, *weights)
    assert code == 0, err
    saved = json.loads(out.read_text())
    api = ev.evaluate_segmentation(model, ev.segmentation_dataset("ade20k", tmp_path), short_side=28, window=28,
                                   stride=14, templates="none", limit=2, num_workers=0, progress=False)
    assert saved["miou"] == pytest.approx(api["miou"]) and saved["num_images"] == 2
    assert saved["per_class_iou"] == pytest.approx(api["per_class_iou"])
    assert saved["model"]["preset"] == "dinov2_vitl14_reg4_dinotxt"
    assert set(saved["model"]["files"]) == {"backbone", "vision_head", "text_encoder"}
    assert all(len(f["sha256"]) == 64 for f in saved["model"]["files"].values())
    assert "ade20k validation: mIoU" in stdout and (tmp_path / "res" / "ade.md").is_file()


def test_zeroshot_imagefolder_with_classes_file(tmp_path, capsys, release):
    model, weights = release
    class_folders(tmp_path / "data", ["a", "b"], suffix=".png")
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n")
    out = tmp_path / "zs.json"
    code, stdout, err = run(capsys, "eval", "zeroshot", "--dataset", "imagefolder", "--root", tmp_path / "data",
                            "--classes-file", names, "--templates", "simple", "--resize", "32", "--crop", "28",
                            "--out", out, *weights)
    assert code == 0, err
    saved = json.loads(out.read_text())
    api = ev.evaluate_zeroshot(model, ev.zeroshot_dataset("imagefolder", tmp_path / "data", class_names=["dog", "cat"]),
                               templates="simple", resize=32, crop=28, num_workers=0, progress=False)
    assert saved["top1"] == api["top1"] and list(saved["per_class_accuracy"]) == ["dog", "cat"]
    assert "imagefolder: top-1" in stdout


def test_retrieval(tmp_path, capsys, release):
    _, weights = release
    karpathy(tmp_path, "coco", num_images=3)
    code, stdout, err = run(capsys, "eval", "retrieval", "--dataset", "coco", "--root", tmp_path, "--resize", "32",
                            "--crop", "28", "--out", tmp_path / "r.json", *weights)
    assert code == 0, err
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["num_images"] == 3 and saved["num_texts"] == 15
    assert set(saved["image_to_text"]) == {"R@1", "R@5", "R@10"}
    assert all(0.0 <= v <= 1.0 for d in (saved["image_to_text"], saved["text_to_image"]) for v in d.values())


def test_errors_are_one_line(tmp_path, capsys, release):
    _, weights = release
    code, _, err = run(capsys, "eval", "segmentation", "--dataset", "ade20k", "--root", tmp_path, *weights)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("dinotxt-fast eval: error: ade20k: missing ") and "images/validation" in err
    code, _, err = run(capsys, "eval", "zeroshot", "--dataset", "imagenet", "--root", tmp_path)
    assert code == 2 and "model weights are required" in err
    code, _, err = run(capsys, "eval", "retrieval", "--dataset", "coco", "--root", tmp_path, "--out", "x.txt",
                       *weights)
    assert code == 2 and "--out must be a .json file" in err


def test_zeroshot_with_a_model_folder(tmp_path, capsys, release):
    """--model DIR: the same result as the official files of the same model; the folder's files are recorded."""
    model, weights = release
    model.save_pretrained(tmp_path / "folder")
    class_folders(tmp_path / "data", ["a", "b"], suffix=".png")
    common = ["eval", "zeroshot", "--dataset", "imagefolder", "--root", tmp_path / "data", "--templates", "none",
              "--resize", "32", "--crop", "28", "--workers", "0", "--no-progress"]
    code, _, err = run(capsys, *common, "--out", tmp_path / "folder.json", "--model", tmp_path / "folder")
    assert code == 0, err
    code, _, err = run(capsys, *common, "--out", tmp_path / "files.json", *weights)
    assert code == 0, err
    folder, files = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("folder", "files"))
    assert folder["top1"] == files["top1"] and folder["model"]["config"] == files["model"]["config"]
    assert folder["model"]["preset"] == "dinov2_vitl14_reg4_dinotxt"
    assert set(folder["model"]["files"]) == {"config", "model"}
    assert folder["model"]["files"]["model"]["path"] == str((tmp_path / "folder" / "model.safetensors").resolve())
    assert all(len(f["sha256"]) == 64 for f in folder["model"]["files"].values())

"""The dinotxt-fast CLI on tiny official-layout weight files (CPU)."""
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinotxt_fast import cli
from dinotxt_fast.inference import (
    ZeroShotClassifier,
    load_classification_batch,
    load_image_tensor,
    mean_iou,
    segment,
)
from dinotxt_fast.models.dinotxt import create_model
from dinotxt_fast.models.tokenizer import tokenize
from tests.inference.tiny_model import TINY, make_tiny

OVERRIDES = [arg for k, v in TINY.items() for arg in ("--override", f"{k}={v}")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny v2 release files, two images and a label mask; the model they hold, reloaded as the CLI does."""
    root = tmp_path_factory.mktemp("cli")
    make_tiny().export_official(root)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (80, 50, 3), dtype=np.uint8)).save(root / "b.jpg")
    Image.fromarray(rng.integers(0, 3, (60, 90), dtype=np.uint8)).save(root / "gt.png")
    loaded = create_model("dinov2_vitl14_reg4_dinotxt", **TINY).load_official(
        backbone=root / "backbone.pth", vision_head=root / "vision_head.pth",
        text_encoder=root / "text_encoder.pth").eval()
    weights = ["--backbone", str(root / "backbone.pth"), "--vision-head", str(root / "vision_head.pth"),
               "--text-encoder", str(root / "text_encoder.pth"), "--device", "cpu", *OVERRIDES]
    return {"root": root, "weights": weights, "model": loaded}


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_reports_versions_and_backends(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert "torch" in out and "triton" in out and "_C extension" in out
    assert "backends:" in out and "available" in out
    code, out, _ = run(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0 and info["torch"] == torch.__version__
    assert info["backends"]["torch"]["available"] is True
    assert isinstance(info["extension"]["built"], bool)
    assert info["extension"]["built"] or info["extension"]["reason"]
    assert "attention" in info["backends"]["torch"]["ops"]
    from dinotxt_fast.ops import dispatch
    assert info["measured_dispatch"]["entries"] == len(dispatch._measured_entries())


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "info" in out and "segment" in out


def test_encode_images_and_texts(capsys, files):
    root, model = files["root"], files["model"]
    out_file = root / "emb.npz"
    code, out, err = run(capsys, "encode", root / "a.png", root / "b.jpg", "--text", "a dog", "--text", "sky",
                         "-o", out_file, "--normalize", *files["weights"])
    assert code == 0, err
    assert "2 image and 2 text embeddings" in out
    saved = np.load(out_file)
    images = load_classification_batch([root / "a.png", root / "b.jpg"])
    with torch.no_grad():
        expected_img = model.encode_image(images, normalize=True)
        expected_txt = model.encode_text(tokenize(["a dog", "sky"]), normalize=True)
    np.testing.assert_allclose(saved["image"], expected_img.numpy(), atol=1e-5)
    np.testing.assert_allclose(saved["text"], expected_txt.numpy(), atol=1e-5)

    code, _, err = run(capsys, "encode", "--text", "a dog", "-o", root / "t.pt", *files["weights"])
    assert code == 0, err
    blob = torch.load(root / "t.pt")
    assert blob["texts"] == ["a dog"] and blob["text_embeddings"].shape == (1, 128)
    assert "image_embeddings" not in blob

    code, _, err = run(capsys, "encode", root / "a.png", "--text", "x", "-o", root / "both.npy", *files["weights"])
    assert code == 2 and ".npz or .pt" in err


def test_classify_matches_zero_shot_classifier(capsys, files):
    root, model = files["root"], files["model"]
    names = ["dog", "cat", "traffic light"]
    code, out, err = run(capsys, "classify", root / "a.png", root / "b.jpg", "--classes", ",".join(names),
                         "--templates", "simple", "--top-k", "2", "--json", *files["weights"])
    assert code == 0, err
    results = json.loads(out)
    clf = ZeroShotClassifier(model, names, templates="simple")
    probs, idx = clf.topk(load_classification_batch([root / "a.png", root / "b.jpg"]), k=2)
    for r, p_row, i_row in zip(results, probs.tolist(), idx.tolist()):
        assert [t["class"] for t in r["top"]] == [names[i] for i in i_row]
        np.testing.assert_allclose([t["probability"] for t in r["top"]], p_row, atol=1e-5)

    code, out, err = run(capsys, "classify", root / "a.png", "--classes", ",".join(names), "--templates", "none",
                         "--dtype", "bfloat16", "--json", *files["weights"])
    assert code == 0, err
    top = json.loads(out)[0]["top"]
    assert sorted(t["class"] for t in top) == sorted(names)
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)  # fp32 softmax under autocast

    (root / "classes.txt").write_text("dog\n\ncat\n")
    code, out, err = run(capsys, "classify", root / "a.png", "--classes-file", root / "classes.txt",
                         "--templates", "none", *files["weights"])
    assert code == 0, err
    assert "a.png" in out and "dog" in out and "cat" in out and "%" in out


def test_segment_writes_overlay_labels_and_miou(capsys, files):
    root, model = files["root"], files["model"]
    names = ["dog", "cat", "sky"]
    overlay, labels_png = root / "seg.png", root / "labels.png"
    code, out, err = run(capsys, "segment", root / "a.png", "--classes", ",".join(names), "--templates", "none",
                         "--short-side", "64", "--window", "32", "--stride", "16", "-o", overlay,
                         "--labels-out", labels_png, "--gt", root / "gt.png", *files["weights"])
    assert code == 0, err
    png = Image.open(overlay)
    assert png.format == "PNG" and png.width > 90 and png.height >= 60  # image + legend panel
    labels = torch.from_numpy(np.array(Image.open(labels_png))).long()
    expected = segment(model, [load_image_tensor(root / "a.png")], names, templates="none", short_side=64,
                       window=32, stride=16)[0]
    assert torch.equal(labels, expected)
    gt = torch.from_numpy(np.array(Image.open(root / "gt.png"))).long()
    miou, _ = mean_iou(expected, gt, 3)
    assert f"mIoU: {100 * miou:.2f}" in out

    code, out, err = run(capsys, "segment", root / "a.png", "--classes", "dog,cat", "--templates", "none",
                         "--mode", "whole", "--short-side", "none", "-o", root / "whole.png", *files["weights"])
    assert code == 0, err
    assert Image.open(root / "whole.png").height >= 60


def test_missing_weights_is_a_clear_error(capsys, files):
    root = files["root"]
    code, _, err = run(capsys, "classify", root / "a.png", "--classes", "dog", "--backbone", root / "backbone.pth")
    assert code == 2
    assert "--vision-head" in err and "--text-encoder" in err and "nothing is downloaded" in err
    code, _, err = run(capsys, "segment", root / "a.png", "--classes", "dog", "--preset", "dinov3_vitl16_dinotxt",
                       "--backbone", root / "backbone.pth")
    assert code == 2 and "--weights" in err
    code, _, err = run(capsys, "encode", "--text", "x", "-o", root / "x.npy", "--backbone", root / "nope.pth",
                       "--vision-head", root / "vision_head.pth", "--text-encoder", root / "text_encoder.pth")
    assert code == 2 and "nope.pth" in err


def test_bad_inputs_are_clear_errors(capsys, files):
    root, weights = files["root"], files["weights"]
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not a jpeg")
    code, _, err = run(capsys, "classify", corrupt, "--classes", "dog", *weights)
    assert code == 1 and "corrupt.jpg" in err
    code, _, err = run(capsys, "classify", root / "a.png", *weights)
    assert code == 2 and "--classes" in err
    code, _, err = run(capsys, "classify", root / "a.png", "--classes", "a", "--classes-file", root / "gt.png",
                       *weights)
    assert code == 2 and "not both" in err
    code, _, err = run(capsys, "segment", root / "b.jpg", "--classes", "a,b", "--gt", root / "gt.png", *weights)
    assert code == 2 and "gt.png" in err and "50x80" in err
    code, _, err = run(capsys, "encode", "--text", "x", "-o", root / "x.npy", "--override", "depth=3", *weights)
    assert code == 2 and "depth" in err
    code, _, err = run(capsys, "encode", "-o", root / "x.npy", *weights)
    assert code == 2 and "nothing to encode" in err


def test_dinov3_release_file(capsys, tmp_path):
    torch.manual_seed(0)
    model = create_model("dinov3_vitl16_dinotxt", **{k: v for k, v in TINY.items() if k != "pos_embed_grid"})
    model.export_official(tmp_path)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
    overrides = [a for k, v in TINY.items() if k != "pos_embed_grid" for a in ("--override", f"{k}={v}")]
    code, out, err = run(capsys, "classify", tmp_path / "x.png", "--classes", "dog,cat", "--templates", "none",
                         "--preset", "dinov3_vitl16_dinotxt", "--backbone", tmp_path / "backbone.pth",
                         "--weights", tmp_path / "weights.pth", *overrides)
    assert code == 0, err
    assert "dog" in out and "cat" in out


def test_a_command_module_plugs_in(capsys, monkeypatch):
    """A command is a module with add_parser(subparsers) and run(args), listed once in cli.COMMANDS."""
    def add_parser(sub):
        p = sub.add_parser("hello")
        p.add_argument("--name", default="world")
        return p

    hello = types.SimpleNamespace(add_parser=add_parser, run=lambda args: print(f"hello {args.name}") or 0)
    with monkeypatch.context() as patch:
        patch.setattr(cli, "COMMANDS", (*cli.COMMANDS, hello))
        code, out, _ = run(capsys, "hello", "--name", "dino")
        assert code == 0 and out.strip() == "hello dino"
    names = {command.__name__.rpartition(".")[2] for command in cli.COMMANDS}
    assert names >= {"info", "encode", "classify", "segment"}


def test_backend_flag_routes_the_ops(capsys, files, monkeypatch):
    """--backend triton runs classify on the Triton kernels (CPU interpreter here): same top classes; the choice is
    scoped to the command (use_backend), not written into the process environment."""
    from dinotxt_fast import ops
    from dinotxt_fast.ops import dispatch

    monkeypatch.setenv(ops.ENV_VAR, "torch")
    ran = []
    get_kernel = dispatch.get_kernel
    monkeypatch.setattr(dispatch, "get_kernel", lambda backend, kernel: ran.append(backend) or get_kernel(backend, kernel))
    root, names = files["root"], ["dog", "cat", "traffic light"]
    args = ("classify", root / "a.png", "--classes", ",".join(names), "--templates", "none", "--json",
            *files["weights"])
    code, out, err = run(capsys, *args, "--backend", "torch")
    assert code == 0, err
    assert set(ran) == {"torch"}
    ran.clear()
    code, out_triton, err = run(capsys, *args, "--backend", "triton")
    assert code == 0, err
    assert ran and set(ran) == {"triton"}
    assert os.environ[ops.ENV_VAR] == "torch"
    want, got = json.loads(out)[0]["top"], json.loads(out_triton)[0]["top"]
    assert [t["class"] for t in got] == [t["class"] for t in want]
    np.testing.assert_allclose([t["probability"] for t in got], [t["probability"] for t in want], atol=1e-4)


# ------------------------------------------------------------------------------------ the model folder (--model)
# tests/train/test_loop.py's SMALL config: a 32-wide model on 32 px images, trained for 2 steps.
TRAIN_TINY = ["batch_size=8", "steps=2", "model.vision_dim=32", "model.text_dim=32", "image_size=32",
              "data=synthetic:16", "eval_data=null", "log_every=1", "device=cpu"]


def console(*argv, timeout=300):
    """The console script (`dinotxt-fast`, i.e. dinotxt_fast.cli:main) in a subprocess: (exit code, out, err)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dinotxt_fast.cli", *[str(a) for a in argv]], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training run (its checkpoint and the model folder the trainer writes) and an image."""
    from dinotxt_fast.train import load_config, train

    root = tmp_path_factory.mktemp("trained")
    summary = train(load_config("tiny", TRAIN_TINY), root / "run", progress=False)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "img.png")
    return {"root": root, "ckpt": root / "run" / "checkpoints" / "last.pt", "run_model": Path(summary["model"]),
            "image": root / "img.png"}


def test_export_then_classify_and_segment_with_model_folder(trained):
    """The newcomer's flow through the console script: export a training checkpoint, then --model DIR is the one
    flag classify and segment need; the results are those of the trained model."""
    from dinotxt_fast import from_pretrained
    from dinotxt_fast.train.loop import load_trained_model

    out = trained["root"] / "export"
    code, stdout, err = console("export", trained["ckpt"], "--out", out)
    assert code == 0, err
    written = ["backbone.pth", "vision_head.pth", "text_encoder.pth", "config.json", "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    assert all(f"wrote {out / name}" in stdout for name in written)

    model, reference = from_pretrained(out), load_trained_model(trained["ckpt"])
    run_model = from_pretrained(trained["run_model"])  # the folder the trainer wrote at the end of the run
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value) and torch.equal(run_model.state_dict()[key], value), key

    names = ["red", "blue", "a tree"]
    code, stdout, err = console("classify", trained["image"], "--classes", ",".join(names), "--templates", "none",
                                "--json", "--resize", "32", "--crop", "32", "--model", out)
    assert code == 0, err
    probs, idx = ZeroShotClassifier(reference, names, templates="none").topk(
        load_classification_batch([trained["image"]], resize_size=32, crop_size=32), k=3)
    top = json.loads(stdout)[0]["top"]
    assert [t["class"] for t in top] == [names[i] for i in idx[0].tolist()]
    np.testing.assert_allclose([t["probability"] for t in top], probs[0].tolist(), atol=1e-5)

    overlay = trained["root"] / "seg.png"
    code, stdout, err = console("segment", trained["image"], "--classes", "red,blue", "--templates", "none",
                                "--short-side", "32", "--window", "32", "--stride", "16", "-o", overlay,
                                "--model", out)
    assert code == 0, err
    assert Image.open(overlay).format == "PNG" and "2 classes" in stdout


def test_model_folder_for_encode(capsys, trained):
    from dinotxt_fast import from_pretrained

    emb = trained["root"] / "emb.npz"
    code, _, err = run(capsys, "encode", trained["image"], "--text", "a dog", "-o", emb, "--resize", "32",
                       "--crop", "32", "--model", trained["run_model"])
    assert code == 0, err
    model = from_pretrained(trained["run_model"])
    with torch.no_grad():
        want = model.encode_text(tokenize(["a dog"], context_length=model.config.context_length))
    np.testing.assert_allclose(np.load(emb)["text"], want.numpy(), atol=1e-5)


def test_bad_model_folders_are_one_line_errors(capsys, trained, tmp_path):
    """Each bad --model is refused before any model is built, in one line naming the folder or file."""
    import shutil

    folder = trained["run_model"]
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(folder / "model.safetensors", no_config)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(folder / "config.json", corrupt)
    (corrupt / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-100])  # truncated
    other = tmp_path / "other"  # a folder whose config.json describes another model than its weights
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    config["config"]["text_layers"] += 1
    (other / "config.json").write_text(json.dumps(config))
    cases = [
        ([tmp_path / "missing"], "model folder not found", "missing"),
        ([no_config], "has no config.json", "no_config"),
        ([corrupt], "corrupt, truncated or not a safetensors file", "corrupt/model.safetensors"),
        ([other], "missing keys", "other/model.safetensors"),
        ([trained["image"]], "is not a model folder", "img.png"),
        ([folder, "--backbone", folder / "model.safetensors"], "drop --backbone", str(folder)),
        ([folder, "--override", "vision_dim=64"], "drop --override", str(folder)),
        ([folder, "--preset", "dinov3_vitl16_dinotxt"], "drop --preset", str(folder)),
    ]
    for model_args, message, names in cases:
        code, out, err = run(capsys, "classify", trained["image"], "--classes", "a,b", "--model", *model_args)
        assert code == 2 and message in err and names in err, (model_args, err)
        assert err.startswith("dinotxt-fast classify: error: --model") and out == ""
    # the console script: the exit code and a one-line stderr, no traceback
    code, out, err = console("segment", trained["image"], "--classes", "a,b", "--model", corrupt)
    assert code == 2 and err.count("\n") == 1 and "corrupt/model.safetensors" in err and "Traceback" not in err


def test_export_to_onnx(capsys, trained):
    pytest.importorskip("onnxruntime")
    out = trained["root"] / "onnx"
    code, stdout, err = run(capsys, "export", trained["run_model"], "--format", "onnx", "--out", out,
                            "--image-size", "32")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.onnx", "text_encoder.onnx"]
    assert f"wrote {out / 'image_encoder.onnx'}" in stdout and "onnxruntime check passed" in stdout
    code, _, err = run(capsys, "export", trained["ckpt"], "--out", out, "--image-size", "32")
    assert code == 2 and "apply to --format onnx" in err

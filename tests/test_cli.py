"""The dinotxt-fast CLI on tiny official-layout weight files (CPU)."""
import io
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
    assert f"mIoU: {100 * miou:.2f}%" in out  # percent only with its sign (files hold fractions)

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
              "data=synthetic:16", "eval_data=null", "backbone_weights=null", "log_every=1", "device=cpu"]


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


# ------------------------------------------------------------------- a newcomer's first hour (issue #16)
REPO = Path(__file__).resolve().parents[1]


def one_line_error(code, err, expected_code, *needles):
    """An error the way a command-line user expects it: the exit code, one line on stderr, no traceback."""
    assert code == expected_code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_readme_installs_cpu_torch_before_the_main_job():
    """Copied top to bottom on a CPU machine, the README installs CPU torch first, then the package and the main
    job, and says what the main job is and what a good result looks like."""
    text = (REPO / "README.md").read_text()
    setup = text[text.index("## Set up and run"):text.index("## Quick start")]
    cpu_torch, main_job = setup.index("pip install torch==2.13.0"), setup.index('pip install ".[train]"')
    assert cpu_torch < main_job
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup[:main_job]
    for fact in ("backbone", "zero-shot", "metrics.jsonl", "minutes"):
        assert fact in setup, fact


def _fail_if_a_model_is_built(monkeypatch, *modules):
    """Validation happens before any model is built: building one in these command modules fails the test."""
    def no_model(args):
        raise AssertionError("the model was built before the inputs were checked")

    for name in modules:
        monkeypatch.setattr(f"dinotxt_fast.cli.{name}.load_model", no_model)


def test_segment_refuses_an_absurd_canvas_before_the_model(capsys, files, monkeypatch, tmp_path):
    """7x3000 at short side 512 is a 512x219428 canvas (2,284 windows): refused in one line naming --max-canvas."""
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((3000, 7, 3), np.uint8)).save(thin)
    code, out, err = console("segment", thin, "--classes", "a,b", *files["weights"])
    one_line_error(code, err, 2, "thin.png", "7x3000", "512x219428", "windows", "--max-canvas", "--max-canvas 112.4")
    _fail_if_a_model_is_built(monkeypatch, "segment")
    code, _, err = run(capsys, "segment", thin, "--classes", "a,b", *files["weights"])
    assert code == 2 and "--max-canvas" in err
    with pytest.raises(ValueError, match="max_canvas_pixels"):  # the library's own guard
        segment(files["model"], [torch.zeros(3, 3000, 7)], ["a", "b"], templates="none",
                max_canvas_pixels=16_000_000)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_on_windows_and_images(files, monkeypatch, capsys):
    """segment shows a bar over its windows, classify one over its images (on a terminal; --no-progress hides
    them)."""
    root = files["root"]
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    args = ("segment", root / "a.png", "--classes", "dog,cat", "--templates", "none", "--short-side", "64",
            "--window", "32", "--stride", "16", "-o", root / "bar.png", *files["weights"])
    assert cli.main([str(a) for a in args]) == 0
    assert "windows" in terminal.getvalue() and "15/15" in terminal.getvalue()  # 3 x 5 windows on 64x96
    terminal.seek(0), terminal.truncate()
    assert cli.main([str(a) for a in ("classify", root / "a.png", root / "b.jpg", "--classes", "dog,cat",
                                      "--templates", "none", *files["weights"])]) == 0
    assert "images" in terminal.getvalue() and "2/2" in terminal.getvalue()
    terminal.seek(0), terminal.truncate()
    assert cli.main([str(a) for a in (*args, "--no-progress")]) == 0
    assert "windows" not in terminal.getvalue()


def test_ctrl_c_is_one_line_and_exit_code_130(files):
    """Ctrl-C during a long segment: `dinotxt-fast segment: interrupted`, exit code 130, no traceback."""
    import signal
    import subprocess
    import sys

    slow = ("import sys, time\n"
            "import dinotxt_fast.inference.segmentation as seg\n"
            "def slow(*args, **kwargs):\n"
            "    print('working', flush=True)\n"
            "    time.sleep(120)\n"
            "seg.segment = slow\n"
            "from dinotxt_fast.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    argv = ["segment", str(files["root"] / "a.png"), "--classes", "dog,cat", "--templates", "none",
            "-o", str(files["root"] / "int.png"), *files["weights"]]
    proc = subprocess.Popen([sys.executable, "-c", slow, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "working"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    one_line_error(proc.returncode, err, 130, "dinotxt-fast segment: interrupted")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_cuda_is_one_line(tmp_path):
    code, _, err = console("train", "--device", "cuda", "--out", tmp_path / "run", *TRAIN_TINY[:-1])
    one_line_error(code, err, 2, "--device cuda", "CUDA is not available", "--device cpu")
    assert not (tmp_path / "run").exists()


def test_inputs_are_checked_before_the_model_is_built(capsys, files, monkeypatch, tmp_path):
    """A missing or corrupt image, a corrupt weight file: one line, before any model is built (classify, encode,
    segment)."""
    root, weights = files["root"], files["weights"]
    code, _, err = console("classify", root / "a.png", tmp_path / "missing.jpg", "--classes", "dog", *weights)
    one_line_error(code, err, 1, "image file not found", "missing.jpg")
    _fail_if_a_model_is_built(monkeypatch, "classify", "encode", "segment")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for command in (["classify", "--classes", "dog"], ["encode", "-o", tmp_path / "e.npz"]):
        for image, message in ((tmp_path / "missing.jpg", "not found"), (corrupt, "corrupt")):
            code, _, err = run(capsys, command[0], root / "a.png", image, *command[1:], *weights)
            assert code == 1 and message in err and image.name in err, (command, err)
    truncated = tmp_path / "vision_head.pth"
    truncated.write_bytes((root / "vision_head.pth").read_bytes()[:-200])
    bad = [w if w != str(root / "vision_head.pth") else str(truncated) for w in weights]
    for command in (["classify", root / "a.png", "--classes", "dog"], ["segment", root / "a.png", "--classes", "a"]):
        code, _, err = run(capsys, *command, *bad)
        assert code == 2 and "--vision-head" in err and "truncated" in err, err


def test_overlay_paints_colour_named_classes_in_their_colour():
    """"blue" is blue and "red" red whatever their order; other classes take the palette colours."""
    from dinotxt_fast.inference.overlay import class_colours, palette, render_overlay

    names = ["blue", "red", "a tree", "Dark Green"]
    assert class_colours(names) == [(0, 0, 255), (255, 0, 0), palette(4)[2], (0, 100, 0)]
    labels = torch.tensor([[0, 0, 1, 1]] * 4)
    picture = np.asarray(render_overlay(Image.new("RGB", (4, 4), (0, 0, 0)), labels, names, alpha=1.0))
    assert tuple(picture[0, 0]) == (0, 0, 255) and tuple(picture[0, 3]) == (255, 0, 0)


def test_info_is_plain_words_and_json_on_request():
    code, out, err = console("info")
    assert code == 0, err
    assert "cudaError" not in out and "{" not in out and "_C extension" in out
    if not torch.cuda.is_available():
        assert "none (" in out
        assert "no CUDA driver" in out or "CPU-only" in out or "no CUDA device" in out
    code, out, err = console("info", "--json")
    assert code == 0 and json.loads(out)["cuda_available"] == torch.cuda.is_available()


def test_train_start_failure_leaves_no_folder_and_finished_resume_says_so(trained, tmp_path):
    """A train that cannot start leaves no folder with only config.yaml; resuming a finished run prints "nothing to
    do" with its final numbers; the progress bar labels the logit scale as metrics.jsonl logs it (the log)."""
    no_data = [o for o in TRAIN_TINY if not o.startswith("data=")]
    code, _, err = console("train", "--out", tmp_path / "bad", "--data", tmp_path / "missing.csv", *no_data)
    one_line_error(code, err, 1, "missing.csv")
    assert not (tmp_path / "bad").exists()

    run_dir = trained["root"] / "run"
    code, out, err = console("train", "--out", run_dir, "--resume", "--no-progress", *TRAIN_TINY)
    assert code == 0, err
    from dinotxt_fast.train.metrics import read_metrics

    last_loss = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r][-1]
    assert f"nothing to do: {run_dir} already finished step 2 of 2; final loss {last_loss:.4f}" in out
    summary = json.loads(out.splitlines()[1])
    assert summary["final_loss"] == last_loss and summary["nothing_to_do"] is True


def test_progress_bar_shows_the_logged_logit_scale(tmp_path, capsys):
    from dinotxt_fast.train import load_config, train
    from dinotxt_fast.train.metrics import read_metrics

    train(load_config("tiny", TRAIN_TINY[:1] + ["steps=1"] + TRAIN_TINY[2:]), tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert f"logit_scale={record['logit_scale']:.2f}" in err and " scale=" not in err


def test_bench_help_and_the_cpu_smoke_mode_run_triton(tmp_path):
    """`bench --help` is the suite's usage once, as `dinotxt-fast bench`; `bench --device cpu` runs the Triton rows
    under the interpreter (they were skipped with "0 active drivers") and the report calls CPU figures smoke
    checks."""
    code, out, err = console("bench", "--help")
    assert code == 0, err
    assert out.startswith("usage: dinotxt-fast bench") and "python -m benchmarks [-h]" not in out
    assert out.count("The benchmark suite: every benchmark") == 1
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dinotxt_fast.cli", "bench", "pooling", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    triton_rows = [line for line in proc.stdout.splitlines() if "ours (triton)" in line]
    assert triton_rows and not any("skipped" in line for line in triton_rows), proc.stdout
    assert "CPU smoke" in proc.stdout
    assert "CPU smoke check" in (tmp_path / "REPORT.md").read_text()


def test_interpreter_exp2_overflow_on_masked_lanes_is_filtered(tmp_path):
    """Under Triton's interpreter, tl.where(mask, tl.exp2(x), 0) evaluates exp2 on the masked-out lanes too (numpy:
    "overflow encountered in exp2"); the discarded inf is harmless, and the test output no longer shows it."""
    import subprocess
    import sys

    (tmp_path / "test_masked_exp2.py").write_text(
        "import torch, triton, triton.language as tl\n"
        "@triton.jit\n"
        "def masked_exp2(X, Y):\n"
        "    offs = tl.arange(0, 4)\n"
        "    x = tl.load(X + offs)\n"
        "    tl.store(Y + offs, tl.where(x < 100.0, tl.exp2(x), 0.0))\n"
        "def test_masked_exp2():\n"
        "    x = torch.tensor([1.0, 2.0, 500.0, 3.0])\n"
        "    y = torch.empty_like(x)\n"
        "    masked_exp2[(1,)](x, y)\n"
        "    torch.testing.assert_close(y, torch.tensor([2.0, 4.0, 0.0, 8.0]))\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                           str(REPO / "pyproject.toml"), "--rootdir", str(REPO), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "overflow encountered" not in proc.stdout, proc.stdout

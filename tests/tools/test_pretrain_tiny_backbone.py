"""The shipped tiny backbone (dinotxt_fast/train/weights/tiny_backbone.safetensors) is what
tools/pretrain_tiny_backbone.py makes: same script (sha256), its default arguments, the same first losses when
replayed, and tensors that load strictly into the tiny config's backbone."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "pretrain_tiny_backbone.py"


def _shipped():
    from dinotxt_fast.train import load_config

    return Path(load_config("tiny").backbone_path())


def _metadata() -> dict:
    with safe_open(str(_shipped()), "pt") as f:
        return f.metadata()


def _script():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import pretrain_tiny_backbone
    finally:
        sys.path.remove(str(REPO / "tools"))
    return pretrain_tiny_backbone


def _run_script(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_shipped_file_comes_from_this_script_with_its_defaults():
    """Editing the script without regenerating the file (python tools/pretrain_tiny_backbone.py) fails here."""
    meta = _metadata()
    assert meta["script_sha256"] == hashlib.sha256(SCRIPT.read_bytes()).hexdigest(), (
        "tools/pretrain_tiny_backbone.py changed since the shipped backbone was made: rerun it")
    script = _script()
    assert json.loads(meta["args"]) == script.recipe(script.parse_args([]))
    assert len(json.loads(meta["first_losses"])) == script.FIRST_LOSSES
    assert "torch" in meta and "no captions, labels or masks" in meta["objective"]


def test_replaying_the_first_steps_gives_the_shipped_losses():
    meta = _metadata()
    if meta["torch"] != torch.__version__:
        pytest.skip(f"the file was made with torch {meta['torch']}, this is {torch.__version__}: other kernels")
    shipped = json.loads(meta["first_losses"])
    result = _run_script("--stop-after", str(len(shipped)))
    assert result.returncode == 0, result.stderr[-2000:]
    replayed = json.loads(result.stdout.strip().splitlines()[-1])["first_losses"]
    assert replayed == pytest.approx(shipped, rel=1e-6)


def test_shipped_tensors_load_strictly_into_the_tiny_backbone():
    import dinotxt_fast as dtf
    from dinotxt_fast.train import load_config

    cfg = load_config("tiny")
    model = dtf.create_model(cfg.preset, **cfg.model_config().to_dict())
    model.load_official(backbone=cfg.backbone_path())  # strict: every key, nothing else, every shape
    report = model.load_report["backbone"]
    assert not report.missing_keys and not report.unexpected_keys and not report.filled_keys
    shipped = load_file(str(_shipped()))
    assert shipped.keys() == model.backbone.state_dict().keys()
    assert all(v.dtype == torch.float16 for v in shipped.values())
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, shipped[key].to(value.dtype)), key


def test_the_shipped_backbone_was_trained():
    """Not the random initialisation the script starts from (seed 0): every matrix of every block moved (a run
    whose backbone stayed frozen, as create_model leaves it, would ship its init up to fp16 rounding)."""
    import dinotxt_fast as dtf
    from dinotxt_fast.train import load_config

    cfg = load_config("tiny")
    torch.manual_seed(json.loads(_metadata()["args"])["seed"])
    init = dtf.create_model(cfg.preset, **cfg.model_config().to_dict()).backbone.state_dict()
    shipped = load_file(str(_shipped()))
    matrices = [k for k in init if k.startswith("blocks.") and init[k].ndim == 2]
    assert len(matrices) >= 8
    for key in matrices:
        change = (shipped[key].float() - init[key]).norm() / init[key].norm()
        assert change > 0.05, f"{key} moved by only {float(change):.4f} of its norm"


def test_stop_after_is_checked():
    result = _run_script("--stop-after", "0", timeout=120)
    assert result.returncode == 2 and "--stop-after must be in 1..--steps" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DINOTXT_FAST_REGENERATE") != "1",
                    reason="the whole pretraining run: set DINOTXT_FAST_REGENERATE=1 (about 5 min on a 2-core CPU)")
def test_full_regeneration_gives_the_shipped_file(tmp_path):
    """The whole run reproduces the shipped tensors bit for bit."""
    meta = _metadata()
    if meta["torch"] != torch.__version__:
        pytest.skip(f"the file was made with torch {meta['torch']}, this is {torch.__version__}")
    out = tmp_path / "again.safetensors"
    result = _run_script("--out", str(out), timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    again, shipped = load_file(str(out)), load_file(str(_shipped()))
    assert again.keys() == shipped.keys() and all(torch.equal(again[k], shipped[k]) for k in shipped)

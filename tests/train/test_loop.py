"""The reference trainer (`dinotxt-fast train`, `dinotxt-fast export`): outputs, optimisation details, multi-process
equivalence, exact resume, SIGTERM, non-finite losses, bad data and configs, the feature cache and export.

CPU only, with a model far smaller than the `tiny` config (32-wide towers on 32 px images, 8-sample batches), so
every run takes about a second; subprocess runs (torchrun-style ranks, SIGTERM) pay a few seconds of imports.
"""
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinotxt_fast.ops as ops
from dinotxt_fast import cli, create_model, from_pretrained
from dinotxt_fast.train import ConfigError, TrainingStopped, load_config, train
from dinotxt_fast.train.checkpoint import load_checkpoint
from dinotxt_fast.train.loop import LiTModule, build_model, load_trained_model, lr_lambda, param_groups
from dinotxt_fast.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
LN100 = math.log(100.0)

# The tiny config made smaller still (so with a random backbone: the embedded one is 64 wide); later overrides win.
SMALL = ["batch_size=8", "steps=4", "model.vision_dim=32", "model.text_dim=32", "image_size=32",
         "data=synthetic:64", "eval_samples=16", "seg_eval_images=2", "log_every=1", "device=cpu",
         "backbone_weights=null"]


def _cfg(*overrides):
    return load_config("tiny", SMALL + list(overrides))


def _run(out, *overrides, resume=None):
    return train(_cfg(*overrides), out, resume=resume, progress=False)


def _train_records(out):
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def _eval_records(out):
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "zero_shot_top1" in r]


def _last(out):
    return load_checkpoint(Path(out) / "checkpoints" / "last.pt")


def _assert_state_close(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cli_cmd(out, *overrides):
    return [sys.executable, "-m", "dinotxt_fast.cli", "train", "--out", str(out), "--no-progress", *SMALL,
            *overrides]


def _count_calls(monkeypatch, at_call, action):
    """Wrap ops.contrastive_loss (the loop looks it up at every step): `action(loss)` replaces the loss of
    call number `at_call` (1-based)."""
    real = ops.contrastive_loss
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls["n"] += 1
        return action(loss) if calls["n"] == at_call else loss

    monkeypatch.setattr(ops, "contrastive_loss", wrapped)
    return calls


# ---------------------------------------------------------------------------------------------- a short run

def test_short_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    summary = _run(out, "save_every=2", "keep_checkpoints=1")
    assert summary["status"] == "completed" and summary["step"] == 4 and math.isfinite(summary["final_loss"])

    # config.yaml is the resolved config and loads back to the same TrainConfig
    assert load_config(str(out / "config.yaml")) == _cfg("save_every=2", "keep_checkpoints=1")

    train_records = _train_records(out)
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for r in train_records:
        assert {"step", "loss", "logit_scale", "lr", "samples_per_s"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["samples_per_s"] > 0 and r["lr"] > 0
    (ev,) = _eval_records(out)  # eval_every > steps: one evaluation, at the last step
    assert ev["step"] == 4 and ev["num_classes"] == 8
    assert 0 <= ev["zero_shot_top1"] <= 1 and 0 <= ev["miou"] <= 1
    assert ev["zero_shot_chance"] == 1 / 8 and 0 < ev["miou_baseline_majority"] <= 1
    assert 0 < ev["miou_baseline_background"] <= ev["miou_baseline_majority"]  # background is one candidate

    state = _last(out)
    assert state["step"] == 4 and summary["checkpoint"].endswith("step_00000004.pt")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_00000004.pt"]  # pruned
    png = out / "plots" / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the trained model as a model folder: the checkpoint's model, exactly
    assert summary["model"] == str(out / "model")
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    _assert_state_close(from_pretrained(out / "model").state_dict(), load_trained_model(out / "checkpoints" /
                                                                                        "last.pt").state_dict(), atol=0)


@pytest.mark.parametrize("head_attention", [True, False])
def test_backbone_is_frozen_and_the_trained_parts_move(tmp_path, head_attention):
    """head_attention=false (the tiny default, issue #13) keeps the head's attention and its LayerScale at init
    and trains the rest; true trains them too."""
    cfg = _cfg(f"head_attention={str(head_attention).lower()}")
    _run(tmp_path / "run", f"head_attention={str(head_attention).lower()}", "eval_data=null")
    torch.manual_seed(cfg.seed)  # the trainer's initialisation
    initial = build_model(cfg, torch.device("cpu"), "fp32")
    trained = load_trained_model(tmp_path / "run" / "checkpoints" / "last.pt")
    _assert_state_close(trained.backbone.state_dict(), initial.backbone.state_dict(), atol=0)
    for b_trained, b_initial in zip(trained.head.blocks, initial.head.blocks):
        attention = {**{f"attn.{k}": v for k, v in b_trained.attn.state_dict().items()},
                     **{f"ls1.{k}": v for k, v in b_trained.ls1.state_dict().items()}}
        moved = {k for k, v in attention.items() if not torch.equal(v, b_initial.state_dict()[k])}
        assert moved == (set(attention) if head_attention else set()), moved
        assert not torch.equal(b_trained.mlp.w1.weight, b_initial.mlp.w1.weight)
    assert not torch.equal(trained.text.head.linear_projection.weight,
                           initial.text.head.linear_projection.weight)
    lit = LiTModule(initial)
    assert any(n.startswith("head.blocks.0.attn") for g in param_groups(lit, 0.1) for n, p in lit.named_parameters()
               if any(p is q for q in g["params"])) == head_attention  # frozen ones are not in the optimizer


@pytest.mark.parametrize("init, expected", [(10.0, LN100), (-3.0, 0.0)])
def test_logit_scale_is_clamped_after_every_step(tmp_path, monkeypatch, init, expected):
    # Start outside [0, ln 100]: the first optimizer step (lr 1e-4) cannot bring it back, only the clamp can.
    monkeypatch.setattr("dinotxt_fast.models.dinotxt.INIT_LOGIT_SCALE", init)
    _run(tmp_path / "run", "steps=3", "warmup_steps=0", "lr=1e-4", "eval_data=null")
    scales = [r["logit_scale"] for r in _train_records(tmp_path / "run")]
    assert scales[0] == pytest.approx(expected, abs=1e-6)
    assert all(0.0 <= s <= LN100 + 1e-6 for s in scales) and abs(scales[-1] - expected) < 1e-3


def test_max_logit_scale_config_is_the_upper_clamp(tmp_path, monkeypatch):
    monkeypatch.setattr("dinotxt_fast.models.dinotxt.INIT_LOGIT_SCALE", 4.0)
    _run(tmp_path / "run", "steps=1", "max_logit_scale=2.5", "eval_data=null")
    assert _train_records(tmp_path / "run")[0]["logit_scale"] == pytest.approx(2.5, abs=1e-6)
    with pytest.raises(ConfigError, match="max_logit_scale"):
        _cfg("max_logit_scale=-1")


def test_weight_decay_groups():
    model = create_model("dinov2_vitl14_reg4_dinotxt", vision_dim=32, vision_depth=1, vision_heads=4, patch_size=8,
                         text_dim=32, text_layers=1, text_heads=4, context_length=16)
    lit = LiTModule(model)
    decay, no_decay = param_groups(lit, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    names = {id(p): n for n, p in lit.named_parameters()}
    decayed = {names[i] for i in ids(decay)}
    not_decayed = {names[i] for i in ids(no_decay)}
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    assert "logit_scale" in not_decayed
    for name, p in lit.named_parameters():
        assert (name in decayed) == (p.ndim >= 2), name  # matrices only: biases, norms, LayerScale are 1-d
    assert {"head.blocks.0.attn.qkv.weight", "head.blocks.0.mlp.w1.weight", "text.backbone.token_embedding.weight",
            "text.head.linear_projection.weight"} <= decayed
    assert {"head.blocks.0.attn.proj.bias", "head.blocks.0.norm1.weight", "head.blocks.0.ls1.gamma",
            "head.ln_final.weight"} <= not_decayed
    assert not any(n.startswith("backbone") for n in names.values())  # the frozen backbone is not in LiTModule


def test_the_run_uses_those_groups(tmp_path):
    _run(tmp_path / "run", "steps=1", "weight_decay=0.05", "eval_data=null")
    groups = _last(tmp_path / "run")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    lit = LiTModule(build_model(_cfg(), torch.device("cpu"), "fp32"))  # the run's model: what head_attention froze
    expected = [len(g["params"]) for g in param_groups(lit, 0.05)]
    assert [len(g["params"]) for g in groups] == expected


def test_lr_schedule_warmup_then_cosine_to_zero():
    assert [lr_lambda(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    cosine = [lr_lambda(s, 4, 12) for s in range(4, 13)]
    assert cosine[0] == 1.0 and cosine[4] == pytest.approx(0.5) and cosine[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(cosine, cosine[1:]))
    assert lr_lambda(20, 4, 12) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    assert lr_lambda(0, 0, 10) == 1.0  # no warm-up


def test_logged_lr_is_the_lr_of_each_step(tmp_path):
    _run(tmp_path / "run", "steps=6", "warmup_steps=2", "lr=1e-3", "eval_data=null")
    logged = [r["lr"] for r in _train_records(tmp_path / "run")]
    expected = [1e-3 * lr_lambda(s, 2, 6) for s in range(6)]  # step s+1 updates with the lr of index s
    assert logged == pytest.approx(expected, rel=1e-12)
    assert expected[:3] == pytest.approx([5e-4, 1e-3, 1e-3])


# ------------------------------------------------------------------------------------------- distributed

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp_text"])
def test_two_gloo_processes_match_one_process(tmp_path, sharding):
    # with FSDP every rank must join the sharded text tower's forward in evaluations too
    steps = ["steps=3", "drop_path=0"] + (["eval_every=3"] if sharding == "fsdp_text" else ["eval_data=null"])
    single = tmp_path / "single"
    _run(single, "batch_size=8", *steps)

    double = tmp_path / "double"
    port = _free_port()
    extra = ["fsdp_text=true"] if sharding == "fsdp_text" else []
    procs = [subprocess.Popen(_cli_cmd(double, "batch_size=4", *steps, *extra), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (0, 1)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)

    a, b = _train_records(single), _train_records(double)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5, abs=1e-5)
    assert [r["logit_scale"] for r in b] == pytest.approx([r["logit_scale"] for r in a], abs=1e-5)
    _assert_state_close(_last(double)["model"], _last(single)["model"], atol=1e-5)
    assert isinstance(_last(double)["rng"], list) and len(_last(double)["rng"]) == 2  # one rng state per rank
    # rank 0 wrote the whole model (the FSDP-sharded text tower gathered) as a model folder
    _assert_state_close(from_pretrained(double / "model").state_dict(), from_pretrained(single / "model").state_dict(),
                        atol=1e-5)


# ---------------------------------------------------------------------------------------------------- resume

def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    # drop_path > 0: the resumed run must also restore the RNG that draws the drop-path subsets.
    common = ["steps=6", "save_every=3", "drop_path=0.3", "eval_data=null"]
    full = tmp_path / "full"
    _run(full, *common)

    # The same run crashing in step 5: metrics hold step 4, the newest checkpoint is step 3.
    crashed = tmp_path / "crashed"

    def crash(loss):
        raise RuntimeError("simulated crash")

    _count_calls(monkeypatch, 5, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(crashed, *common)
    monkeypatch.undo()
    assert [r["step"] for r in _train_records(crashed)] == [1, 2, 3, 4]
    assert _last(crashed)["step"] == 3
    with (crashed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # and a line torn by the crash

    summary = _run(crashed, *common, resume="auto")
    assert summary["status"] == "completed" and summary["step"] == 6
    a, b = _train_records(full), _train_records(crashed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # step 4 of the crashed attempt was dropped, not doubled
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6, abs=1e-6)
    _assert_state_close(_last(crashed)["model"], _last(full)["model"], atol=1e-6)
    _assert_state_close(_last(crashed)["optimizer"]["state"][0], _last(full)["optimizer"]["state"][0], atol=1e-6)


def test_resume_from_an_explicit_checkpoint_path(tmp_path):
    common = ["steps=4", "save_every=2", "keep_checkpoints=5", "eval_data=null"]
    full = tmp_path / "full"
    _run(full, *common)
    other = tmp_path / "other"
    summary = _run(other, *common, resume=str(full / "checkpoints" / "step_00000002.pt"))
    assert summary["step"] == 4
    assert [r["step"] for r in _train_records(other)] == [3, 4]
    assert [r["loss"] for r in _train_records(other)] == pytest.approx([r["loss"] for r in _train_records(full)][2:],
                                                                      rel=1e-6, abs=1e-6)


def test_resume_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        _run(tmp_path / "empty", resume="auto")
    # `--resume key=value`: the override is an override, not a checkpoint path
    assert cli.main(["train", "--out", str(tmp_path / "empty"), "--resume", *SMALL]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--resume", str(tmp_path / "nope.pt"), *SMALL]) == 2
    assert "nope.pt not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        _run(tmp_path / "x", resume=str(bad))


def test_a_refused_resume_leaves_the_run_config_intact(tmp_path):
    out = tmp_path / "run"
    _run(out, "steps=1", "eval_data=null")
    before = (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match="different model"):
        _run(out, "steps=2", "eval_data=null", "model.text_dim=48", resume="auto")
    assert (out / "config.yaml").read_text() == before


def test_a_fresh_run_does_not_append_to_stale_metrics(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n")  # a run that died early
    _run(out, "steps=2", "eval_data=null")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


# ----------------------------------------------------------------------------------------------- SIGTERM

def test_sigterm_saves_a_final_checkpoint_and_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli_cmd(out, "steps=100000", "save_every=100000", "eval_data=null"), cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no metrics line within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert '"status": "interrupted"' in log
    state = _last(out)
    step = state["step"]
    assert 1 <= step < 100000 and (out / "checkpoints" / f"step_{step:08d}.pt").is_file()
    assert max(r["step"] for r in _train_records(out)) == step

    assert cli.main(["train", "--out", str(out), "--resume", "--no-progress", *SMALL, f"steps={step + 2}",
                     "eval_data=null"]) == 0
    assert '"status": "completed"' in capsys.readouterr().out
    assert [r["step"] for r in _train_records(out)] == list(range(1, step + 3))
    assert _last(out)["step"] == step + 2


def test_sigterm_in_process_stops_after_the_current_step(tmp_path, monkeypatch):
    def term(loss):
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler only sets a flag
        return loss

    _count_calls(monkeypatch, 2, term)
    summary = _run(tmp_path / "run", "steps=50", "save_every=100", "eval_data=null")
    assert summary["status"] == "interrupted" and summary["signal"] == signal.SIGTERM and summary["step"] == 2
    assert _last(tmp_path / "run")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored


# ------------------------------------------------------------------------------------------ non-finite loss

def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _count_calls(monkeypatch, 5, lambda loss: loss * float("nan"))
    with pytest.raises(TrainingStopped) as info:
        _run(out, "steps=8", "save_every=2", "keep_checkpoints=5")
    good = out / "checkpoints" / "step_00000004.pt"
    message = str(info.value)
    assert "nan" in message and "step 5" in message and str(good) in message
    state = load_checkpoint(good)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last.pt", "step_00000002.pt", "step_00000004.pt"]
    assert _last(out)["step"] == 4
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 4


def test_non_finite_loss_before_any_checkpoint_via_cli(tmp_path, monkeypatch, capsys):
    _count_calls(monkeypatch, 1, lambda loss: loss * float("inf"))
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--no-progress", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "loss became inf at step 1" in err and "none written yet" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------- data and configs

def _jpeg(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_shard(path, good, corrupt):
    wds = pytest.importorskip("webdataset")
    with wds.TarWriter(str(path)) as sink:
        for i in range(good):
            sink.write({"__key__": f"good{i:03d}", "jpg": _jpeg(i), "txt": f"a red square number {i}"})
        for i in range(corrupt):
            sink.write({"__key__": f"bad{i:03d}", "jpg": _jpeg(99)[:200] + b"\0garbage", "txt": "a broken image"})


def test_corrupt_shard_samples_are_skipped_and_counted(tmp_path):
    shard = tmp_path / "shard-0000.tar"
    _write_shard(shard, good=8, corrupt=1)
    _run(tmp_path / "run", f"data={shard}", "batch_size=4", "steps=3", "eval_data=null")
    records = _train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    # 3 batches of 4 read past the end of the first pass over 8 good samples: the corrupt one was met.
    assert records[-1].get("skipped_samples", 0) >= 1


def test_empty_or_missing_data_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.tar"
    _write_shard(empty, good=0, corrupt=0)
    with pytest.raises(ValueError, match="hold no samples"):
        _run(tmp_path / "a", f"data={empty}", "eval_data=null")
    broken = tmp_path / "broken.tar"
    _write_shard(broken, good=0, corrupt=3)
    with pytest.raises(ValueError, match="no usable sample"):
        _run(tmp_path / "b", f"data={broken}", "eval_data=null")
    assert cli.main(["train", "--out", str(tmp_path / "c"), "--no-progress", *SMALL,
                     f"data={tmp_path / 'missing-{000..003}.tar'}"]) == 1
    err = capsys.readouterr().err
    assert "dinotxt-fast train: error: 4 of 4 shards" in err and "missing-000.tar" in err and "not found" in err


@pytest.mark.parametrize("args, message", [
    (["nope=1"], "unknown config key 'nope'"),
    (["steps=abc"], "steps: expected int, got 'abc'"),
    (["steps=0"], "steps: must be a positive integer"),
    (["steps=true"], "steps: expected int, got True"),
    (["model.nope=1"], "unknown DinoTxtConfig field(s) ['nope']"),
    (["model.vision_dim=30"], "vision_dim 30 is not divisible by vision_heads"),
    (["lr=fast"], "lr: expected float"),
    (["compile=maybe"], "compile: expected true or false"),
    (["precision=fp8"], "precision: must be one of"),
    (["--config", "/nonexistent/run.yaml"], "no such file and not a built-in config"),
])
def test_bad_configs_are_clear_errors(tmp_path, capsys, args, message):
    assert cli.main(["train", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinotxt-fast train: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_config_files_and_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))
    listing = tmp_path / "list.yaml"
    listing.write_text("- steps\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(str(listing))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    mine = tmp_path / "mine.yaml"
    mine.write_text("steps: 7\nlr: 3e-4\nmodel:\n  text_layers: 1\n")
    cfg = load_config(str(mine), ["steps=9"], data="synthetic:32")
    assert (cfg.steps, cfg.lr, cfg.model, cfg.data) == (9, 3e-4, {"text_layers": 1}, "synthetic:32")
    assert load_config("tiny", ["eval_data=null", "feature_cache=/tmp/c"]).eval_data is None  # optional -> null
    assert load_config("official").model_config().vision_dim == 1024


def test_refuses_to_overwrite_an_existing_run(tmp_path, capsys):
    out = tmp_path / "run"
    _run(out, "steps=1", "eval_data=null")
    before = (out / "metrics.jsonl").read_text()
    assert cli.main(["train", "--out", str(out), "--no-progress", *SMALL]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


# --------------------------------------------------------------------------------------------- feature cache

def test_feature_cache_is_built_reused_and_rebuilt(tmp_path, capsys):
    cache = tmp_path / "cache"
    common = [f"feature_cache={cache}", "steps=2", "eval_data=null"]
    _run(tmp_path / "a", *common)
    assert "feature cache: 64 samples x 21 tokens x 32 dims" in capsys.readouterr().out  # 1 + 4 regs + 4x4
    tokens = np.load(cache / "tokens.npy", mmap_mode="r")
    assert tokens.shape == (64, 21, 32) and tokens.dtype == np.float16
    assert np.load(cache / "ids.npy").shape == (64, 32)
    assert json.loads((cache / "meta.json").read_text())["complete"] is True
    assert all(math.isfinite(r["loss"]) for r in _train_records(tmp_path / "a"))
    stamp = (cache / "tokens.npy").stat().st_mtime_ns

    time.sleep(0.01)
    _run(tmp_path / "b", *common)
    assert "feature cache:" not in capsys.readouterr().out
    assert (cache / "tokens.npy").stat().st_mtime_ns == stamp
    assert [r["loss"] for r in _train_records(tmp_path / "b")] == [r["loss"] for r in _train_records(tmp_path / "a")]

    _run(tmp_path / "c", *common, "image_size=40")  # another input size: other tokens, rebuilt
    assert "64 samples x 30 tokens" in capsys.readouterr().out
    assert np.load(cache / "tokens.npy", mmap_mode="r").shape == (64, 30, 32)
    stamp = (cache / "tokens.npy").stat().st_mtime_ns

    time.sleep(0.01)  # same weights and sizes, another position-embedding resize: other tokens, rebuilt
    _run(tmp_path / "d", *common, "image_size=40", "model.pos_embed_antialias=false")
    assert "64 samples x 30 tokens" in capsys.readouterr().out
    assert (cache / "tokens.npy").stat().st_mtime_ns != stamp


def test_feature_cache_holds_the_backbone_tokens(tmp_path):
    from dinotxt_fast.train.data import make_loader

    cache = tmp_path / "cache"
    cfg = _cfg(f"feature_cache={cache}", "steps=1", "eval_data=null")
    train(cfg, tmp_path / "run", progress=False)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, torch.device("cpu"), "fp32")
    images, ids = next(iter(make_loader(cfg.data, global_batch=8, seed=cfg.seed, train=False, image_size=32,
                                        context_length=32)))
    with torch.no_grad():
        expected = model.backbone_tokens(images)
    got = torch.from_numpy(np.load(cache / "tokens.npy")[:8].astype(np.float32))
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)  # float16 storage
    assert torch.equal(torch.from_numpy(np.load(cache / "ids.npy")[:8].astype(np.int64)), ids)


# ------------------------------------------------------------------------------------------------------ export

@pytest.mark.parametrize("preset", ["dinov2_vitl14_reg4_dinotxt", "dinov3_vitl16_dinotxt"])
def test_export_writes_official_files_that_reproduce_the_model(tmp_path, capsys, preset):
    out = tmp_path / "run"
    _run(out, f"preset={preset}", "steps=2", "eval_data=null")
    ckpt_path = out / "checkpoints" / "last.pt"
    exported = tmp_path / "exported"
    assert cli.main(["export", str(ckpt_path), "--out", str(exported)]) == 0
    printed = capsys.readouterr().out

    cfg = _cfg(f"preset={preset}")
    files = ["backbone", "vision_head", "text_encoder"] if preset.startswith("dinov2") else ["backbone", "weights"]
    folder = ["config.json", "model.safetensors"]  # the model folder, beside the official files
    assert sorted(p.name for p in exported.iterdir()) == sorted([f + ".pth" for f in files] + folder)
    assert all(str(exported / f"{f}.pth") in printed for f in files)
    assert all(f"wrote {exported / f}" in printed for f in folder)
    fresh = create_model(preset, **cfg.model_config().to_dict())
    fresh.load_official(**{f: str(exported / f"{f}.pth") for f in files}).eval()
    trained = load_trained_model(ckpt_path)

    images = torch.randn(3, 3, 32, 40)
    ids = torch.randint(1, 1000, (3, 32))
    ids[:, 0], ids[:, 9] = 49406, 49407
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(images), trained.encode_image(images))
        assert torch.equal(fresh.encode_text(ids), trained.encode_text(ids))
        untrained = create_model(preset, **cfg.model_config().to_dict()).eval()
        assert not torch.equal(untrained.encode_text(ids), trained.encode_text(ids))
    if preset.startswith("dinov3"):  # the v3 file carries the logit scale
        assert fresh.logit_scale.item() == trained.logit_scale.item() == _last(out)["model"]["logit_scale"].item()
    _assert_state_close(from_pretrained(exported).state_dict(), trained.state_dict(), atol=0)
    # a model folder exports too: the same files again
    assert cli.main(["export", str(exported), "--out", str(tmp_path / "again")]) == 0
    _assert_state_close(from_pretrained(tmp_path / "again").state_dict(), trained.state_dict(), atol=0)


def test_a_transformers_backbone_folder_trains_and_exports(tmp_path, capsys):
    """backbone_weights= a Hugging Face transformers model folder: trained on, then exported from its checkpoint
    (load_trained_model takes the folder) with the backbone's weights in the model folder."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=128, image_size=64, patch_size=8,
                                                    num_register_tokens=4)
    torch.manual_seed(0)
    hf = transformers.Dinov2WithRegistersModel(config)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    _run(out, f"backbone_weights={tmp_path / 'hf'}", "steps=1", "eval_data=null")
    assert cli.main(["export", str(out / "checkpoints" / "last.pt"), "--out", str(tmp_path / "exported")]) == 0
    exported = from_pretrained(tmp_path / "exported")
    torch.testing.assert_close(exported.backbone.blocks[1].attn.qkv.weight[:32],
                               hf.encoder.layer[1].attention.q_proj.weight, rtol=0, atol=0)
    _assert_state_close(exported.state_dict(), from_pretrained(out / "model").state_dict(), atol=0)


def test_export_of_a_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    assert cli.main(["export", str(bad), "--out", str(tmp_path / "x")]) == 1
    assert "not a dinotxt-fast training checkpoint" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 1
    assert "missing.pt" in capsys.readouterr().err



def test_cli_overrides_may_follow_options(tmp_path):
    out = tmp_path / "run"
    args = ["train", *SMALL[:4], "--out", str(out), "--no-progress", *SMALL[4:], "steps=1", "eval_data=null"]
    assert cli.main(args) == 0
    saved = load_config(str(out / "config.yaml"))
    assert saved.steps == 1 and saved.image_size == 32 and saved.eval_data is None
    assert cli.main(["train", "--out", str(out), "--resume", *SMALL, "--no-progress", "eval_data=null",
                     "steps=2"]) == 0
    assert [r["step"] for r in _train_records(out)] == [1, 2]
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(out), "--bogus-flag"])


def test_backend_option_runs_the_step_on_the_triton_kernels(tmp_path, monkeypatch):
    """backend=triton routes every op of the run (attention, pooling, loss) to the Triton kernels (here under the
    CPU interpreter): same losses as the reference backend."""
    monkeypatch.setenv(ops.ENV_VAR, "cuda")  # the run's own backend= key takes precedence over the variable
    tiny = ["steps=2", "batch_size=4", "model.vision_depth=1", "model.text_layers=1", "data=synthetic:16",
            "eval_data=null", "drop_path=0"]
    calls = []
    real = ops.dispatch.get_kernel
    monkeypatch.setattr(ops.dispatch, "get_kernel", lambda backend, kernel: calls.append(backend) or real(backend,
                                                                                                        kernel))
    _run(tmp_path / "torch", *tiny, "backend=torch")
    _run(tmp_path / "triton", *tiny, "backend=triton")
    assert "triton" in calls and "torch" in calls and "cuda" not in calls
    a, b = _train_records(tmp_path / "torch"), _train_records(tmp_path / "triton")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    with pytest.raises(ConfigError, match="backend"):
        _cfg("backend=tpu")


@pytest.mark.parametrize("cache", [False, True])
def test_bf16_autocast_run(tmp_path, cache):
    """precision=bf16 (what CUDA runs use): image and text embeddings meet the loss in one dtype, with and without
    the feature cache, with drop-path off (the path where the head stays in the backbone's dtype)."""
    extra = [f"feature_cache={tmp_path / 'cache'}"] if cache else []
    summary = _run(tmp_path / "run", "precision=bf16", "drop_path=0", "steps=2", "eval_data=null", *extra)
    assert summary["status"] == "completed" and math.isfinite(summary["final_loss"])

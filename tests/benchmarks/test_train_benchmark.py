"""benchmarks/train.py: the CPU smoke run end to end (its JSON), the input layout, the FLOP count, and on a GPU the
real CUDA path on a small configuration."""
import contextlib
import json

import pytest
import torch

from benchmarks import train as bench_train
from benchmarks.harness import SCHEMA
from dinotxt_fast import ops


def _run(tmp_path, *extra):
    assert bench_train.main(["--quick", "--out", str(tmp_path), *extra]) == 0
    files = list(tmp_path.glob("train-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _rows(record):
    return {row["impl"]: row for row in record["results"]}


def test_cpu_smoke_run_writes_checked_rows(tmp_path):
    record = _run(tmp_path, "--device", "cpu")
    assert record["benchmark"] == "train" and record["schema"] == SCHEMA
    assert record["ceilings"]["matmul_tflops"] > 0 and record["environment"]["device"] == "cpu"
    assert record["settings"]["config"] == "tiny" and record["settings"]["precision"] == "fp32"
    assert {"flops", "items", "eager reference", "ours", "check"} <= set(record["notes"])
    rows = _rows(record)
    assert list(rows) == ["eager reference", "ours (auto)", "ours (triton)", "ours (cuda)"]
    assert len({row["case"] for row in record["results"]}) == 1

    reference, ours = rows["eager reference"], rows["ours (auto)"]
    for row in (reference, ours):
        assert row["pass"] == "step" and row["median_ms"] > 0 and row["q20_ms"] <= row["q80_ms"]
        assert row["samples_per_s"] == pytest.approx(row["shape"]["batch"] / (row["median_ms"] * 1e-3))
        assert row["tflops"] > 0 and row["timed_calls"] >= 4
        assert row["loss"] > 0 and all(g > 0 for g in row["grad_norms"].values())
    # Same weights, batch, drop-path draws and fp32 math: the two steps agree.
    assert ours["max_abs_diff"] < 1e-5 and ours["grad_max_rel_diff"] < 1e-4
    assert ours["backends_used"] == {"attention": ["torch"], "patch_pool": ["torch"], "contrastive_loss": ["torch"]}
    assert ours["best_baseline"] == "eager reference"
    assert ours["speedup_vs_best_baseline"] == pytest.approx(reference["median_ms"] / ours["median_ms"])
    assert "max_abs_diff" not in reference

    triton = rows["ours (triton)"]
    if ops.backends()["triton"]["available"]:  # under the interpreter (tests/conftest.py sets TRITON_INTERPRET)
        assert "skipped" not in triton, triton.get("skipped")
        assert triton["backends_used"] == {f: ["triton"] for f in bench_train.OP_FAMILIES}
        assert triton["max_abs_diff"] < 1e-4 and triton["grad_max_rel_diff"] < 1e-3
    else:
        assert "triton" in triton["skipped"]
    if not ops.backends()["cuda"]["available"]:
        assert "unavailable" in rows["ours (cuda)"]["skipped"]


def test_batches_are_laid_out_like_the_tokenizer_s():
    case = bench_train.Case("t", (3, 9))
    make = bench_train.make_batch_factory(torch, 16, 8, 12, case, torch.device("cpu"), seed=0)
    images, ids = make()
    assert images.shape == (16, 3, 8, 8) and images.dtype == torch.float32
    assert ids.shape == (16, 12) and ids.dtype == torch.int64
    eot = ids.argmax(-1)  # the text tower pools at the first largest id
    assert (ids[:, 0] == bench_train.SOT).all() and (ids.gather(1, eot[:, None]) == bench_train.EOT).all()
    words = eot - 1
    assert words.min() >= 3 and words.max() <= 9
    positions = torch.arange(12)[None, :]
    assert (ids[positions > eot[:, None]] == 0).all()
    middle = ids[(positions > 0) & (positions < eot[:, None])]
    assert ((middle >= 1) & (middle < 49000)).all()
    assert not torch.equal(make()[1], ids)  # every call draws a new batch
    with pytest.raises(ValueError, match="context length"):
        bench_train.make_batch_factory(torch, 2, 8, 4, bench_train.Case("long", (5, 9)), torch.device("cpu"), 0)


def test_step_flops_equal_the_counted_flops_of_the_eager_step(monkeypatch):
    """The analytic count against torch's FlopCounterMode on the eager step, with attention written as matmuls
    (the counter cannot see inside CPU SDPA); causal attention is counted whole by the matmuls, half by the formula."""
    from torch.utils.flop_counter import FlopCounterMode

    from dinotxt_fast.train.config import load_config

    def matmul_attention(q, k, v, *, causal=False, scale=None, lengths=None, backend=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        s = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2)

    @contextlib.contextmanager
    def patched():
        monkeypatch.setattr(ops, "attention", matmul_attention)
        yield

    monkeypatch.setattr(bench_train, "attention_through_sdpa", patched)
    batch, size = 6, 32
    cfg = load_config("tiny", device="cpu", batch_size=batch, image_size=size, precision="fp32", drop_path=0.0,
                      head_attention=True)
    bench = bench_train.Bench(torch, cfg, torch.device("cpu"), "fp32")
    mcfg = bench.model.config
    make = bench_train.make_batch_factory(torch, batch, size, mcfg.context_length, bench_train.CPU_CASES[0],
                                          torch.device("cpu"), 0)
    step = bench.eager()
    with FlopCounterMode(display=False) as counter:
        step(*make())
    t = mcfg.context_length
    causal_half = batch * 3 * mcfg.text_layers * 2 * t * t * mcfg.text_dim
    assert counter.get_total_flops() == bench_train.step_flops(mcfg, batch, size, 0.0) + causal_half


def test_cli_errors():
    with pytest.raises(SystemExit):
        bench_train.BENCHMARK.parse_args(["--batch-size", "1"])
    if not torch.cuda.is_available():
        assert bench_train.main(["--device", "cuda"]) == 2


@pytest.mark.gpu
def test_cuda_run_on_a_small_config(tmp_path):
    """The CUDA path (do_bench timing, peak memory, bf16 autocast, forced kernel backends) on the tiny model."""
    record = _run(tmp_path, "--device", "cuda", "--config", "tiny", "--batch-size", "32", "--image-size", "64",
                  "--precision", "bf16")
    rows = _rows(record)
    assert record["settings"]["precision"] == "bf16"
    for impl in ("eager reference", "ours (auto)"):
        row = rows[impl]
        assert "skipped" not in row, row.get("skipped")
        assert row["peak_memory_mib"] > 0 and row["resident_mib"] > 0 and row["samples_per_s"] > 0
    assert rows["ours (auto)"]["max_abs_diff"] < 0.05 and rows["ours (auto)"]["grad_max_rel_diff"] < 0.1
    for impl in ("ours (triton)", "ours (cuda)"):
        row = rows[impl]
        if "skipped" not in row:
            assert row["max_abs_diff"] < 0.05 and row["grad_max_rel_diff"] < 0.1, row
            assert row["speedup_vs_best_baseline"] > 0

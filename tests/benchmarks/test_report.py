"""The benchmark report (tables, plots, README section, measured dispatch table) and the per-shape auto dispatch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import harness, report
from dinotxt_fast.ops import dispatch

H100 = "NVIDIA H100 80GB HBM3"


def _record(gpu=H100, time_utc="2026-11-25T10:00:00Z", rows=None, benchmark="attention"):
    ceilings = {"matmul_tflops": 700.0, "matmul_dtype": "bfloat16", "copy_gbps": 3000.0}
    shape = {"seq": 261, "head_dim": 64, "causal": False, "batch": 256, "heads": 16}
    rows = rows if rows is not None else [
        harness.result("vit 224", "ours (triton)", (1.0, 0.9, 1.1), pass_="fwd", shape=shape, flops=5e11,
                       ceilings=ceilings, peak_memory=100.0),
        harness.result("vit 224", "ours (cuda fwd)", (0.8, 0.7, 0.9), pass_="fwd", shape=shape, flops=5e11,
                       ceilings=ceilings, peak_memory=100.0),
        harness.result("vit 224", "sdpa flash", (1.2, 1.1, 1.3), pass_="fwd", shape=shape, flops=5e11,
                       ceilings=ceilings, peak_memory=300.0),
        harness.result("vit 224", "ours (triton)", (3.0, 2.9, 3.1), pass_="fwd+bwd", shape=shape, flops=1.75e12,
                       ceilings=ceilings),
        harness.result("vit 224", "sdpa flash", (2.0, 1.9, 2.1), pass_="fwd+bwd", shape=shape, flops=1.75e12,
                       ceilings=ceilings),
        harness.result("vit 224", "xformers", skipped="ImportError: no module named xformers"),
    ]
    harness.add_ratios(rows)
    env = {"gpu": gpu, "time_utc": time_utc, "torch": "2.11", "git_commit": "abc", "driver": "580"}
    if gpu is None:
        env = {"cpu": "x86_64", "cpu_count": 2, "time_utc": time_utc}
    targets = [{"issue": 7, "case": "vit 224", "impl": "ours (cuda fwd)", "pass": "fwd", "metric": "tflops",
                "target": 450, "op": ">="},
               {"issue": 3, "case": "vit 224", "impl": "ours (triton)", "pass": "fwd+bwd",
                "metric": "speedup_vs_best_baseline", "target": 1.0, "op": ">="},
               {"issue": 3, "case": "vit 896", "impl": "ours (triton)", "pass": "fwd", "metric": "tflops",
                "target": 420, "op": ">="}]
    return {"benchmark": benchmark, "schema": harness.SCHEMA, "environment": env, "ceilings": ceilings,
            "settings": {"dtype": "bfloat16"}, "notes": {"flops": "4*B*H*N^2*Dh", "targets": targets},
            "results": rows}


def _write(folder: Path, name: str, record: dict) -> Path:
    path = folder / name
    path.write_text(json.dumps(record))
    return path


def test_result_rows_derive_throughput_ceiling_fraction_and_ratios():
    rec = _record()
    ours = [r for r in rec["results"] if r["impl"] == "ours (cuda fwd)"][0]
    assert ours["tflops"] == pytest.approx(5e11 / 0.8e-3 / 1e12)
    assert ours["fraction_of_matmul_peak"] == pytest.approx(ours["tflops"] / 700.0)
    assert ours["best_baseline"] == "sdpa flash" and ours["speedup_vs_best_baseline"] == pytest.approx(1.5)
    assert ours["memory_ratio_vs_best_baseline"] == pytest.approx(3.0)
    bwd = [r for r in rec["results"] if r["impl"] == "ours (triton)" and r["pass"] == "fwd+bwd"][0]
    assert bwd["speedup_vs_best_baseline"] == pytest.approx(2.0 / 3.0)


def test_report_tables_plots_and_newest_per_machine(tmp_path):
    _write(tmp_path, "attention-old.json", _record(time_utc="2026-01-01T00:00:00Z", rows=[]))
    _write(tmp_path, "attention-new.json", _record())
    _write(tmp_path, "attention-cpu.json", _record(gpu=None))
    _write(tmp_path, "legacy.json", {"benchmark": "attention", "results": []})  # schema 1: skipped
    records = report.load([tmp_path])
    assert len(records) == 2 and {r["_path"].rsplit("/", 1)[1] for r in records} == {"attention-new.json",
                                                                                       "attention-cpu.json"}
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| vit 224 | fwd | ours (cuda fwd) |" in text and "1.50x" in text and "3.0x" in text
    assert "ImportError" in text  # skipped rows stay visible
    assert "| #7 | vit 224 | ours (cuda fwd) | fwd | tflops | >= 450 | 625 | yes |" in text
    assert "| #3 | vit 224 | ours (triton) | fwd+bwd | speedup_vs_best_baseline | >= 1.0 | 0.667 | no |" in text
    assert "| vit 896 | ours (triton) | fwd | tflops | >= 420 | not measured in this run |  |" in text
    pngs = sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png"))
    assert any(p.endswith("speedup.png") for p in pngs) and any(p.endswith("memory.png") for p in pngs)


def test_report_rejects_corrupt_json(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON"):
        report.load([tmp_path / "x.json"])
    with pytest.raises(FileNotFoundError):
        report.load([tmp_path / "missing.json"])


def test_readme_section_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.README_START}\nold table\n{report.README_END}\nafter\n")
    report.update_readme([_record()], readme)
    text = readme.read_text()
    assert "old table" not in text and "ours (cuda fwd)" in text and text.endswith("after\n")
    report.update_readme([_record(gpu=None)], readme)  # CPU smoke runs never become the README's table
    assert "No GPU benchmark results yet" in readme.read_text() and "ours (cuda fwd)" not in readme.read_text()
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="perf-table"):
        report.update_readme([_record()], readme)


def test_dispatch_entries_from_gpu_results_only(tmp_path):
    gpu = _record()
    gpu["_path"] = str(tmp_path / "a.json")
    cpu = _record(gpu=None)
    cpu["_path"] = str(tmp_path / "b.json")
    entries = report.dispatch_entries([gpu, cpu])
    assert {(e["grad"], e["backend"]) for e in entries} == {(False, "cuda"), (True, "triton")}
    assert all(e["gpu"] == H100 and e["shape"] == {"seq": 261, "head_dim": 64, "causal": False} for e in entries)
    assert report.backend_of("ours_triton") == "triton" and report.backend_of("sdpa flash") is None
    assert report.backend_of("ours (cuda fwd, sm80)") == "cuda"


def test_measured_choice_matches_gpu_dtype_grad_and_nearest_size(monkeypatch):
    def entry(seq, backend, grad=False, causal=False, gpu=H100):
        return {"gpu": gpu, "family": "attention", "grad": grad, "dtype": "bfloat16",
                "shape": {"seq": seq, "head_dim": 64, "causal": causal}, "backend": backend}

    entries = (entry(261, "cuda"), entry(4101, "triton"), entry(77, "torch", causal=True),
               entry(261, "triton", grad=True), entry(261, "torch", gpu="NVIDIA A100-SXM4-80GB"))
    monkeypatch.setattr(dispatch, "_measured_entries", lambda: entries)
    x = torch.zeros(1, dtype=torch.bfloat16)
    info = {"head_dim": 64, "causal": False, "grad": False}
    assert dispatch.measured_choice("attention", x, {**info, "seq": 300}, gpu=H100) == "cuda"
    assert dispatch.measured_choice("attention", x, {**info, "seq": 3000}, gpu=H100) == "triton"
    assert dispatch.measured_choice("attention", x, {**info, "seq": 300, "grad": True}, gpu=H100) == "triton"
    assert dispatch.measured_choice("attention", x, {**info, "causal": True, "seq": 77}, gpu=H100) == "torch"
    assert dispatch.measured_choice("attention", x, {**info, "head_dim": 128, "seq": 77}, gpu=H100) is None
    assert dispatch.measured_choice("attention", x.float(), {**info, "seq": 300}, gpu=H100) is None
    assert dispatch.measured_choice("attention", x, {**info, "seq": 300}, gpu="NVIDIA L4") is None
    assert dispatch.measured_choice("attention", x, {**info, "seq": 300}) is None  # a CPU tensor: no GPU to match
    assert dispatch.resolve("attention", None, x, **info, seq=300) == "torch"  # CPU tensors always run torch


def test_shipped_dispatch_table_is_valid():
    dispatch._measured_entries.cache_clear()
    entries = dispatch._measured_entries()
    for e in entries:
        assert e["family"] in dispatch.MATCH_KEYS and e["backend"] in dispatch.KNOWN_BACKENDS
        exact, size = dispatch.MATCH_KEYS[e["family"]]
        assert all(k in e["shape"] for k in exact + ((size,) if size else ()))


def test_corrupt_dispatch_table_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "measured_dispatch.json"
    bad.write_text("{")
    monkeypatch.setattr(dispatch, "MEASURED_FILE", bad)
    dispatch._measured_entries.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="corrupt"):
            dispatch._measured_entries()
    finally:
        dispatch._measured_entries.cache_clear()


def test_cpu_runs_are_smoke_checks_except_the_cpu_measured_benchmark():
    """A CPU run of a GPU benchmark is labelled a smoke check; the reference benchmark (the torch backend against
    naive PyTorch at real shapes) is a CPU measurement and is not."""
    assert "CPU smoke check" in report._heading(_record(gpu=None, benchmark="dense"))
    assert "CPU smoke check" not in report._heading(_record(gpu=None, benchmark="reference"))
    assert "CPU smoke check" not in report._heading(_record())

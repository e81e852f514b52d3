"""benchmarks/contrastive.py: the CPU smoke run end to end (its JSON: every method's rows, FLOP counts, gradient
checks, ratios, skipped rows)."""
import pytest

tuning = pytest.importorskip("dinotxt_fast.ops.triton.tuning")


def test_benchmark_smoke_run(tmp_path):
    """benchmarks/contrastive.py --device cpu --quick: every method at tiny shapes into one schema-2 JSON (ceilings,
    ratios, gradients checked against the first method computing the same quantity, the naive method's own work);
    Inf-CL and the CUDA kernels give skipped rows here instead of aborting the run."""
    import importlib
    import json

    if not tuning.INTERPRET:
        pytest.skip("the Triton kernels were imported for the GPU: the CPU smoke run needs TRITON_INTERPRET=1")
    bench = importlib.import_module("benchmarks.contrastive")
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    out, = tmp_path.glob("contrastive-*.json")
    result = json.loads(out.read_text())
    assert result["schema"] == 2 and result["benchmark"] == "contrastive"
    assert result["ceilings"]["matmul_tflops"] > 0 and result["ceilings"]["copy_gbps"] > 0
    assert result["environment"]["triton_interpret"] and result["notes"]["targets"]
    rows = result["results"]
    assert {r["case"] for r in rows} == {"48x48", "32x96"}
    timed = [r for r in rows if "median_ms" in r]
    for case, flops in (("48x48", 8 * 48 * 48 * 32), ("32x96", 8 * 32 * 96 * 32)):  # 8 * B_local * B_global * E
        got = {r["impl"]: r for r in timed if r["case"] == case}
        assert set(got) == {"naive", "open_clip_local", "official_ring", "ours (torch)", "ours (triton)"}
        assert all(r["pass"] == "fwd+bwd" and r["median_ms"] > 0 for r in got.values())
        assert all(r["tflops"] == pytest.approx(flops / (r["median_ms"] * 1e-3) / 1e12) for r in got.values())
        for name in ("ours (torch)", "ours (triton)"):
            row = got[name]
            assert row["speedup_vs_best_baseline"] > 0 and row["best_baseline"] in got
            assert set(row["speedup_vs_each_baseline"]) == {"naive", "open_clip_local", "official_ring"}
        checked = [r for r in got.values() if "max_abs_diff" in r]
        assert all(r["max_abs_diff"] < 1e-5 and r["max_rel_diff"] < 1e-4 for r in checked)
        if case == "48x48":  # one loss: every method against the first (naive)
            assert {r["impl"] for r in checked} == {"open_clip_local", "official_ring", "ours (torch)",
                                                    "ours (triton)"}
            assert {r["checked_against"] for r in checked} == {"naive"}
        else:  # one rank of a bigger batch: our backends against ours (torch); the naive one does 3x the work
            assert [(r["impl"], r["checked_against"]) for r in checked] == [("ours (triton)", "ours (torch)")]
            assert got["naive"]["work_flops"] == 8 * 96 * 96 * 32
            assert got["naive"]["work_tflops"] == pytest.approx(3 * got["naive"]["tflops"])
    skipped = {(r["case"], r["impl"]) for r in rows if "skipped" in r}
    assert skipped == {(case, name) for case in ("48x48", "32x96") for name in ("inf_cl", "ours (cuda)")}

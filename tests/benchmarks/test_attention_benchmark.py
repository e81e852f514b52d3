"""benchmarks/attention.py: the CPU smoke run end to end (its JSON: rows, checks, ratios, skipped rows) and the
deterministic mode's restoring of torch's global flags."""
import pytest
import torch

triton_attention = pytest.importorskip("dinotxt_fast.ops.triton.attention")


def test_benchmark_smoke_run(tmp_path, monkeypatch):
    """benchmarks/attention.py --device cpu --quick: tiny shapes through ours and SDPA math into one schema-2 JSON
    (ceilings, ratios, max_abs_diff against the first implementation); a failing baseline and the unavailable
    CUDA/optional implementations give skipped rows instead of aborting the run."""
    import importlib
    import json

    if not triton_attention._INTERPRET:
        pytest.skip("the Triton kernels were imported for the GPU: the CPU smoke run needs TRITON_INTERPRET=1")
    bench = importlib.import_module("benchmarks.attention")
    assert [c.seq for c in bench.CASES[:3]] == [261, 1029, 4101]

    def broken(q, k, v, causal, lengths):
        raise RuntimeError("this baseline is broken")

    real = bench.implementations
    monkeypatch.setattr(bench, "implementations",
                        lambda device, deterministic_rows=True: real(device, deterministic_rows)
                        + [bench.Impl("broken baseline", broken)])
    fill = torch.utils.deterministic.fill_uninitialized_memory
    assert bench.main(["--device", "cpu", "--quick", "--passes", "fwd,bwd", "--out", str(tmp_path)]) == 0
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory == fill
    out, = tmp_path.glob("attention-*.json")
    result = json.loads(out.read_text())
    assert result["schema"] == 2 and result["benchmark"] == "attention"
    assert result["ceilings"]["matmul_tflops"] > 0 and result["ceilings"]["copy_gbps"] > 0
    assert result["environment"]["triton_interpret"]
    assert {t["metric"] for t in result["notes"]["targets"]} == {"tflops", "speedup_vs_best_sdpa"}
    rows = result["results"]
    timed = [r for r in rows if "median_ms" in r]
    assert {r["impl"] for r in timed} == {"ours (triton)", "ours (triton, caption lengths)",
                                          "ours (triton, deterministic bwd)", "sdpa math"}
    assert {r["pass"] for r in timed} == {"fwd", "bwd"}
    assert all(r["median_ms"] > 0 and r["tflops"] > 0 and "fraction_of_matmul_peak" in r for r in timed)
    ours = [r for r in timed if r["impl"].startswith("ours")]
    assert all(r["best_baseline"] == "sdpa math" and r["speedup_vs_best_baseline"] > 0
               and r["speedup_vs_best_sdpa"] == r["speedup_vs_best_baseline"] for r in ours)
    checked = [r for r in timed if "max_abs_diff" in r]
    assert {r["impl"] for r in checked} == {"ours (triton, caption lengths)", "ours (triton, deterministic bwd)",
                                            "sdpa math"}
    assert all(r["checked_against"] == "ours (triton)" and r["max_abs_diff"] < 1e-4 for r in checked)
    assert all(r["max_abs_diff_grad"] < 1e-4 for r in checked if "caption lengths" not in r["impl"])
    lengths = [r for r in ours if r["case"] == "tiny text, caption lengths"]
    assert {r["speedup_kind"].split(" ")[0] for r in lengths} == {"same", "end-to-end-equivalent"}
    skipped = {r["impl"]: r["skipped"] for r in rows if "skipped" in r}
    assert "this baseline is broken" in skipped["broken baseline"]
    assert "ours (cuda fwd)" in skipped and "sdpa flash" in skipped and "xformers memory_efficient_attention" in skipped


def test_benchmark_deterministic_mode_restores_state():
    """The deterministic rows run without torch's NaN filling of new tensors, and leave the global flags as found."""
    import importlib

    bench = importlib.import_module("benchmarks.attention")
    fill = torch.utils.deterministic.fill_uninitialized_memory
    with bench._deterministic_mode():
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory == fill

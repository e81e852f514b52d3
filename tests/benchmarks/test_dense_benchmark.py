"""benchmarks/dense.py (decoding): the CPU smoke run writes its schema-2 JSON record with whole and slide rows for
ours (Triton, interpreter), the torch backend and the eager reference, checked against it."""
import torch


def test_benchmark_smoke_run(smoke_run):
    """benchmarks/dense.py --device cpu --quick runs on the harness and writes its schema-2 JSON record: decoding rows
    for ours (Triton, interpreter) and the eager reference, checked against it."""
    record = smoke_run("dense")
    assert record["ceilings"]["copy_gbps"] > 0 and "targets" in record["notes"]
    rows = {(r["case"], r["impl"], r["pass"]): r for r in record["results"]}
    # Triton runs on CPU tensors only where its kernels were imported under the interpreter (not on a GPU machine).
    triton_here = not torch.cuda.is_available()
    for pass_ in ("whole", "slide"):
        assert rows[("tiny C=5 40x55", "eager interpolate+softmax+argmax", pass_)]["median_ms"] > 0
        assert rows[("tiny C=5 40x55", "torch backend (chunked reference)", pass_)]["pixel_agreement"] == 1.0
        ours = rows[("tiny C=5 40x55", "ours (triton)", pass_)]
        if triton_here:
            assert ours["pixel_agreement"] == 1.0 and ours["max_abs_diff"] < 1e-5 and ours["speedup_vs_eager"] > 0
    assert "skipped" in rows[("tiny C=5 40x55", "ours (cuda)", "slide")]  # no CUDA device here: recorded, not fatal

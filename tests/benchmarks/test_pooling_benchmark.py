"""benchmarks/pooling.py: the CPU smoke run writes its schema-2 JSON record with pooling rows for ours (Triton,
interpreter) and the eager reference, checked against it."""
import torch


def test_benchmark_smoke_run(smoke_run):
    """benchmarks/pooling.py --device cpu --quick runs on the harness and writes its schema-2 JSON record: forward and
    backward rows for ours (Triton, interpreter) and the eager reference, checked against it."""
    record = smoke_run("pooling")
    assert record["ceilings"]["copy_gbps"] > 0 and "targets" in record["notes"]
    rows = {(r["case"], r["impl"], r["pass"]): r for r in record["results"]}
    # Triton runs on CPU tensors only where its kernels were imported under the interpreter (not on a GPU machine).
    triton_here = not torch.cuda.is_available()
    for case in ("tiny pool", "tiny pool +LN+L2"):
        for pass_ in ("fwd", "bwd"):
            ours, eager = rows[(case, "ours (triton)", pass_)], rows[(case, "eager", pass_)]
            assert eager["median_ms"] > 0 and eager["fraction_of_copy_bandwidth"] > 0
            if triton_here:
                assert ours["gbps"] > 0 and ours["max_abs_diff"] < 1e-5 and ours["speedup_vs_best_baseline"] > 0
                assert ours["best_baseline"] in ("eager", "torch backend (reference op)")  # compile: CUDA only

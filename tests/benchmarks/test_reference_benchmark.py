"""benchmarks/reference.py (the torch backend against naive PyTorch): one case through the subprocess workers, its
schema-2 JSON record with time, peak memory, thread count and load average per row, and the peak-memory method."""
import torch

from benchmarks import reference


def test_benchmark_smoke_run(smoke_run):
    record = smoke_run("reference", "--case", "patch_text_logits", "--threads", "1")
    assert record["settings"]["threads"] == [1] and len(record["settings"]["loadavg_at_start"]) == 3
    rows = {(r["impl"], r["pass"]): r for r in record["results"]}
    naive, ours = rows[(reference.NAIVE, "1 thread")], rows[(reference.OURS, "1 thread")]
    for row in (naive, ours):
        assert row["median_ms"] > 0 and row["threads"] == 1 and len(row["times_ms"]) >= reference.MIN_REPS
        assert row["peak_memory_mib"] is not None and row["memory_method"]
        assert len(row["loadavg_before"]) == 3 and len(row["loadavg_end"]) == 3
    assert ours["backends_used"] == {"patch_text_logits": ["torch"]}  # the torch backend is what ran
    assert ours["max_rel_diff"] < 1e-5 and ours["speedup_vs_naive"] > 0 and isinstance(ours["target_met"], bool)
    assert naive["expression"].startswith("einsum")


def test_peak_memory_counts_what_a_call_allocates():
    """The workers' CPU peak memory: a call that allocates 191 MiB measures about that, whatever the process held
    before it (on Linux the peak is reset to the current resident set size first)."""
    held = torch.ones(25_000_000)  # 95 MiB resident before the measured call: not counted
    peak, method = reference._peak_memory_mib(lambda: torch.ones(50_000_000), "cpu")  # 191 MiB
    if method.startswith("VmHWM"):  # Linux: the peak is reset before the call
        assert 180 < peak < 230, peak
    else:  # ru_maxrss cannot be reset: a lower bound
        assert peak >= 0
    del held

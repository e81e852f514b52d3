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


def test_main_job_cases_target_naive_speed_without_a_memory_target():
    """The embedded main job's shapes (issue #19) are cases of their own: not slower than naive; their KiB-sized
    allocations carry no memory target, so a missing memory ratio does not fail them, while a slower row does."""
    main_job = [case for case in reference.CASES if case.name.endswith("(main job)")]
    assert {case.family for case in main_job} == {"contrastive_loss", "patch_pool", "attention"}
    assert all(case.min_speedup == 1.0 and case.min_memory_ratio is None for case in main_job)
    name = main_job[0].name
    rows = [{"case": name, "impl": reference.OURS, "speedup_vs_naive": 1.2},
            {"case": name, "impl": reference.OURS, "speedup_vs_naive": 0.8, "memory_ratio_vs_naive": 5.0}]
    reference.add_targets(rows)
    assert [row["target_met"] for row in rows] == [True, False]

"""The shared harness of benchmarks/: input rotation, strict JSON, the driver every script declares its cases on
(common flags, case loop, skipped rows, settings, ratios), the one list of benchmarks and the suite runner."""
import importlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

import benchmarks
from benchmarks import harness

ROOT = Path(__file__).resolve().parents[2]


def test_rotation_exceeds_twice_l2_and_cycles():
    mib = 2**20 // 4  # fp32 elements per MiB; a CPU's L2 is taken as 32 MiB
    small = harness.Rotation(lambda: (torch.zeros(5 * mib),), "cpu")
    assert len(small) == 8 and small.bytes_per_set == 5 * 2**20  # ceil(64 / 5) = 13, capped at max_copies
    medium = harness.Rotation(lambda: (torch.zeros(10 * mib), torch.zeros(6 * mib)), "cpu")
    assert len(medium) == 4  # 16 MiB per set: 4 sets = 64 MiB = 2 x L2
    assert len({id(medium.next()[0]) for _ in range(len(medium))}) == 4  # next() visits every set
    assert len(harness.Rotation(lambda: (torch.zeros(40 * mib),), "cpu")) == 2


def test_write_results_is_strict_json(tmp_path):
    rows = [harness.result("c", "ours (torch)", (float("nan"), 1.0, 2.0))]
    path = harness.write_results("attention", rows, {"time_utc": "t"}, None, tmp_path)
    record = json.loads(path.read_text())  # NaN written as null, so strict parsers accept it
    assert record["results"][0]["median_ms"] is None and record["schema"] == harness.SCHEMA


def test_suite_rejects_unknown_benchmarks(capsys):
    from benchmarks.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["nope"])
    assert "unknown benchmark" in capsys.readouterr().err
    assert parse_args(["all"]).which == ["attention", "pooling", "contrastive", "dense", "reference", "infer", "train"]
    assert parse_args(["train", "attention"]).which == ["attention", "train"]


def test_cli_bench_forwards_to_the_suite(capfd):
    from dinotxt_fast import cli

    assert cli.main(["bench", "-h"]) == 0  # the suite runs in a child process (tests/test_cli.py says why)
    assert capfd.readouterr().out.startswith("usage: dinotxt-fast bench")


# ------------------------------------------------------------------------------------------------------- driver
class _Case:
    def __init__(self, name):
        self.name = name


def _toy(run_case, **fields):
    """A benchmark of two cases, "ok" and "broken", on the shared driver."""
    return harness.Benchmark("toy", "A toy benchmark.\n\nIts epilog.", lambda args: [_Case("ok"), _Case("broken")],
                             run_case, **fields)


def test_driver_runs_every_case_and_records_a_failing_one(tmp_path, capsys):
    """The case loop: a case whose setup raises gives a "(case setup)" skipped row with its error and the next case
    still runs; the ratios and the script's own ratio functions are added; settings get device, quick, budget_s."""
    seen = []

    def run_case(run, case):
        seen.append((case.name, run.state, run.quick, run.device.type))
        if case.name == "broken":
            raise MemoryError("the inputs do not fit\nsecond line")
        return [harness.result(case.name, "ours (torch)", (1.0, 0.9, 1.1), pass_="fwd"),
                harness.result(case.name, "eager", (2.0, 1.9, 2.1), pass_="fwd")]

    def mark(rows):
        for row in rows:
            row["marked"] = True

    bench = _toy(run_case, setup=lambda run: "shared", ratios=(mark,), setup_pass="fwd",
                 settings=lambda run, cases: {"cases": [c.name for c in cases]}, notes={"how": "toy"})
    assert bench.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    assert seen == [("ok", "shared", True, "cpu"), ("broken", "shared", True, "cpu")]  # a CPU run is always quick
    (path,) = tmp_path.glob("toy-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["benchmark"] == "toy" and record["schema"] == harness.SCHEMA and record["notes"] == {"how": "toy"}
    assert record["settings"] == {"device": "cpu", "quick": False, "budget_s": None, "cases": ["ok", "broken"]}
    assert record["ceilings"]["matmul_tflops"] > 0
    rows = {(r["case"], r["impl"]): r for r in record["results"]}
    assert rows[("ok", "ours (torch)")]["speedup_vs_best_baseline"] == pytest.approx(2.0)
    assert all(r["marked"] for r in record["results"])
    failed = rows[("broken", "(case setup)")]
    assert failed["skipped"] == "MemoryError: the inputs do not fit" and failed["pass"] == "fwd"
    assert "2.00x vs eager" in capsys.readouterr().out


def test_driver_budget_list_and_device_checks(tmp_path, capsys):
    def run_case(run, case):
        return [harness.result(case.name, "ours (torch)", skipped=run.budget() or "within the budget")]

    bench = _toy(run_case, describe=lambda case: f"case {case.name}")
    assert bench.main(["--device", "cpu", "--budget-s", "1e-9", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("toy-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["settings"]["budget_s"] == 1e-9
    assert all("--budget-s 1e-09" in r["skipped"] for r in record["results"])
    capsys.readouterr()
    assert bench.main(["--device", "cpu", "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == ["case ok", "case broken"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--budget-s", "0"])
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_every_listed_benchmark_is_a_script_on_the_driver(capsys):
    """benchmarks.BENCHMARKS names every script in benchmarks/ (and only those), each declared on the harness with
    the common flags, in the suite's order: kernels first."""
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "__main__", "harness", "report"}
    assert set(benchmarks.BENCHMARKS) == scripts
    assert list(benchmarks.BENCHMARKS)[:4] == ["attention", "pooling", "contrastive", "dense"]
    for name, entry in benchmarks.BENCHMARKS.items():
        module = importlib.import_module(f"benchmarks.{name}")
        assert module.BENCHMARK.name == name and module.main == module.BENCHMARK.main
        assert entry.suite_share > 0
        flags = module.BENCHMARK.parser().format_help()
        assert all(flag in flags for flag in ("--device", "--quick", "--out", "--budget-s", "--list")), name
        assert module.main(["--device", "cpu", "--quick", "--list"]) == 0
        assert capsys.readouterr().out.strip(), f"{name} --list printed no case"


def test_gpu_suite_reads_the_one_list():
    """gpu_suite.sh takes its benchmarks and their time shares from benchmarks.BENCHMARKS, in its order."""
    script = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")]).returncode == 0
    start = script.index("declare -A WEIGHT=()")
    end = script.index('ALL_BENCHMARKS="${ALL_BENCHMARKS# }"') + len('ALL_BENCHMARKS="${ALL_BENCHMARKS# }"')
    probe = script[start:end] + '\necho "$ALL_BENCHMARKS"; for n in $ALL_BENCHMARKS; do echo "$n=${WEIGHT[$n]}"; done'
    out = subprocess.run(["bash", "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == " ".join(benchmarks.BENCHMARKS)
    assert lines[1:] == [f"{n}={e.suite_share}" for n, e in benchmarks.BENCHMARKS.items()]

"""The two GPU calls (benchmarks/gpu_prove.sh: correctness; benchmarks/gpu_suite.sh: measuring) without a GPU: their
shell syntax, their CPU smoke modes (SMOKE=1: the proof's plan; the suite's steps on the CPU), and the harness
keeping the JSON of the cases a stopped benchmark finished."""
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["gpu_prove.sh", "gpu_suite.sh", "gpu_common.sh"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "BENCH", "BUDGET_S")}
    return {**env, **extra}


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script,default,documented", [
    ("gpu_prove.sh", 'BUDGET_S="${BUDGET_S:-180}"', ["BUDGET_S=180", "# Budget, estimated", "5 minutes"]),
    ("gpu_suite.sh", "echo 480", ["BUDGET_S=480", "8 minutes", "its share"])])
def test_scripts_state_their_budgets(script, default, documented):
    """Each script's default budget is the one its header documents, with how its steps share it."""
    text = (ROOT / "benchmarks" / script).read_text()
    assert default in text
    for phrase in documented:
        assert phrase in text, f"{script} does not say {phrase!r}"


def test_prove_smoke_plans_every_family(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_prove.sh", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=_env(SMOKE="1"))
    log = (tmp_path / "gpu_prove.log").read_text()
    assert done.returncode == 0, log[-4000:]
    assert "the proof holds" in log and "gpu_prove smoke: passed" in log
    assert (tmp_path / "gpu_prove.xml").is_file()
    assert "fixed)" in log  # the fixed-configuration compile count of the budget


def test_suite_smoke_leaves_results_report_and_tarball(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=_env(SMOKE="1", BENCH="pooling"))
    log = (tmp_path / "gpu_suite.log").read_text()
    assert done.returncode == 0, log[-4000:]
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = tar.getnames()
        (json_name,) = [n for n in names if n.endswith(".json")]
        record = json.load(tar.extractfile(json_name))
    assert "./REPORT.md" in names and record["benchmark"] == "pooling" and record["progress"]["complete"]
    assert not (tmp_path / "suite").exists()  # everything is in the tarball


_SLOW_BENCHMARK = textwrap.dedent("""
    import sys, time
    from benchmarks.harness import Benchmark, result

    def run_case(run, case):
        if case == "slow":
            time.sleep(120)
        return [result(case, "ours (torch)", (1.0, 0.9, 1.1))]

    bench = Benchmark(name="stopped", doc="a benchmark stopped at its second case", cases=lambda args: ["fast", "slow"],
                      run_case=run_case, describe=lambda case: case)
    sys.exit(bench.main(["--device", "cpu", "--out", sys.argv[1]]))
""")


def test_a_benchmark_stopped_mid_run_keeps_the_cases_it_finished(tmp_path):
    """The suite stops a benchmark at its share of the time (SIGTERM, then SIGKILL): the JSON of its finished cases
    must be on disk already (the harness rewrites it after every case)."""
    process = subprocess.Popen([sys.executable, "-c", _SLOW_BENCHMARK, str(tmp_path)], cwd=ROOT,
                               env=_env(PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("stopped-*.json")) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            time.sleep(0.5)
    finally:
        process.kill()
        process.wait()
    (path,) = tmp_path.glob("stopped-*.json")
    record = json.loads(path.read_text())
    assert [row["case"] for row in record["results"]] == ["fast"]
    assert record["progress"] == {"complete": False, "cases_done": 1, "cases": 2}

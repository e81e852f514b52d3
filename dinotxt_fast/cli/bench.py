"""`dinotxt-fast bench`: forwards every argument to `python -m benchmarks` of a source checkout (the suite and
its baselines live in the repository, not in the wheel). `main` hands it the raw arguments, -h included.

The suite runs in a fresh Python process: `import dinotxt_fast` (which the console script does before this module
runs) has already decorated the Triton kernels, and Triton reads TRITON_INTERPRET at decoration time, so only a new
process can run them under the interpreter for `--device cpu` (otherwise: "0 active drivers")."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .common import PROG, CLIError


def add_parser(sub):
    p = sub.add_parser("bench", help="run the benchmark suite (attention, contrastive, dense, train, infer, all)",
                       description="Run the benchmark suite of a source checkout: each benchmark against its "
                                   "baselines in the same run, JSON results, then REPORT.md and plots. Arguments "
                                   "are those of `python -m benchmarks`: [attention|contrastive|dense|train|infer|"
                                   "all ...] [--device cuda|cpu] [--quick] [--out DIR] [--no-report].",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of python -m benchmarks (-h for them)")
    return p


def run(args) -> int:
    return run_suite(args.bench_args)


def benchmarks_root() -> Path:
    """The source checkout holding benchmarks/ (next to this package when installed editable, or the current
    folder)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "benchmarks" / "harness.py").is_file():
            return root
    raise CLIError("the benchmark suite lives in the source repository (benchmarks/ next to dinotxt_fast/): run "
                   "this from a checkout (git clone ...; pip install -e .), or cd into one")


# The child: the suite's own entry point, with its usage line naming this command; Ctrl-C ends it quietly (130).
_SUITE = """import sys
try:
    from benchmarks.__main__ import main
    sys.exit(main(sys.argv[1:], prog={prog!r}))
except KeyboardInterrupt:
    sys.exit(130)
"""


def run_suite(bench_args: Sequence[str]) -> int:
    """Runs the suite in a child Python (its exit code is ours); the working directory stays the caller's, so
    relative --out paths mean what they say."""
    root = benchmarks_root()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    child = subprocess.Popen([sys.executable, "-c", _SUITE.format(prog=f"{PROG} bench"), *bench_args], env=env)
    try:
        return child.wait()
    except KeyboardInterrupt:  # stop the child too (a terminal's Ctrl-C already reached it), then report once
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
        raise

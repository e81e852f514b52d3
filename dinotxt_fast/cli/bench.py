"""`dinotxt-fast bench`: forwards every argument to `python -m benchmarks` of a source checkout (the suite and
its baselines live in the repository, not in the wheel). `main` hands it the raw arguments, -h included."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .common import CLIError


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


def run_suite(bench_args: Sequence[str]) -> int:
    root = benchmarks_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.__main__ import main as bench_main

    return bench_main(list(bench_args))

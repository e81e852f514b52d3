"""The benchmark suite: every benchmark on one harness in one process, then the report.

examples:
  python -m benchmarks                       every benchmark on the GPU (the default when one is present)
  python -m benchmarks attention --quick     one benchmark, reduced cases
  dinotxt-fast bench --device cpu            the CPU smoke mode (the same suite, from a source checkout)

Each benchmark writes `<out>/<benchmark>-<machine>-<time>.json` (benchmarks/harness.py: environment, measured
ceilings, median and 20/80 % quantiles, peak memory, ratios against the baselines measured in the same run);
then `benchmarks/report.py` writes `<out>/REPORT.md` and `<out>/plots/`. One failing benchmark is reported and the
others still run; the exit status is 1 when any failed.

--device cpu is a smoke mode: tiny shapes, every row run once through the same code, the Triton kernels under
Triton's CPU interpreter (TRITON_INTERPRET=1, set here before any kernel is imported). Its figures check that each
implementation runs; they are not performance measurements, and the report says so.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks import BENCHMARKS  # the one list, in run order: kernels, then end to end
from benchmarks.harness import RESULTS_DIR, add_budget_argument


def parse_args(argv=None, prog: str = "python -m benchmarks") -> argparse.Namespace:
    """The suite's arguments; `prog` is the command shown in the usage line (`dinotxt-fast bench` runs this too)."""
    description, epilog = __doc__.split("\n\n", 1)  # the first paragraph once, as the description
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    parser.add_argument("which", nargs="*", default=["all"], metavar="BENCHMARK",
                        help=f"any of {', '.join(BENCHMARKS)}, or all (default)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda: the real benchmark (default when a GPU is present); cpu: smoke runs of tiny "
                             "shapes, Triton under its interpreter (not performance figures), except `reference`, "
                             "whose CPU run is the measurement of the torch backend against naive PyTorch")
    parser.add_argument("--quick", action="store_true", help="reduced case lists and repetitions (GPU suite: < 9 min)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    parser.add_argument("--no-report", action="store_true", help="skip REPORT.md and the plots")
    add_budget_argument(parser)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.which) - set(BENCHMARKS) - {"all"})
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)} or all")
    args.which = list(BENCHMARKS) if "all" in args.which else [b for b in BENCHMARKS if b in args.which]
    return args


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    args = parse_args(argv, prog)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported
        print("CPU smoke run: tiny shapes, Triton under its CPU interpreter; the figures check that every row runs "
              "and are not performance measurements", flush=True)
    out = Path(args.out)
    before = set(out.glob("*.json")) if out.is_dir() else set()
    failed = []
    suite_start = time.monotonic()
    for name in args.which:
        print(f"=== benchmark {name} ({args.device}{', quick' if args.quick else ''})", flush=True)
        start = time.perf_counter()
        flags = ["--device", args.device, "--out", str(out)] + (["--quick"] if args.quick else [])
        if args.budget_s is not None:  # what is left of the whole run's budget (a spent one still writes its rows)
            flags += ["--budget-s", f"{max(args.budget_s - (time.monotonic() - suite_start), 1e-3):.3f}"]
        try:
            status = importlib.import_module(f"benchmarks.{name}").main(flags)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others' results
            traceback.print_exc()
            status = 1
        print(f"=== benchmark {name}: {'ok' if not status else f'FAILED ({status})'} after "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if status:
            failed.append(name)
        if args.device == "cuda":
            import torch

            torch.cuda.empty_cache()
    new = sorted(set(out.glob("*.json")) - before) if out.is_dir() else []
    if new and not args.no_report:
        from benchmarks import report

        report.main([str(p) for p in new] + ["--out", str(out)])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The `dinotxt-fast` command line: info, encode, classify, segment, train, export, bench.

This package only parses and dispatches. Each command is a module of it with `add_parser(subparsers)` (adds its
sub-parser, returns it) and `run(args) -> exit code`, listed once in COMMANDS; a new command is a new module
plus its entry there. What several commands share (the model arguments, loading the model, device and dtype,
class names, image batches) is in `common.py`. Exit codes: 0 success, 1 a file or value problem
(OSError/ValueError), 2 a usage problem (CLIError, argparse), 130 interrupted (Ctrl-C). Every error is one line on
stderr, without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import bench, classify, encode, eval, export, info, segment, train
from .common import PROG, CLIError

COMMANDS = (info, encode, classify, segment, eval, train, export, bench)  # in the order `--help` lists them


def build_parser() -> argparse.ArgumentParser:
    from ..info import package_version

    parser = argparse.ArgumentParser(prog=PROG, description="Fast DINO.txt: kernels, inference and training.")
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(handler=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's code for SIGINT (train has saved its checkpoint)
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"{PROG}{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # every argument, -h included, belongs to the suite's own parser
        try:
            return bench.run_suite(argv[1:])
        except CLIError as exc:
            print(f"{PROG} bench: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "train":
        extra = train.take_overrides(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    from ..ops import use_backend

    try:
        with use_backend(getattr(args, "backend", None)):  # every op the command runs (model, decoding)
            return int(args.handler(args) or 0)
    except CLIError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable/corrupt files, bad shapes or weights: one clear line
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1

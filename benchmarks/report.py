"""Tables, plots and the measured dispatch table, generated from benchmark JSON (never typed by hand).

    python -m benchmarks.report                         # latest result per benchmark and machine in benchmarks/results
    python -m benchmarks.report FILE.json DIR ... --out DIR
    python -m benchmarks.report --readme                # also rewrite README.md's performance table
    python -m benchmarks.report --update-dispatch       # also rewrite dinotxt_fast/ops/measured_dispatch.json

Writes `<out>/REPORT.md` (a summary table per benchmark: our best implementation per case and pass against the best
baseline measured in the same run, then every row) and `<out>/plots/<benchmark>-<machine>-{speedup,memory}.png`.

The dispatch table records, per GPU model, op family and benchmark case, which of our backends measured fastest; the
auto dispatch (dinotxt_fast.ops.dispatch) then picks per shape from it. Only GPU results feed it: those of the
benchmarks whose op family (benchmarks.BENCHMARKS) the dispatch matches on shape keys (dispatch.MATCH_KEYS).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks.harness import RESULTS_DIR  # noqa: E402

README = ROOT / "README.md"
DISPATCH_FILE = ROOT / "dinotxt_fast" / "ops" / "measured_dispatch.json"
README_START, README_END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
OUR_BACKENDS = ("cuda", "triton", "torch")


def dispatch_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    """{benchmark: (its op family, the shape keys the dispatch matches that family on)} for the benchmarks that can
    steer the measured dispatch (dispatch.MATCH_KEYS: exact keys, then the size key matched to the nearest case)."""
    from dinotxt_fast.ops.dispatch import MATCH_KEYS

    families = {}
    for name, entry in BENCHMARKS.items():
        if entry.family in MATCH_KEYS:
            exact, size = MATCH_KEYS[entry.family]
            families[name] = (entry.family, tuple(exact) + ((size,) if size else ()))
    return families


def _order(record: dict) -> tuple:
    """Records in the suite's order (benchmarks.BENCHMARKS), then by machine."""
    names = list(BENCHMARKS)
    name = record["benchmark"]
    return (names.index(name) if name in names else len(names), name, _machine(record))


# --------------------------------------------------------------------------------------------------------- load
def load(paths: Iterable) -> list[dict]:
    """Result records from files and folders; in a folder, the newest file per (benchmark, machine)."""
    records, newest = [], {}
    for path in map(Path, paths):
        if path.is_dir():
            for file in sorted(path.glob("*.json")):
                record = _read(file)
                if record is None:
                    continue
                key = (record["benchmark"], _machine(record))
                if key not in newest or _time(record) > _time(newest[key]):
                    newest[key] = record
        elif path.is_file():
            record = _read(path)
            if record is not None:
                records.append(record)
        else:
            raise FileNotFoundError(f"no such result file or folder: {path}")
    return records + sorted(newest.values(), key=_order)


def _read(path: Path) -> Optional[dict]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON result file ({error})") from None
    if not isinstance(record, dict) or "benchmark" not in record or "results" not in record:
        print(f"skipping {path}: not a benchmark result file", file=sys.stderr)
        return None
    if record.get("schema", 1) < 2:
        print(f"skipping {path}: result schema {record.get('schema', 1)} predates benchmarks/harness.py",
              file=sys.stderr)
        return None
    record["_path"] = str(path)
    return record


def _machine(record: dict) -> str:
    env = record.get("environment", {})
    return env.get("gpu") or f"CPU ({env.get('cpu', '?')}, {env.get('cpu_count', '?')} cores)"


def _time(record: dict) -> str:
    return record.get("environment", {}).get("time_utc", "")


def _is_gpu(record: dict) -> bool:
    return bool(record.get("environment", {}).get("gpu"))


# Benchmarks whose CPU runs are measurements at real shapes (the torch backend against naive PyTorch), not smoke checks.
CPU_MEASURED = {"reference"}


def _heading(record: dict) -> str:
    """The benchmark and machine; CPU runs of the GPU benchmarks are marked as the smoke checks they are (tiny
    shapes, interpreter)."""
    smoke = ("" if _is_gpu(record) or record["benchmark"] in CPU_MEASURED
             else " (CPU smoke check: tiny shapes, not a performance figure)")
    return f"{record['benchmark']}: {_machine(record)}{smoke}"


def backend_of(impl: str) -> Optional[str]:
    """Our backend named in an implementation label ("ours (triton)", "ours_cuda", "ours (cuda fwd, sm80)")."""
    if not impl.startswith("ours"):
        return None
    for name in OUR_BACKENDS:
        if re.search(rf"\b{name}\b", impl.replace("_", " ")):
            return name
    return None


# ------------------------------------------------------------------------------------------------------ tables
def _throughput(row: dict) -> str:
    if "tflops" in row:
        return f"{_num(row['tflops'])} TFLOP/s"
    if "gbps" in row:
        return f"{_num(row['gbps'])} GB/s"
    for key, value in row.items():
        if key.endswith("_per_s"):
            return f"{_num(value)} {key[:-6].replace('_', ' ')}/s"
    return ""


def _num(value: float) -> str:
    """1 decimal from 10 up, 3 significant digits below (CPU smoke runs are tiny)."""
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def _of_ceiling(row: dict) -> str:
    for key in ("fraction_of_matmul_peak", "fraction_of_copy_bandwidth"):
        if row.get(key) is not None:
            return f"{_num(100 * row[key])}%"
    return ""


def _ms(row: dict) -> str:
    return f"{row['median_ms']:.3f} ({row['q20_ms']:.3f}-{row['q80_ms']:.3f})"


def _mib(value) -> str:
    return "" if value is None else f"{value:.0f}"


def best_ours(record: dict) -> list[dict]:
    """Our fastest timed row per (case, pass), in case order."""
    best: dict = {}
    for row in record["results"]:
        if row["impl"].startswith("ours") and "median_ms" in row:
            key = (row["case"], row.get("pass"))
            if key not in best or row["median_ms"] < best[key]["median_ms"]:
                best[key] = row
    return list(best.values())


def summary_table(record: dict) -> str:
    lines = ["| case | pass | ours | median ms (20-80%) | throughput | of ceiling | peak MiB | best baseline | "
             "speedup | memory saving |", "|" + " --- |" * 10]
    for row in best_ours(record):
        base = row.get("best_baseline")
        lines.append(
            f"| {row['case']} | {row.get('pass') or ''} | {row['impl']} | {_ms(row)} | {_throughput(row)} | "
            f"{_of_ceiling(row)} | {_mib(row.get('peak_memory_mib'))} | {base or 'none measured'} | "
            + (f"{row['speedup_vs_best_baseline']:.2f}x" if base else "") + " | "
            + (f"{row['memory_ratio_vs_best_baseline']:.1f}x" if row.get("memory_ratio_vs_best_baseline") else "")
            + " |")
    return "\n".join(lines)


def full_table(record: dict) -> str:
    lines = ["| case | pass | implementation | median ms (20-80%) | throughput | of ceiling | peak MiB | note |",
             "|" + " --- |" * 8]
    for row in record["results"]:
        if "median_ms" in row:
            note = f"max abs diff {row['max_abs_diff']:.2e}" if row.get("max_abs_diff") is not None else ""
            lines.append(f"| {row['case']} | {row.get('pass') or ''} | {row['impl']} | {_ms(row)} | "
                         f"{_throughput(row)} | {_of_ceiling(row)} | {_mib(row.get('peak_memory_mib'))} | {note} |")
        else:
            lines.append(f"| {row['case']} | {row.get('pass') or ''} | {row['impl']} | skipped | | | | "
                         f"{str(row.get('skipped', ''))[:100].replace('|', '/')} |")
    return "\n".join(lines)


TARGET_KEYS = ("case", "impl", "pass", "metric", "target")
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


def _structured_targets(targets) -> bool:
    return isinstance(targets, list) and bool(targets) and all(
        isinstance(t, dict) and all(k in t for k in TARGET_KEYS) for t in targets)


def targets_table(record: dict, targets: list[dict]) -> str:
    """Issue targets against what this run measured: the row of (case, impl, pass) and its `metric` field."""
    rows = {(r["case"], r["impl"], r.get("pass")): r for r in record["results"] if "median_ms" in r}
    lines = ["| target (issue) | case | implementation | pass | metric | target | measured | met |",
             "|" + " --- |" * 8]
    for t in targets:
        row = rows.get((t["case"], t["impl"], t["pass"]))
        value = None if row is None else row.get(t["metric"])
        op = t.get("op", ">=")
        met = "" if value is None else ("yes" if _OPS[op](value, t["target"]) else "no")
        measured = "not measured in this run" if value is None else f"{value:.3g}"
        lines.append(f"| #{t.get('issue', '?')} | {t['case']} | {t['impl']} | {t['pass'] or ''} | {t['metric']} | "
                     f"{op} {t['target']} | {measured} | {met} |")
    return "\n".join(lines)


def machine_line(record: dict) -> str:
    env, ceil = record.get("environment", {}), record.get("ceilings") or {}
    parts = [_machine(record)]
    if env.get("driver"):
        parts.append(f"driver {env['driver']}")
    parts += [f"torch {env.get('torch')}", f"CUDA {env.get('cuda_runtime_torch')}", f"triton {env.get('triton')}",
              f"dinotxt-fast {env.get('dinotxt_fast')} @ {str(env.get('git_commit'))[:10]}"
              + (" (dirty)" if env.get("git_dirty") else "")]
    line = ", ".join(parts) + f"; {env.get('time_utc', '')}"
    if ceil:
        line += (f". Measured ceilings: {ceil.get('matmul_dtype')} matmul {ceil.get('matmul_tflops', 0):.1f} TFLOP/s, "
                 f"copy {ceil.get('copy_gbps', 0):.0f} GB/s")
    if record.get("settings", {}).get("quick"):
        line += ". Quick mode (reduced cases and repetitions)"
    return line


def markdown(records: list[dict], full: bool = True) -> str:
    out = []
    for record in records:
        out += [f"### {_heading(record)}", "", machine_line(record) + ".", "",
                summary_table(record), ""]
        notes = dict(record.get("notes") or {})
        targets = notes.pop("targets", None)
        if _structured_targets(targets):
            out += [targets_table(record, targets), ""]
        elif targets:
            notes["targets"] = targets
        if notes:
            out += [f"- {key}: {value}" for key, value in notes.items()] + [""]
        if full:
            out += ["<details><summary>every row</summary>", "", full_table(record), "", "</details>", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------- plots
def plots(records: list[dict], out_dir: Path) -> list[Path]:
    """Per benchmark and machine: speedup of our best row vs the best baseline per case/pass, and peak memory of
    ours vs that baseline (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        rows = [r for r in best_ours(record) if r.get("best_baseline")]
        if not rows:
            continue
        labels = [f"{r['case']}\n{r.get('pass') or ''}".strip() for r in rows]
        stem = f"{record['benchmark']}-{_slug(_machine(record))}"
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 2), 4.5))
        speedups = [r["speedup_vs_best_baseline"] for r in rows]
        ax.bar(range(len(rows)), speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("speedup vs best baseline (x)")
        ax.set_title(_heading(record), fontsize=9)
        fig.tight_layout()
        written.append(out_dir / f"{stem}-speedup.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
        mem = [r for r in rows if r.get("peak_memory_mib") is not None]
        baseline_mem = {(b["case"], b.get("pass"), b["impl"]): b.get("peak_memory_mib")
                        for b in record["results"] if "median_ms" in b}
        if mem:
            fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(mem) + 2), 4.5))
            x = range(len(mem))
            ax.bar([i - 0.2 for i in x], [r["peak_memory_mib"] for r in mem], width=0.4, label="ours")
            ax.bar([i + 0.2 for i in x], [baseline_mem.get((r["case"], r.get("pass"), r["best_baseline"])) or 0
                                          for r in mem], width=0.4, label="best baseline (by time)")
            ax.set_xticks(list(x), [f"{r['case']}\n{r.get('pass') or ''}".strip() for r in mem], rotation=45,
                          ha="right", fontsize=7)
            ax.set_ylabel("peak memory above inputs (MiB)")
            ax.legend(fontsize=8)
            ax.set_title(_heading(record), fontsize=9)
            fig.tight_layout()
            written.append(out_dir / f"{stem}-memory.png")
            fig.savefig(written[-1], dpi=120)
            plt.close(fig)
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


# -------------------------------------------------------------------------------------------- dispatch table
def dispatch_entries(records: list[dict]) -> list[dict]:
    """Per GPU, family and case: our fastest backend (forward alone for inference, fwd+bwd or the op's one timed
    pass for training), with the runner-up's time, from GPU records only."""
    entries, families = [], dispatch_families()
    for record in records:
        if not _is_gpu(record) or record["benchmark"] not in families:
            continue
        family, keys = families[record["benchmark"]]
        groups = defaultdict(list)
        for row in record["results"]:
            backend = backend_of(row["impl"])
            if row.get("speedup_kind", "same work") != "same work":
                continue  # e.g. caption-length rows do less work than the case: not comparable with the others
            if backend and "median_ms" in row and row.get("pass") in (None, "fwd", "fwd+bwd"):
                groups[(row["case"], row.get("pass"))].append((row["median_ms"], backend, row))
        for (case, pass_), timed in groups.items():
            timed.sort(key=lambda t: t[0])
            best_ms, backend, row = timed[0]
            shape = {k: row["shape"][k] for k in keys if k in row.get("shape", {})}
            if len(shape) != len(keys):
                continue  # a row without the keys the dispatch matches on cannot steer it
            entries.append({"gpu": record["environment"]["gpu"], "family": family, "case": case,
                            "grad": pass_ == "fwd+bwd", "dtype": record.get("settings", {}).get("dtype"),
                            "shape": shape, "backend": backend, "median_ms": best_ms,
                            "measured": {b: ms for ms, b, _ in timed},
                            "source": Path(record["_path"]).name})
    return entries


def write_dispatch(entries: list[dict], path: Path = DISPATCH_FILE) -> None:
    record = {"comment": "Generated by `python -m benchmarks.report --update-dispatch` from GPU benchmark results; "
                         "read by dinotxt_fast.ops.dispatch to pick the auto backend per GPU and shape.",
              "entries": entries}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    print(f"wrote {path} ({len(entries)} entries)")


# ------------------------------------------------------------------------------------------------------ README
def update_readme(records: list[dict], readme: Path = README) -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} section to replace")
    gpu = [r for r in records if _is_gpu(r)]  # CPU smoke runs are pipeline checks, not performance evidence
    body = markdown(gpu, full=False) if gpu else ("No GPU benchmark results yet: no GPU has been lent to this project "
                                                  "so far, so no speed is claimed anywhere.\n")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{body.strip()}\n{README_END}{tail}")
    print(f"updated {readme}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("paths", nargs="*", default=[str(RESULTS_DIR)], help="result files or folders")
    parser.add_argument("--out", default=None, help="where REPORT.md and plots/ go (default: the first folder given, "
                                                    "else benchmarks/results)")
    parser.add_argument("--readme", action="store_true",
                        help="rewrite README.md's performance table from the GPU results given")
    parser.add_argument("--update-dispatch", action="store_true",
                        help="rewrite dinotxt_fast/ops/measured_dispatch.json from the GPU results given")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    records = load(args.paths)
    if not records:
        print(f"no benchmark results in {args.paths}", file=sys.stderr)
        return 1
    out = Path(args.out or next((p for p in args.paths if Path(p).is_dir()), RESULTS_DIR))
    out.mkdir(parents=True, exist_ok=True)
    (out / "REPORT.md").write_text("# dinotxt-fast benchmark report\n\nGenerated by `python -m benchmarks.report` "
                                   "from the JSON results.\n\n" + markdown(records))
    print(f"wrote {out / 'REPORT.md'}")
    if not args.no_plots:
        for path in plots(records, out / "plots"):
            print(f"wrote {path}")
    if args.readme:
        update_readme(records)
    if args.update_dispatch:
        write_dispatch(dispatch_entries(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())

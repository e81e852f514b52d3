#!/usr/bin/env bash
# The measuring call on a GPU machine: build and install the package, run every benchmark (each in its own process,
# with its share of the time), write the report, and leave everything in one folder, within a time budget (default
# 8 minutes with --quick). Correctness is the other call's (benchmarks/gpu_prove.sh); there are no tests here.
#
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]      (default: $OUT when set, else benchmarks/results/gpu-<time>)
#
# Environment:
#   FULL=1             full case lists (default: --quick, sized so that the whole script stays within its budget)
#   BENCH="a b"        which benchmarks (default: every one of benchmarks.BENCHMARKS, in its order)
#   BUDGET_S=480       the whole script's time limit in seconds (default 480 with --quick, none with FULL=1; 0: none).
#                      The build gets at most 150 s (on a machine still warm from gpu_prove.sh it only relinks);
#                      each benchmark then gets its share of what is left (benchmarks.BENCHMARKS' suite_share): past
#                      80 % of it it starts no new implementation (their rows say so: --budget-s), at its share it
#                      is stopped; the rows of the cases it finished are kept either way (the harness rewrites its
#                      JSON after every case). The report and the tarball are always made.
#   SMOKE=1            no GPU needed (CI): the same steps on the CPU (benchmarks on --device cpu --quick, tiny shapes,
#                      Triton under its interpreter; BENCH defaults to "pooling dense", BUDGET_S to 240), no build.
# Wheels the GPU machine lacks are installed from .whl/ when that folder has any (see the device notes), --no-deps into
# /tmp/site, first on PYTHONPATH: the package's own dependencies ftfy, wcwidth, webdataset, braceexpand (its image has
# the rest), and the optional baselines xformers, flash-attn-4 (with nvidia-cutlass-dsl, quack-kernels,
# apache-tvm-ffi, torch-c-dlpack-ext), inf-cl, open_clip. torch and triton wheels are not installed: the benchmarks are
# for the machine's own.
#
# Kernels are compiled and autotuned outside the timed region: every benchmark times a case only after a first,
# untimed call (its first_call_s field), and Triton's compile cache and TRITON_CACHE_AUTOTUNING=1 let later
# benchmarks reuse what earlier ones compiled and tuned. Each benchmark runs in its own process (a kernel that
# leaves the CUDA context unusable costs that benchmark only). RESULTS_DIR ends up with gpu_suite.log and
# results.tar.gz (the JSON results, REPORT.md, plots/): few files, so that a remote runner that returns a handful of
# files returns everything. Unpack the tarball into benchmarks/results/ and commit the JSON; `python -m
# benchmarks.report --readme --update-dispatch` then refreshes the README table and the measured dispatch table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_common.sh
open_results gpu gpu_suite.log "${1:-}"
WORK="$RESULTS/suite"
mkdir -p "$WORK"
SMOKE="${SMOKE:-0}"
# The benchmarks and their shares of the benchmark time: the one list, benchmarks.BENCHMARKS (benchmarks/__init__.py).
declare -A WEIGHT=()
shares=$(python3 -c 'import benchmarks; print(*(f"{n}={e.suite_share}" for n, e in benchmarks.BENCHMARKS.items()))') \
  || { echo "cannot read benchmarks.BENCHMARKS (python3 -c 'import benchmarks' from $(pwd))" >&2; exit 2; }
ALL_BENCHMARKS=""
for share in $shares; do
  WEIGHT[${share%%=*}]=${share#*=}
  ALL_BENCHMARKS="$ALL_BENCHMARKS ${share%%=*}"
done
ALL_BENCHMARKS="${ALL_BENCHMARKS# }"
if [ "$SMOKE" = "1" ]; then
  BUDGET_S="${BUDGET_S:-240}"
  BENCHMARKS=${BENCH:-pooling dense}
  DEVICE_FLAGS=(--device cpu)
else
  BUDGET_S="${BUDGET_S:-$([ "${FULL:-0}" = "1" ] && echo 0 || echo 480)}"
  BENCHMARKS=${BENCH:-$ALL_BENCHMARKS}
  DEVICE_FLAGS=(--device cuda)
fi
FINAL_RESERVE=30   # seconds kept for the report and the tarball
BENCH_RESERVE=240  # seconds kept for the benchmarks when deciding the build's limit
whole_numbers BUDGET_S="$BUDGET_S"
status=0

finish() {  # the report over every JSON written, then one tarball; also on an interrupt
  trap - EXIT INT TERM
  rm -f "$WORK"/*.json.tmp  # a write a stopped benchmark did not finish (its previous JSON is whole)
  if compgen -G "$WORK/*.json" >/dev/null; then
    local report_limit; report_limit=$(limit 60 0)
    [ "$BUDGET_S" -ne 0 ] && [ "$report_limit" -lt 30 ] && report_limit=30  # the results are worth 30 s over
    step report "$report_limit" python3 -m benchmarks.report "$WORK" --out "$WORK"
  else
    log "=== no benchmark results to report"
    status=1
  fi
  tar czf "$RESULTS/results.tar.gz" -C "$WORK" . && rm -rf "$WORK"
  log "=== gpu_suite: $([ $status -eq 0 ] && echo all steps passed || echo "SOME STEPS FAILED, see $LOG") after $SECONDS s"
  log "=== results: $RESULTS/results.tar.gz (tar xzf it into benchmarks/results/)"
  exit $status
}
trap finish EXIT
trap 'status=1; log "=== interrupted"; finish' INT TERM

for name in $BENCHMARKS; do
  [[ " $ALL_BENCHMARKS " == *" $name "* ]] || { log "unknown benchmark '$name' in BENCH (choose from: $ALL_BENCHMARKS)"; status=2; exit; }
done
log "=== gpu_suite$([ "$SMOKE" = "1" ] && echo " (smoke: CPU)"): budget $([ "$BUDGET_S" -eq 0 ] && echo none || echo "${BUDGET_S} s"), benchmarks: $BENCHMARKS"

if [ "$SMOKE" != "1" ]; then
  install_wheels "$(limit 120 "$BENCH_RESERVE")"
  nvidia-smi 2>&1 | tee -a "$LOG"
  build_extension "$(limit 150 "$BENCH_RESERVE")"
  step info "$(limit 60 "$BENCH_RESERVE")" python3 -m dinotxt_fast.cli info
fi

QUICK_FLAG=(--quick)
[ "${FULL:-0}" = "1" ] && [ "$SMOKE" != "1" ] && QUICK_FLAG=()
remaining_weight=0
for name in $BENCHMARKS; do remaining_weight=$(( remaining_weight + WEIGHT[$name] )); done
for name in $BENCHMARKS; do
  hard=0
  soft=()
  if [ "$BUDGET_S" -ne 0 ]; then
    hard=$(( $(left "$FINAL_RESERVE") * WEIGHT[$name] / remaining_weight ))
    # Past --budget-s no implementation starts; the one running may still compile and measure for a while.
    soft=(--budget-s $(( hard * 4 / 5 > 1 ? hard * 4 / 5 : 1 )))
  fi
  remaining_weight=$(( remaining_weight - WEIGHT[$name] ))
  step "bench $name" "$hard" env TRITON_CACHE_AUTOTUNING=1 python3 "benchmarks/$name.py" "${DEVICE_FLAGS[@]}" \
    ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"} --out "$WORK" ${soft[@]+"${soft[@]}"}
done
finish

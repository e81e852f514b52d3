#!/usr/bin/env bash
# The one command to run on a GPU machine: build and install the package, run the GPU tests, run every benchmark,
# write the report, and leave everything in one folder, all within a time budget (default 9 minutes with --quick).
#
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]      (default: $OUT when set, else benchmarks/results/gpu-<time>)
#
# Environment:
#   FULL=1             full case lists (default: --quick, sized so that the whole script stays under 9 minutes on an H100)
#   BENCH="a b"        which benchmarks (default: every one of benchmarks.BENCHMARKS, in its order)
#   SKIP_TESTS=1       skip the GPU tests (e.g. a second call that only re-runs benchmarks)
#   BUDGET_S=540       the whole script's time limit in seconds (default 540 with --quick, none with FULL=1; 0: none).
#                      Steps get what is left: each benchmark a share of the remaining time; past 80 % of its share it
#                      starts no new implementation (their rows say so: --budget-s), at its share it is stopped (its
#                      JSON is then lost, the other benchmarks' are not). The report and the tarball are always made.
#   TESTS_S=150        the most the GPU tests may take (seconds; stopped there, the log keeps their progress)
#   TEST_WORKERS=6     pytest-xdist workers for the GPU tests when xdist is installed (1: serial); most of their time
#                      is Triton compiling and autotuning on the CPU
# Wheels the GPU machine lacks are installed from .whl/ when that folder has any (see the device notes), --no-deps into
# /tmp/site, first on PYTHONPATH: the package's own dependencies ftfy, wcwidth, webdataset, braceexpand (its image has
# the rest), and the optional baselines xformers, flash-attn-4 (with nvidia-cutlass-dsl, quack-kernels,
# apache-tvm-ffi, torch-c-dlpack-ext), inf-cl, open_clip. torch and triton wheels are not installed: the benchmarks are
# for the machine's own.
#
# Each benchmark runs in its own process (a kernel that leaves the CUDA context unusable costs that benchmark only),
# with TRITON_CACHE_AUTOTUNING=1 so that the benchmarks reuse each other's autotuning on the idle GPU (the tests, run
# in parallel, do not write it). RESULTS_DIR ends up with gpu_suite.log and results.tar.gz (the JSON results,
# REPORT.md, plots/, gpu_tests.xml): few files, so that a remote runner that returns a handful of files returns
# everything. Unpack the tarball into benchmarks/results/ and commit the JSON; `python -m benchmarks.report --readme
# --update-dispatch` then refreshes the README table and the measured dispatch table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
WORK="$RESULTS/suite"
mkdir -p "$WORK"
LOG="$RESULTS/gpu_suite.log"
export PYTHONUNBUFFERED=1
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
BUDGET_S="${BUDGET_S:-$([ "${FULL:-0}" = "1" ] && echo 0 || echo 540)}"
TESTS_S="${TESTS_S:-150}"
TEST_WORKERS="${TEST_WORKERS:-6}"
BENCH_RESERVE=270  # seconds kept for the benchmarks when deciding the build's and the tests' limits
FINAL_RESERVE=30   # seconds kept for the report and the tarball
for value in "$BUDGET_S" "$TESTS_S" "$TEST_WORKERS"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "BUDGET_S, TESTS_S and TEST_WORKERS must be whole numbers, got '$value'" >&2; exit 2; }
done
status=0

log() { echo "$*" | tee -a "$LOG"; }

left() {  # seconds left of the budget, minus $1 kept for later steps (a large number when there is no budget)
  if [ "$BUDGET_S" -eq 0 ]; then echo 1000000; else echo $(( BUDGET_S - SECONDS - ${1:-0} )); fi
}

limit() {  # limit WANT RESERVE: a step's time limit, min(WANT, what is left after RESERVE); 0 when there is no budget
  if [ "$BUDGET_S" -eq 0 ]; then echo 0; return; fi
  local room; room=$(left "$2")
  echo $(( $1 < room ? $1 : room ))
}

run_limited() {  # run_limited LIMIT CMD...: CMD in its own process group, stopped as a whole after LIMIT s (0: none)
  local limit=$1; shift
  if [ "$limit" -eq 0 ]; then "$@"; return; fi
  # A script runs without job control, so the background child is no group leader: setsid makes it one in place
  # (no fork), and $! is both its pid and its process group.
  setsid "$@" &
  local pid=$! end=$(( SECONDS + limit ))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$end" ]; then  # the whole group: pytest-xdist workers, compile workers
      echo "=== time limit of ${limit} s reached: stopping it"
      kill -TERM -- "-$pid" 2>/dev/null
      for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
      kill -KILL -- "-$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 124
    fi
    sleep 1
  done
  wait "$pid"
}

step() {  # step NAME LIMIT CMD...: run with a time limit (0: none), log, remember a failure, go on with the rest
  local name="$1" limit="$2"; shift 2
  if [ "$BUDGET_S" -ne 0 ] && [ "$limit" -lt 5 ]; then
    log "=== [$name] not run: the time budget (BUDGET_S=$BUDGET_S) is used up"
    status=1
    return
  fi
  log "=== [$name]$([ "$limit" -gt 0 ] && echo " (limit ${limit} s)") $*"
  local start=$SECONDS
  run_limited "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "=== [$name] exit $rc after $((SECONDS - start)) s$([ "$rc" -eq 124 ] && echo ' (stopped at its time limit)')"
  [ "$rc" -eq 0 ] || status=1
}

finish() {  # the report over every JSON written, then one tarball; also on an interrupt
  trap - EXIT INT TERM
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

BENCHMARKS=${BENCH:-$ALL_BENCHMARKS}
for name in $BENCHMARKS; do
  [[ " $ALL_BENCHMARKS " == *" $name "* ]] || { log "unknown benchmark '$name' in BENCH (choose from: $ALL_BENCHMARKS)"; status=2; exit; }
done
log "=== gpu_suite: budget $([ "$BUDGET_S" -eq 0 ] && echo none || echo "${BUDGET_S} s"), benchmarks: $BENCHMARKS"

shopt -s nullglob
wheels=()
for wheel in .whl/*.whl; do
  case "$(basename "$wheel")" in
    torch-*|triton-*) log "=== not installing $wheel: the benchmarks are for the machine's own torch and triton" ;;
    *) wheels+=("$wheel") ;;
  esac
done
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
  # --no-deps: a dependency resolved here (torch for most of them) would shadow the machine's own.
  step wheels "$(limit 120 "$BENCH_RESERVE")" python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi 2>&1 | tee -a "$LOG"
# Build for the GPU at hand only (faster than the default 80;90a), in place, without touching the installed torch.
ARCH=$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m == 9 else ""))' \
  2>>"$LOG") || { log "=== no CUDA device visible to torch: building for the default architectures"; ARCH=""; }
step install "$(limit 300 "$BENCH_RESERVE")" env DINOTXT_FAST_BUILD_EXT=1 ${ARCH:+DINOTXT_FAST_CUDA_ARCHS="$ARCH"} \
  CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps -e .
step info "$(limit 60 "$BENCH_RESERVE")" python3 -m dinotxt_fast.cli info
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  workers=()
  if [ "$TEST_WORKERS" -gt 1 ] && python3 -c 'import xdist' 2>/dev/null; then
    workers=(-n "$TEST_WORKERS")
  fi
  step gpu-tests "$(limit "$TESTS_S" "$BENCH_RESERVE")" python3 -m pytest -q -m gpu tests -p no:cacheprovider \
    ${workers[@]+"${workers[@]}"} --junitxml="$WORK/gpu_tests.xml"
fi

QUICK_FLAG=(--quick)
[ "${FULL:-0}" = "1" ] && QUICK_FLAG=()
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
  step "bench $name" "$hard" env TRITON_CACHE_AUTOTUNING=1 python3 "benchmarks/$name.py" --device cuda \
    ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"} --out "$WORK" ${soft[@]+"${soft[@]}"}
done
finish

# Shared steps of the GPU scripts (sourced by benchmarks/gpu_prove.sh and benchmarks/gpu_suite.sh, never run).
#
# The caller opens RESULTS and LOG (open_results), sets BUDGET_S (the script's time limit in seconds; 0:
# none) and may set status=1 on a failure. Every step runs in its own process group with a time limit, is logged,
# and a failure marks the run failed without stopping the steps after it.

open_results() {  # open_results PREFIX LOG_NAME [DIR]: RESULTS (absolute) = DIR, else $OUT, else
  # benchmarks/results/PREFIX-<time>; LOG = a fresh RESULTS/LOG_NAME
  RESULTS="${3:-${OUT:-benchmarks/results/$1-$(date +%Y%m%d-%H%M%S)}}"
  mkdir -p "$RESULTS"
  RESULTS="$(cd "$RESULTS" && pwd)"
  LOG="$RESULTS/$2"
  : > "$LOG"
  export PYTHONUNBUFFERED=1
}

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

install_wheels() {  # install_wheels LIMIT: the wheels in .whl/ (if any), --no-deps into /tmp/site, first on PYTHONPATH
  shopt -s nullglob
  local wheels=() wheel
  for wheel in .whl/*.whl; do
    case "$(basename "$wheel")" in
      torch-*|triton-*) log "=== not installing $wheel: the GPU runs are for the machine's own torch and triton" ;;
      *) wheels+=("$wheel") ;;
    esac
  done
  shopt -u nullglob
  [ ${#wheels[@]} -gt 0 ] || return 0
  # --no-deps: a dependency resolved here (torch for most of them) would shadow the machine's own.
  step wheels "$1" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
}

build_extension() {  # build_extension LIMIT: the package, editable, with _C built for the GPU at hand only
  # One architecture (sm_90a on an H100/H200) instead of the default 80;90a: about half the nvcc work. An editable
  # install reuses build/ (CMake + Ninja): on a machine still warm from an earlier call only changed files rebuild.
  local arch
  arch=$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m == 9 else ""))' \
    2>>"$LOG") || { log "=== no CUDA device visible to torch: building for the default architectures"; arch=""; }
  step build "$1" env DINOTXT_FAST_BUILD_EXT=1 ${arch:+DINOTXT_FAST_CUDA_ARCHS="$arch"} \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python3 -m pip install -q --no-build-isolation --no-deps -e .
}

whole_numbers() {  # whole_numbers NAME=VALUE...: exit 2 unless every VALUE is a whole number
  local pair
  for pair in "$@"; do
    [[ "${pair#*=}" =~ ^[0-9]+$ ]] || { echo "${pair%%=*} must be a whole number, got '${pair#*=}'" >&2; exit 2; }
  done
}

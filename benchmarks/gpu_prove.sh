#!/usr/bin/env bash
# One device call that proves every kernel correct on a GPU: build the CUDA extension for this GPU only (sm_90a on an
# H100/H200), then the trimmed GPU test matrix (`pytest -m prove`: each code path once; tests/ops/backends.py says
# what it holds) with every autotuned Triton kernel on its fixed configuration (DINOTXT_FAST_AUTOTUNE=0: one compile
# per kernel and shape family instead of every candidate), in parallel (pytest-xdist) with a per-test time limit
# (pytest-timeout) inside the script's own limit. Measuring is gpu_suite.sh's job, a separate call.
#
#   bash benchmarks/gpu_prove.sh [RESULTS_DIR]      (default: $OUT when set, else benchmarks/results/prove-<time>)
#
# RESULTS_DIR gets gpu_prove.log and gpu_prove.xml (JUnit), and with EXTRA=1 gpu_prove_extra.xml.
#
# Environment:
#   BUDGET_S=180       the script's time limit (s): build + tests (0: none). With the machine's start (60-120 s) the
#                      call stays within 5 minutes of device time.
#   TEST_TIMEOUT_S=90  per-test limit (pytest-timeout, thread method: a test stuck in a CUDA call has its worker
#                      killed and reported, and xdist carries on with a new one). Where pytest-timeout is missing
#                      only the step's limit applies (logged).
#   TEST_WORKERS=8     pytest-xdist workers (1: serial; serial too where xdist is missing). Their work is mostly
#                      Triton compiling on the CPU cores: 8 of the machine's 16, one GPU shared.
#   EXTRA=1            then the optional step: the rest of the GPU matrix (`-m "gpu and not prove"`: the
#                      compute-sanitizer runs, torch.compile, the wider dtype and shape products), autotuning on,
#                      limit EXTRA_S=600 (its own call's worth; it is not in the 5-minute budget).
#   SMOKE=1            no GPU needed (CI): the plan only. Collects the proof's tests (it must find some in every
#                      family, each also marked gpu) and counts the fixed-configuration compilations
#                      (tools/triton_codegen.py --list --fixed-only); no build, nothing runs on a device.
#
# Budget, estimated without a GPU from CPU-seconds measured here (2-core x86 CPU, no GPU): the 3.6 codegen table
# (benchmarks/results/codegen/triton-3.6.0-sm90.json: 158 fixed-configuration compiles at the real shapes, all
# dtypes, 208 CPU-s; 1.3 CPU-s a compile on average) and nvcc on the CUDA sources for 90a (~30 CPU-s, the slowest
# unit attention_fwd_sm90.cu ~10 CPU-s). A GPU run replaces these with the log's step times.
#   build    ~45 s   CMake configure, the nvcc units in parallel on 16 cores, pybind11 units, link, pip
#   tests    ~80 s   collection and 8 xdist workers starting CUDA (~25 s); at most ~160 fixed-configuration
#                    compiles (<= 208 CPU-s over 8 workers: ~30 s; the proof's shapes are fewer than the table's);
#                    the tests' GPU time (float64 references, 128 precompiled CUDA attention cases: ~20 s)
#   total   ~125 s   inside BUDGET_S=180; with the machine's start (60-120 s) 3-5 minutes of device time
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_common.sh
open_results prove gpu_prove.log "${1:-}"
BUDGET_S="${BUDGET_S:-180}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-90}"
TEST_WORKERS="${TEST_WORKERS:-8}"
EXTRA_S="${EXTRA_S:-600}"
FINAL_RESERVE=5  # seconds kept for the summary
whole_numbers BUDGET_S="$BUDGET_S" TEST_TIMEOUT_S="$TEST_TIMEOUT_S" TEST_WORKERS="$TEST_WORKERS" EXTRA_S="$EXTRA_S"
status=0

pytest_options() {  # the options every pytest step shares: workers, per-test limit, no cache
  PYTEST_OPTIONS=(-p no:cacheprovider -rfEs)
  if [ "$TEST_WORKERS" -gt 1 ] && python3 -c 'import xdist' 2>/dev/null; then
    PYTEST_OPTIONS+=(-n "$TEST_WORKERS")
  else
    log "=== tests run serially (TEST_WORKERS=$TEST_WORKERS, or pytest-xdist is not installed)"
  fi
  if python3 -c 'import pytest_timeout' 2>/dev/null; then
    PYTEST_OPTIONS+=(--timeout "$TEST_TIMEOUT_S" --timeout-method thread)
  else
    log "=== pytest-timeout is not installed: no per-test limit, only the step's"
  fi
}

# The collected proof (a log) must hold tests of every family.
FAMILIES_CHECK='
import sys
collected = [line for line in open(sys.argv[1]) if "::" in line and line.startswith("tests/")]
files = {line.split("::")[0] for line in collected}
want = ["tests/ops/test_attention.py", "tests/ops/test_attention_cuda.py", "tests/ops/test_contrastive.py",
        "tests/ops/test_dense.py", "tests/ops/test_pooling.py"]
missing = [f for f in want if f not in files]
print(f"the proof holds {len(collected)} tests in {len(files)} files" + (f"; none in {missing}" if missing else ""))
sys.exit(1 if missing or not collected else 0)
'

summary() {  # the JUnit file's counts, one line
  python3 - "$1" <<'EOF' 2>/dev/null || echo "no test report at $1"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
count = lambda key: sum(int(s.get(key, 0)) for s in suites)
print(f"{count('tests')} tests: {count('tests') - count('failures') - count('errors') - count('skipped')} passed, "
      f"{count('failures')} failed, {count('errors')} errors, {count('skipped')} skipped")
EOF
}

if [ "${SMOKE:-0}" = "1" ]; then
  log "=== gpu_prove (smoke: the plan, no GPU)"
  step collect "$(limit 120 0)" python3 -m pytest -q --collect-only -p no:cacheprovider -m prove tests \
    --junitxml="$RESULTS/gpu_prove.xml"
  # Every family must be in the proof, and nothing in it may run without a GPU.
  step families "$(limit 60 0)" python3 -c "$FAMILIES_CHECK" "$LOG"
  step gpu-marked "$(limit 120 0)" bash -c 'python3 -m pytest -q --collect-only -p no:cacheprovider \
    -m "prove and not gpu" tests; [ $? -eq 5 ] || { echo "tests marked prove but not gpu (they would run on CPU)"; exit 1; }'
  step fixed-compiles "$(limit 120 0)" env -u TRITON_INTERPRET python3 tools/triton_codegen.py --list --fixed-only
  log "=== gpu_prove smoke: $([ $status -eq 0 ] && echo passed || echo FAILED) after $SECONDS s"
  exit $status
fi

log "=== gpu_prove: budget $([ "$BUDGET_S" -eq 0 ] && echo none || echo "${BUDGET_S} s"), $TEST_WORKERS workers, \
per-test limit ${TEST_TIMEOUT_S} s"
nvidia-smi 2>&1 | tee -a "$LOG"
install_wheels "$(limit 60 60)"
build_extension "$(limit 120 60)"
pytest_options
step prove "$(limit "$BUDGET_S" "$FINAL_RESERVE")" env DINOTXT_FAST_AUTOTUNE=0 python3 -m pytest -q -m prove tests \
  "${PYTEST_OPTIONS[@]}" --junitxml="$RESULTS/gpu_prove.xml"
log "=== prove: $(summary "$RESULTS/gpu_prove.xml")"
if [ "${EXTRA:-0}" = "1" ]; then
  BUDGET_S=0  # the optional step has its own limit: a second call's worth of device time, not the proof's
  step extra "$EXTRA_S" python3 -m pytest -q -m "gpu and not prove" tests "${PYTEST_OPTIONS[@]}" \
    --junitxml="$RESULTS/gpu_prove_extra.xml"
  log "=== extra: $(summary "$RESULTS/gpu_prove_extra.xml")"
fi
log "=== gpu_prove: $([ $status -eq 0 ] && echo all steps passed || echo "SOME STEPS FAILED, see $LOG") after $SECONDS s"
exit $status

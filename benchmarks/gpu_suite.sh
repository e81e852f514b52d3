#!/usr/bin/env bash
# The one command to run on a GPU machine: build and install the package, run the GPU tests, run every benchmark,
# and leave logs and JSON results in one folder.
#
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]      (default: $OUT when set, else benchmarks/results)
#
# Wheels the GPU machine lacks are installed from .whl/ when that folder exists (see the device notes): the
# package's own dependencies ftfy, wcwidth, webdataset, braceexpand (its image has the rest), and the optional
# baselines xformers, flash-attn-4, inf-cl. QUICK=1 runs the reduced benchmark case lists.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_suite.log"
QUICK_FLAG=""
[ "${QUICK:-0}" = "1" ] && QUICK_FLAG="--quick"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME CMD...: run, log, remember a failure, go on with the rest
  local name="$1"; shift
  echo "=== [$name] $*" | tee -a "$LOG"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== [$name] exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

if [ -d .whl ]; then
  step wheels python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi | tee -a "$LOG"
# Build for the GPU at hand only (faster than the default 80;90a), in place, without touching the installed torch.
ARCH=$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m == 9 else ""))')
step install env DINOTXT_FAST_BUILD_EXT=1 DINOTXT_FAST_CUDA_ARCHS="$ARCH" \
  python3 -m pip install -q --no-build-isolation --no-deps -e .
step info python3 -m dinotxt_fast.cli info
step gpu-tests python3 -m pytest -q -m gpu tests --junitxml="$RESULTS/gpu_tests.xml"
for bench in attention contrastive dense; do
  step "bench-$bench" python3 "benchmarks/$bench.py" $QUICK_FLAG --out "$RESULTS"
done
step bench-train_step python3 benchmarks/train_step.py --out "$RESULTS"
echo "=== gpu_suite: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED, see $LOG)"
exit $status

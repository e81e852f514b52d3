#!/usr/bin/env bash
# The one command to run on a GPU machine: build and install the package, run the GPU tests, run every benchmark
# (python -m benchmarks), write the report, and leave everything in one folder.
#
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]      (default: $OUT when set, else benchmarks/results/gpu-<time>)
#
# Environment:
#   FULL=1             full case lists (default: --quick, sized so that the whole script stays under 9 minutes on an H100)
#   BENCH="a b"        which benchmarks (default: all = attention contrastive dense infer train)
#   SKIP_TESTS=1       skip the GPU tests (e.g. a second call that only re-runs benchmarks)
# Wheels the GPU machine lacks are installed from .whl/ when that folder exists (see the device notes): the package's
# own dependencies ftfy, wcwidth, webdataset, braceexpand (its image has the rest), and the optional baselines
# xformers, flash-attn-4, inf-cl, open_clip.
#
# RESULTS_DIR ends up with gpu_suite.log and results.tar.gz (the JSON results, REPORT.md, plots/, gpu_tests.xml): few
# files, so that a remote runner that returns a handful of files returns everything. Unpack the tarball into
# benchmarks/results/ and commit the JSON; `python -m benchmarks.report --readme --update-dispatch` then refreshes the
# README table and the measured dispatch table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
WORK="$RESULTS/suite"
mkdir -p "$WORK"
LOG="$RESULTS/gpu_suite.log"
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
nvidia-smi 2>&1 | tee -a "$LOG"
# Build for the GPU at hand only (faster than the default 80;90a), in place, without touching the installed torch.
ARCH=$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m == 9 else ""))')
step install env DINOTXT_FAST_BUILD_EXT=1 DINOTXT_FAST_CUDA_ARCHS="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e .
step info python3 -m dinotxt_fast.cli info
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  step gpu-tests python3 -m pytest -q -m gpu tests --junitxml="$WORK/gpu_tests.xml"
fi
QUICK_FLAG="--quick"
[ "${FULL:-0}" = "1" ] && QUICK_FLAG=""
# shellcheck disable=SC2086 # BENCH is a space-separated list
step bench python3 -m benchmarks ${BENCH:-all} --device cuda $QUICK_FLAG --out "$WORK"
tar czf "$RESULTS/results.tar.gz" -C "$WORK" . && rm -rf "$WORK"
echo "=== gpu_suite: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED, see $LOG)" | tee -a "$LOG"
echo "=== results: $RESULTS/results.tar.gz (tar xzf it into benchmarks/results/)" | tee -a "$LOG"
exit $status

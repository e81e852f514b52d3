"""Backend parameters shared by the per-family op tests: one test, one assertion, every backend it applies to
(FlashAttention's habit). Triton cases run on CPU tensors under the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU); CUDA cases need a GPU (marked `gpu`)."""
import importlib.util

import pytest

from dinotxt_fast import ops

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
TRITON = pytest.param("triton", marks=needs_triton)
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
TORCH_AND_TRITON = ["torch", TRITON]


# The GPU tests benchmarks/gpu_prove.sh runs (marker "prove", always with "gpu"): the matrix trimmed to what proves
# each code path once (bf16 at the real shapes, one fp32 and one fp16 case per family, odd N, lengths, causal,
# fused-qkv views). The rest of the GPU matrix (compute-sanitizer, torch.compile, the wider dtype and shape
# products) is its optional second step.
PROVE = pytest.mark.prove


def proving(*values):
    """A parametrize entry that gpu_prove.sh runs."""
    return pytest.param(*values, marks=PROVE)


def require(backend: str, family: str) -> None:
    """Skip unless `backend` is available here and provides `family` (e.g. CUDA kernels missing from this build)."""
    report = ops.backends()[backend]
    if not report["available"] or family not in report["ops"]:
        pytest.skip(f"backend {backend!r} cannot run {family} here: {report['reason']}")


def available(family: str, names=("triton", "cuda")) -> list:
    """The backends among `names` that can run `family` here."""
    report = ops.backends()
    return [name for name in names if report[name]["available"] and family in report[name]["ops"]]


def kernel_module(backend: str, family: str):
    """The kernel module of `family` in `backend` ("triton" or "cuda"); skips the test where it cannot be imported."""
    return pytest.importorskip(f"dinotxt_fast.ops.{backend}.{family}")

"""The "torch" backend: PyTorch reference implementations of every op family, and the oracle the kernels are tested
against.

They run anywhere (CPU, CUDA, float64), compute in float32 (float64 for float64 inputs) and keep memory bounded by
working in chunks (common.chunk_elements: cache-sized on a CPU, common.CHUNK_ELEMENTS elsewhere), so that the
reference path is the fast default on real shapes, not only a test oracle: no op is slower or heavier than its naive
PyTorch expression at the shapes the package runs (benchmarks/reference.py measures it). On a CPU, attention in
fp32/bf16/fp16 runs PyTorch's own flash-attention kernels, which have this family's contract; float64 keeps the
chunked formulas.
Each op family has a forward returning what its backward needs and a backward taking exactly that: the contract the
Triton and CUDA backends implement too. Like ops/triton and ops/cuda, this package declares its backend and each
family module registers its kernels (dispatch.add_kernels) on import.
"""
from ..dispatch import declare_backend

declare_backend("torch", lambda: (True, "PyTorch reference (any device, float64-capable)"))

# Kernel families (one import line each):
from . import attention  # noqa: E402,F401
from . import pooling  # noqa: E402,F401
from . import contrastive  # noqa: E402,F401
from . import dense  # noqa: E402,F401

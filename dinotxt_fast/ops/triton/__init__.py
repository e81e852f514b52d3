"""Triton kernels: the "triton" backend. This package declares the backend and its probe; each family module
registers its kernels (dispatch.add_kernels) on import.

On a machine without a CUDA device the kernels run only under Triton's CPU interpreter (TRITON_INTERPRET=1, which
must be set before this package is imported): slow, for tests.
"""
import torch
import triton

from ..dispatch import declare_backend


def _probe() -> tuple[bool, str]:
    if torch.cuda.is_available():
        return True, f"Triton {triton.__version__}"
    return True, (f"Triton {triton.__version__}; no CUDA device here, so its kernels run only on CPU tensors under "
                  "TRITON_INTERPRET=1 (slow; for tests)")


declare_backend("triton", _probe)

# Kernel families (one import line each):
from . import attention  # noqa: E402,F401
from . import contrastive  # noqa: E402,F401
from . import pooling  # noqa: E402,F401
from . import dense  # noqa: E402,F401

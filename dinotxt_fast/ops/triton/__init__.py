"""Triton kernels. Each family module registers itself with the "triton" backend (dispatch.add_kernels) on import.

On a machine without a CUDA device the kernels run only under Triton's CPU interpreter (TRITON_INTERPRET=1, which
must be set before this package is imported): slow, for tests.
"""
from ... import ops as _ops  # noqa: F401  (the dispatch must exist before the families register)
# Kernel families (one import line each):
from . import attention  # noqa: F401
from . import contrastive  # noqa: F401
from . import pooling  # noqa: F401
from . import dense  # noqa: F401

"""CUDA kernels of the compiled extension `dinotxt_fast._C`, wrapped for the ops dispatch ("cuda" backend).

Each family module registers itself with dispatch.add_kernels on import. The extension takes raw device pointers and
the current stream (no torch C++ ABI); the wrappers check shapes, dtypes, devices and strides first.
"""
# Kernel families (one import line each):
from . import pooling  # noqa: F401
from . import dense  # noqa: F401
from . import contrastive  # noqa: F401
from . import attention  # noqa: F401

"""CUDA kernels of the compiled extension `dinotxt_fast._C`, wrapped for the ops dispatch: the "cuda" backend.

This package declares the backend and its probe; each family module registers its kernels (dispatch.add_kernels)
on import, where the extension has them. The extension takes raw device pointers and the current stream (no torch
C++ ABI); the wrappers check shapes, dtypes, devices and strides first.
"""
from ... import _ext
from ..dispatch import declare_backend


def _probe() -> tuple[bool, str]:
    if _ext.extension() is None:
        return False, f"the compiled extension dinotxt_fast._C is unavailable: {_ext.extension_error()}"
    info = _ext.cuda_info()
    if not info.get("device_count"):
        return False, f"_C is built, but no usable CUDA device: {info.get('error') or 'none found'}"
    return True, f"dinotxt_fast._C for CUDA archs {info.get('compiled_archs')}"


def require_extension(kernels: str):
    """dinotxt_fast._C, or a RuntimeError naming the CUDA `kernels` that need it and why it is unavailable."""
    ext = _ext.extension()
    if ext is None:
        raise RuntimeError(f"the CUDA {kernels} kernels need dinotxt_fast._C: {_ext.extension_error()}")
    return ext


declare_backend("cuda", _probe)

# Kernel families (one import line each):
from . import pooling  # noqa: E402,F401
from . import dense  # noqa: E402,F401
from . import contrastive  # noqa: E402,F401
from . import attention  # noqa: E402,F401

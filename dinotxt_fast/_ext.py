"""Lazy, safe access to the optional compiled CUDA extension ``dinotxt_fast._C``.

``_C`` is built by ``pip install`` when nvcc is available (see setup.py). Nothing here raises because
it is missing: ``extension()`` returns None and ``extension_error()`` says why.
"""
import functools
import importlib
import json
import os

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_STATUS_FILE = os.path.join(_PACKAGE_DIR, "_build_status.json")

CUDA_INFO_KEYS = ("runtime_version", "driver_version", "device_count", "devices", "compiled_archs", "error")


def build_record():
    """The record setup.py left about building _C (dict with built, reason, detail, archs, nvcc), or None
    when the package was not installed with pip (e.g. a bare source checkout)."""
    try:
        with open(_STATUS_FILE) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return {"built": False, "reason": "corrupt_record",
                "detail": f"its build record {_STATUS_FILE} is unreadable ({error})"}


def _not_built_reason(record):
    if record is None:
        return (f"dinotxt_fast._C is not built in {_PACKAGE_DIR} (no build record: the package was not "
                "installed with pip); run `pip install -e .` in the source tree with nvcc available")
    if record.get("built"):
        return (f"dinotxt_fast._C was built but is missing from {_PACKAGE_DIR}; "
                "reinstall the package")
    return f"dinotxt_fast._C was not built: {record.get('detail') or record.get('reason')}"


@functools.lru_cache(maxsize=None)
def _load():
    try:
        return importlib.import_module("dinotxt_fast._C"), None
    except ModuleNotFoundError as error:
        if error.name != "dinotxt_fast._C":
            return None, f"dinotxt_fast._C failed to import: {error}"
        return None, _not_built_reason(build_record())
    except ImportError as error:  # present but unloadable: wrong Python, missing symbol, bad file
        return None, f"dinotxt_fast._C failed to import: {error}"


def extension():
    """The compiled module ``dinotxt_fast._C``, or None when it is unavailable."""
    return _load()[0]


def extension_error():
    """Why ``extension()`` is None (not built, and why; or the import error), or None when it loaded."""
    return _load()[1]


def cuda_info():
    """``_C.cuda_info()``: CUDA runtime/driver versions and devices as the extension sees them.

    Never raises. Without the extension, returns the same keys with no devices and ``error`` set.
    """
    ext = extension()
    if ext is None:
        return {"runtime_version": None, "driver_version": None, "device_count": 0, "devices": [],
                "compiled_archs": [], "error": extension_error()}
    return ext.cuda_info()


def current_stream_ptr(device=None):
    """Integer handle of torch's current CUDA stream on ``device`` (a torch.device, "cuda:1", an index,
    or None for the current device), to pass to _C kernels."""
    import torch

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    else:
        device = torch.device(device)
    if device is None or device.type != "cuda":
        raise ValueError(f"current_stream_ptr needs a CUDA device, got {device} "
                         f"(torch.cuda.is_available()={torch.cuda.is_available()})")
    return torch.cuda.current_stream(device).cuda_stream

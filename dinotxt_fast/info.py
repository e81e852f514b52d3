"""What `dinotxt-fast info` reports: versions, CUDA devices, the compiled extension, the kernel backends and the
measured dispatch table. Each part reports its own failure instead of raising: reporting a broken install is
this module's job."""
from __future__ import annotations

import platform

import torch


def package_version() -> str:
    try:
        from .version import __version__
        return __version__
    except ImportError:
        try:
            from importlib.metadata import version
            return version("dinotxt-fast")
        except Exception:
            return "unknown"


def extension_report() -> dict:
    """Whether the compiled `_C` extension loads, with its CUDA build info or the reason it does not."""
    try:
        from . import _ext
    except Exception as exc:  # a broken build must not break `info`, whose job is to report it
        return {"built": False, "reason": f"dinotxt_fast._ext cannot be imported: {type(exc).__name__}: {exc}"}
    report: dict = {}
    try:
        report["built"] = _ext.extension() is not None
    except Exception as exc:
        return {"built": False, "reason": f"{type(exc).__name__}: {exc}"}
    if report["built"]:
        try:
            report["cuda_info"] = _ext.cuda_info()
        except Exception as exc:
            report["cuda_info_error"] = f"{type(exc).__name__}: {exc}"
    else:
        try:
            report["reason"] = str(_ext.extension_error() or "not built")
        except Exception as exc:
            report["reason"] = f"{type(exc).__name__}: {exc}"
    return report


def plain_cuda_error(error) -> str:
    """A CUDA runtime error as a newcomer reads it: "no CUDA driver" rather than cudaErrorInsufficientDriver."""
    text = str(error or "")
    if "libcuda.so" in text or "cudaErrorNoDriver" in text:
        return "no CUDA driver"
    if "cudaErrorInsufficientDriver" in text:
        return "the NVIDIA driver is older than the CUDA runtime the extension was built with (update the driver)"
    if "cudaErrorNoDevice" in text or not text:
        return "no CUDA device"
    return text


def backends_report() -> dict:
    try:
        from .ops import backends
        return {name: {"available": bool(s["available"]), "reason": str(s.get("reason", "")),
                       "ops": list(s.get("ops", []))}
                for name, s in backends().items()}
    except Exception as exc:
        return {"error": {"available": False, "reason": f"dinotxt_fast.ops failed: {type(exc).__name__}: {exc}"}}


def measured_report() -> dict:
    """How many measured per-shape dispatch entries ship with the package, and for which GPUs."""
    try:
        from .ops import dispatch
        entries = dispatch._measured_entries()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"entries": len(entries), "gpus": sorted({e["gpu"] for e in entries})}


def collect_info() -> dict:
    """Everything `dinotxt-fast info` reports, as a JSON-serialisable dict."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not available ({type(exc).__name__}: {exc})"
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                            "memory_gib": round(props.total_memory / 2**30, 1)})
    extension = extension_report()
    cuda_error = extension.get("cuda_info", {}).get("error")
    if devices:
        cuda_problem = None
    elif cuda_error or torch.version.cuda:
        cuda_problem = plain_cuda_error(cuda_error)
    else:  # nothing asked the driver: the only fact known is torch's build
        cuda_problem = "this torch is a CPU-only build"
    return {
        "dinotxt_fast": package_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": devices,
        "cuda_problem": cuda_problem,  # in words ("no CUDA driver"); None when a device is usable
        "extension": extension,
        "backends": backends_report(),
        "measured_dispatch": measured_report(),
    }

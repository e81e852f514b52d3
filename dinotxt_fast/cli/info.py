"""`dinotxt-fast info`: versions, devices, compiled extension and kernel backends, as a table or JSON."""
from __future__ import annotations

import json

from ..info import collect_info


def add_parser(sub):
    p = sub.add_parser("info", help="versions, devices, compiled extension and kernel backends",
                       description="Report package, PyTorch/Triton/Python versions, CUDA devices, whether the "
                                   "compiled _C extension is built, and which kernel backends are available.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def run(args) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print_table(info)
    return 0


def print_table(info: dict) -> None:
    """The report in words: no raw error codes or JSON (`--json` has every field, the raw CUDA errors included)."""
    from ..info import plain_cuda_error

    torch_build = f"CUDA {info['torch_cuda']}" if info["torch_cuda"] else "a CPU-only build"
    rows = [("dinotxt-fast", info["dinotxt_fast"]), ("python", info["python"]), ("platform", info["platform"]),
            ("torch", f"{info['torch']} ({torch_build})"), ("triton", info["triton"])]
    devices = info["cuda_devices"]
    rows.append(("CUDA devices", ", ".join(f"{d['index']}: {d['name']} (sm {d['capability']}, "
                                           f"{d['memory_gib']} GiB)" for d in devices)
                 or f"none ({info.get('cuda_problem') or 'no CUDA device'})"))
    ext = info["extension"]
    cuda_info = ext.get("cuda_info") or {}
    raw_error = cuda_info.get("error") or ext.get("cuda_info_error")
    if ext.get("built"):
        archs = ", ".join(f"sm_{a}" for a in cuda_info.get("compiled_archs", [])) or "unknown archs"
        runtime = cuda_info.get("runtime_version")
        detail = f"built for {archs}" + (f" (CUDA runtime {runtime})" if runtime else "")
        if raw_error:
            detail += f"; not usable here: {plain_cuda_error(raw_error)}"
        rows.append(("_C extension", detail))
    else:
        rows.append(("_C extension", f"not built: {ext.get('reason', '')}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    measured = info["measured_dispatch"]
    print("auto dispatch: " + (measured["error"] if "error" in measured else
                               f"{measured['entries']} measured per-shape entries"
                               + (f" ({', '.join(measured['gpus'])})" if measured["gpus"] else
                                  " (none: auto keeps the reference until GPU benchmarks are measured)")))
    print("backends:")
    for name, status in info["backends"].items():
        state = "available" if status["available"] else "unavailable"
        reason = status["reason"].replace(raw_error, plain_cuda_error(raw_error)) if raw_error else status["reason"]
        print(f"  {name:<8} {state:<12} {reason}")
        if status.get("ops"):
            print(f"  {'':<8} {'':<12} ops: {', '.join(status['ops'])}")

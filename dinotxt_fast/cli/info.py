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
    rows = [("dinotxt-fast", info["dinotxt_fast"]), ("python", info["python"]), ("platform", info["platform"]),
            ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})"), ("triton", info["triton"])]
    devices = info["cuda_devices"]
    rows.append(("CUDA devices", ", ".join(f"{d['index']}: {d['name']} (sm {d['capability']}, "
                                           f"{d['memory_gib']} GiB)" for d in devices) or "none"))
    ext = info["extension"]
    if ext.get("built"):
        detail = ext.get("cuda_info", ext.get("cuda_info_error", ""))
        rows.append(("_C extension", f"built {json.dumps(detail, default=str) if detail else ''}".strip()))
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
        print(f"  {name:<8} {state:<12} {status['reason']}")
        if status.get("ops"):
            print(f"  {'':<8} {'':<12} ops: {', '.join(status['ops'])}")

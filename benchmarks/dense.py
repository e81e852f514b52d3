"""Dense hot paths: patch pooling and open-vocabulary decoding, our kernels against eager PyTorch (and torch.compile).

    python benchmarks/dense.py                        # CUDA, every case
    python benchmarks/dense.py --quick                # CUDA, smaller batches and fewer repetitions
    python benchmarks/dense.py --device cpu --quick   # smoke run: tiny shapes, torch + the Triton interpreter
    python benchmarks/dense.py --list                 # print the cases and exit

Parts (--parts, comma-separated):
  pool     patch_pool forward and backward per backend, against eager PyTorch and torch.compile of the same function,
           as effective GB/s over the bytes that must move (forward: tokens read once, [B, 2D] written; backward:
           d_tokens written, plus tokens read with a LayerNorm), and against a device copy of the tokens (the
           bandwidth ceiling, measured in the same run).
  decode   upsample_argmax ("whole" mode) and slide_decode (the official sliding protocol) per backend: time, peak
           extra memory and pixel agreement against the eager interpolate + softmax + argmax path, for ADE20K-like
           (150 classes, 512x683), Cityscapes-like (19 classes, 1024x2048 from a 512x1024 canvas) and 1000 classes.
  segment  end-to-end dtf.segment() images/s on the official configuration (random weights, bf16 on CUDA), with the
           decoding ops on each backend against backend="torch".
GPU timings use triton.testing.do_bench (median and 20/80% quantiles, L2 flushed between runs); CPU timings are
wall-clock medians. Results go to benchmarks/results/dense-<device>-<time>.json with the environment.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.harness import environment, time_ms  # noqa: E402

EPS = 1e-5
TINY_MODEL = dict(vision_dim=64, vision_depth=2, vision_heads=4, pos_embed_grid=4, text_dim=64, text_layers=2,
                  text_heads=4)


# ---------------------------------------------------------------------------------------------------- cases
def pool_cases(device: str, quick: bool) -> list[dict]:
    if device == "cpu":
        return [dict(name="tiny", batch=2, registers=4, patches=20, dim=32, ln=ln, normalize=ln)
                for ln in (False, True)]
    big = 256 if quick else 1024
    return [dict(name=f"official-B{b}", batch=b, registers=4, patches=256, dim=1024, ln=ln, normalize=ln)
            for b in (big, 16) for ln in (False, True)]


def decode_cases(device: str, quick: bool) -> list[dict]:
    if device == "cpu":
        return [dict(name="tiny", classes=5, image=(40, 55), short_side=None, window=28, stride=14, patch=14)]
    cases = [dict(name="ade20k", classes=150, image=(512, 683), short_side=512, window=384, stride=192, patch=14),
             dict(name="cityscapes", classes=19, image=(1024, 2048), short_side=512, window=384, stride=192,
                  patch=14),
             dict(name="1000-class", classes=1000, image=(512, 683), short_side=512, window=384, stride=192,
                  patch=14)]
    return cases[:1] if quick else cases


def segment_case(device: str, quick: bool) -> dict:
    if device == "cpu":
        return dict(preset="dinov2_vitl14_reg4_dinotxt", overrides=TINY_MODEL, images=1, image=(40, 55), classes=5,
                    short_side=None, window=28, stride=14, dtype="float32")
    return dict(preset="dinov2_vitl14_reg4_dinotxt", overrides={}, images=2 if quick else 8, image=(512, 683),
                classes=150, short_side=512, window=384, stride=192, dtype="bfloat16")


# ------------------------------------------------------------------------------------------------ measuring
def bench(fn, device: torch.device, quick: bool) -> dict:
    """Median and 20/80% quantiles of fn's time in ms."""
    median, q20, q80 = time_ms(fn, device, quick)
    return {"median_ms": median, "q20_ms": q20, "q80_ms": q80}


def peak_extra_bytes(fn, device: torch.device):
    """Peak memory allocated by one call of fn above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def kernel_backends(device: torch.device, family: str) -> list[str]:
    from dinotxt_fast import ops

    names = []
    for name in ("torch", "triton", "cuda"):
        report = ops.backends()[name]
        if report["available"] and family in report["ops"] and (device.type == "cuda" or name != "cuda"):
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------- pooling
def eager_pool(tokens, registers, weight, bias, normalize):
    x = F.layer_norm(tokens, tokens.shape[-1:], weight, bias, EPS) if weight is not None else tokens
    pooled = torch.cat([x[:, 0], x[:, 1 + registers:].mean(1)], dim=-1)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def run_pool(case: dict, device: torch.device, quick: bool, use_compile: bool) -> dict:
    from dinotxt_fast import ops

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, r, d = case["batch"], case["registers"], case["dim"]
    n = 1 + r + case["patches"]
    tokens = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(d, device=device, dtype=dtype, requires_grad=True) if case["ln"] else None
    bias = torch.randn(d, device=device, dtype=dtype, requires_grad=True) if case["ln"] else None
    inputs = [t for t in (tokens, weight, bias) if t is not None]
    grad = torch.randn(b, 2 * d, device=device, dtype=dtype)
    size = tokens.element_size()
    fwd_bytes = (b * n * d + b * 2 * d) * size
    bwd_bytes = (b * n * d * (2 if case["ln"] else 1) + b * 2 * d) * size
    result = {"case": case, "dtype": str(dtype), "forward_bytes": fwd_bytes, "backward_bytes": bwd_bytes}

    with torch.no_grad():
        copy = bench(lambda dst=torch.empty_like(tokens): dst.copy_(tokens), device, quick)
    copy_gbps = 2 * b * n * d * size / copy["median_ms"] / 1e6
    result["copy"] = {**copy, "GBps": copy_gbps}

    variants = {f"ops[{name}]": name for name in kernel_backends(device, "patch_pool")}
    variants["eager"] = None
    if use_compile:
        variants["torch.compile"] = None
    for label, backend in variants.items():
        if backend is not None:
            def forward(backend=backend):
                return ops.patch_pool(tokens, num_registers=r, ln_weight=weight, ln_bias=bias, eps=EPS,
                                      normalize=case["normalize"], backend=backend)

            def backward(backend=backend):  # the registered backward op alone
                with torch.no_grad():
                    return torch.ops.dinotxt_fast.patch_pool_bwd(grad, tokens, r, weight, bias, EPS,
                                                                 case["normalize"], backend)
        else:
            fn = eager_pool if label == "eager" else torch.compile(eager_pool)

            def forward(fn=fn):
                return fn(tokens, r, weight, bias, case["normalize"])

            graph = forward()

            def backward(graph=graph):
                return torch.autograd.grad(graph, inputs, grad, retain_graph=True)
        with torch.no_grad():
            fwd = bench(forward, device, quick)
        bwd = bench(backward, device, quick)
        result[label] = {
            "forward": {**fwd, "GBps": fwd_bytes / fwd["median_ms"] / 1e6,
                        "fraction_of_copy": fwd_bytes / fwd["median_ms"] / 1e6 / copy_gbps},
            "backward": {**bwd, "GBps": bwd_bytes / bwd["median_ms"] / 1e6,
                         "fraction_of_copy": bwd_bytes / bwd["median_ms"] / 1e6 / copy_gbps},
        }
        print(f"pool {case['name']:>18} ln={case['ln']!s:5} {label:>14}: fwd {result[label]['forward']['GBps']:8.1f} "
              f"GB/s  bwd {result[label]['backward']['GBps']:8.1f} GB/s  (copy {copy_gbps:.1f} GB/s)", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------- decode
def eager_upsample(logits, size):
    full = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return full.softmax(1).argmax(1)


def eager_slide(window_logits, boxes: list, canvas, size):
    c = window_logits.shape[1]
    acc = torch.zeros(c, *canvas, device=window_logits.device)
    count = torch.zeros(canvas, device=window_logits.device)
    for logits, (y0, x0, y1, x1) in zip(window_logits, boxes):
        up = F.interpolate(logits[None].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        acc[:, y0:y1, x0:x1] += up.softmax(0)
        count[y0:y1, x0:x1] += 1
    full = F.interpolate((acc / count)[None], size=size, mode="bilinear", align_corners=False)[0]
    return full.argmax(0)


def run_decode(case: dict, device: torch.device, quick: bool) -> dict:
    from dinotxt_fast import ops
    from dinotxt_fast.inference.segmentation import short_side_size, sliding_window_boxes

    image_h, image_w = case["image"]
    canvas = short_side_size(image_h, image_w, case["short_side"])
    boxes = sliding_window_boxes(*canvas, case["window"], case["stride"])
    patch = case["patch"]
    grid = -(-min(case["window"], canvas[0]) // patch), -(-min(case["window"], canvas[1]) // patch)
    whole_grid = -(-canvas[0] // patch), -(-canvas[1] // patch)
    c = case["classes"]
    gen = torch.Generator().manual_seed(0)
    # cosines of random directions, scaled to the spread of real patch-text cosines
    window_logits = (torch.randn(len(boxes), c, *grid, generator=gen) * 0.1).to(device)
    whole_logits = (torch.randn(1, c, *whole_grid, generator=gen) * 0.1).to(device)
    box_list = boxes.tolist()
    result = {"case": case, "canvas": canvas, "windows": len(box_list), "window_grid": grid,
              "full_map_bytes": c * image_h * image_w * 4}
    for op in ("upsample_argmax", "slide_decode"):
        if op == "upsample_argmax":
            eager = lambda: eager_upsample(whole_logits, case["image"])  # noqa: E731
            ours = lambda name: (lambda: ops.upsample_argmax(whole_logits, case["image"], softmax=True,  # noqa: E731
                                                             backend=name))
        else:
            eager = lambda: eager_slide(window_logits, box_list, canvas, case["image"])  # noqa: E731
            ours = lambda name: (lambda: ops.slide_decode(window_logits, boxes, canvas, case["image"],  # noqa: E731
                                                          backend=name))
        base_labels = eager()
        base = {**bench(eager, device, quick), "peak_extra_bytes": peak_extra_bytes(eager, device)}
        entry = {"eager": base}
        for name in kernel_backends(device, op):
            fn = ours(name)
            labels = fn()
            entry[f"ops[{name}]"] = {**bench(fn, device, quick), "peak_extra_bytes": peak_extra_bytes(fn, device),
                                     "agreement_with_eager": float((labels == base_labels).double().mean())}
            e = entry[f"ops[{name}]"]
            print(f"{op:>16} {case['name']:>11} {name:>7}: {e['median_ms']:9.3f} ms (eager {base['median_ms']:.3f} ms)"
                  f", peak {e['peak_extra_bytes']} B (eager {base['peak_extra_bytes']} B), agreement "
                  f"{e['agreement_with_eager']:.6f}", flush=True)
        result[op] = entry
    return result


# ---------------------------------------------------------------------------------------------------- segment
def run_segment(case: dict, device: torch.device, quick: bool) -> dict:
    import dinotxt_fast as dtf

    torch.manual_seed(0)
    model = dtf.create_model(case["preset"], **case["overrides"]).to(device, getattr(torch, case["dtype"])).eval()
    images = torch.randn(case["images"], 3, *case["image"], device=device)
    text = torch.randn(case["classes"], model.config.embed_dim, device=device)
    kw = dict(mode="slide", short_side=case["short_side"], window=case["window"], stride=case["stride"])
    result = {"case": case}
    backends = sorted(set(kernel_backends(device, "slide_decode")) & set(kernel_backends(device, "patch_text_logits")))
    for name in backends:
        fn = lambda name=name: dtf.segment(model, images, text, backend=name, **kw)  # noqa: E731
        fn()
        times = []
        for _ in range(2 if quick else 5):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        times.sort()
        median = statistics.median(times)
        result[f"ops[{name}]"] = {"median_s": median, "q20_s": times[int(0.2 * (len(times) - 1))],
                                  "q80_s": times[int(0.8 * (len(times) - 1))],
                                  "images_per_s": case["images"] / median}
        print(f"segment {name:>7}: {case['images'] / median:.2f} images/s", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ environment
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="smaller cases and fewer repetitions")
    parser.add_argument("--parts", default="pool,decode,segment", help="comma-separated: pool, decode, segment")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile pooling baseline "
                        "(always skipped on CPU)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"pool", "decode", "segment"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from pool, decode, segment")
    cases = {"pool": pool_cases(args.device, args.quick), "decode": decode_cases(args.device, args.quick),
             "segment": [segment_case(args.device, args.quick)]}
    if args.list:
        for part in parts:
            for case in cases[part]:
                print(part, json.dumps(case))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available (use --device cpu --quick for a smoke run)")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are imported

    device = torch.device(args.device)
    record = {"benchmark": "dense", "quick": args.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    record["environment"] = environment(device)
    if "pool" in parts:
        use_compile = device.type == "cuda" and not args.no_compile
        record["pool"] = [run_pool(case, device, args.quick, use_compile) for case in cases["pool"]]
    if "decode" in parts:
        record["decode"] = [run_decode(case, device, args.quick) for case in cases["decode"]]
    if "segment" in parts:
        record["segment"] = run_segment(cases["segment"][0], device, args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dense-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

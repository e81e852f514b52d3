"""Triton dense patch-text decoding: cosine logits, and bilinear upsampling + (softmax) + argmax that never
materialise a full-resolution [C, H, W] map. Same contract as reference/dense.py (patch_text_logits, upsample_argmax,
slide_decode).

- `_cosine_logits`: one GEMM of the patch rows [B*h*w, D] with the class rows [C, D]; the squared norms of both
  are accumulated from the tiles the GEMM loads anyway, and the product is divided by them in the epilogue.
- `_upsample_argmax`: each program owns a block of output pixels; per class chunk it gathers the four
  low-resolution taps of every pixel and keeps an online argmax (and an online softmax normaliser).
- `slide_decode`, two launches: `_window_lse` writes, for every pixel of every window box, the log-sum-exp over
  classes of that window's upsampled logits (per pixel: C x less than the logits); `_slide_decode` then, per
  output pixel and class chunk, sums over its four canvas taps and the windows covering each tap
  exp(bilinear logit - lse) / (number of covering windows), weighted by the final bilinear weights, and keeps an
  online argmax.
Bilinear source indices (align_corners=False) are computed exactly in integers:
src = ((2 dst + 1) in - out) / (2 out), clamped at 0, which is what F.interpolate computes in floating point.
The decoders' [BLOCK_C, BLOCK_P] gathers are flat loads with the pixels fastest (one pixel per lane, as in the CUDA
decode; see _gather), and the cosine GEMM stores its tile pixels-fastest too (the output's contiguous axis). The
window table is made once per geometry on the device (planning.device_window_table).

Compiled for sm_90 and run under the CPU interpreter only: none of these kernels has run on a GPU yet.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import add_kernels
from ..planning import MAX_SIDE, NORM_EPS, dense_supports, device_window_table
from .tuning import autotune

# Every output and workspace is allocated through this, so that tests can poison them (NaN / -1).
_empty = torch.empty
_NORM_EPS = tl.constexpr(NORM_EPS)


def _check_sides(op: str, **sides: int) -> None:
    for name, side in sides.items():
        if side > MAX_SIDE:
            raise ValueError(f"{op} (triton): {name} {side} exceeds {MAX_SIDE}, the limit of the kernels' int32 "
                             "bilinear index math")


# Candidates, the fixed (known-good) one first (ops/triton/tuning.py): each compiles for sm_90 at the real shapes
# (28 x 28 and 32 x 32 patch grids, D = 1024, 150 classes, 512 x 683 outputs) within shared memory and without
# register spills with Triton 3.6 and 3.9 (benchmarks/results/codegen/).
# GEMM: at most 32 output elements per thread (larger tiles spill on sm_90).
_GEMM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_C": c, "BLOCK_K": k}, num_warps=w, num_stages=s)
                 for m, c, k, w, s in ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 32, 64, 4, 4),
                                       (64, 128, 32, 8, 3))]
_GEMM_INTERPRET = triton.Config({"BLOCK_M": 64, "BLOCK_C": 32, "BLOCK_K": 32}, num_warps=1)
# Decoders: [BLOCK_C, BLOCK_P] tiles, one pixel per lane (see _gather). slide_decode holds a tile more (its window
# accumulator): its list has smaller tiles per thread.
_DECODE_CONFIGS = [triton.Config({"BLOCK_C": c, "BLOCK_P": p}, num_warps=w)
                   for c, p, w in ((32, 128, 4), (16, 256, 4), (8, 512, 4), (32, 256, 8))]
# (8, 256, 4) spills in slide_decode with Triton 3.9 (48 spill stores; clean with 3.6): left out.
_SLIDE_CONFIGS = [triton.Config({"BLOCK_C": c, "BLOCK_P": p}, num_warps=w)
                  for c, p, w in ((16, 128, 4), (32, 128, 4), (16, 256, 8))]
_DECODE_INTERPRET = triton.Config({"BLOCK_C": 64, "BLOCK_P": 512}, num_warps=1)


@triton.jit
def _scatter(ptrs, values, mask):
    """tl.store of a [rows, cols] tile as one flat store, cols fastest (see _gather)."""
    rows: tl.constexpr = ptrs.shape[0]
    cols: tl.constexpr = ptrs.shape[1]
    tl.store(tl.reshape(ptrs, [rows * cols]), tl.reshape(values, [rows * cols]),
             mask=tl.reshape(tl.broadcast_to(mask, [rows, cols]), [rows * cols]))


@autotune("dense._cosine_logits", _GEMM_CONFIGS, key=["C", "D", "FP32"], interpret=_GEMM_INTERPRET)
@triton.heuristics({"EVEN_K": lambda args: args["D"] % args["BLOCK_K"] == 0})
@triton.jit
def _cosine_logits(p_ptr, p_sb, p_sh, p_sw, p_sd, t_ptr, t_sc, t_sd, out_ptr, M, HW, W, C, D,
                   FP32: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rk = tl.arange(0, BLOCK_K)
    # Rows past the end are clamped onto the last one (loads need no row mask; their results are not stored).
    row = tl.minimum(rm, M - 1)
    img = row // HW
    pix = row % HW
    a_ptrs = p_ptr + (img.to(tl.int64) * p_sb + (pix // W) * p_sh + (pix % W) * p_sw)[:, None] + rk[None, :] * p_sd
    t_ptrs = t_ptr + tl.minimum(rc, C - 1)[None, :] * t_sc + rk[:, None] * t_sd
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    sq_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            t = tl.load(t_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < D, other=0.0)
            t = tl.load(t_ptrs, mask=(k0 + rk)[:, None] < D, other=0.0)
        af = a.to(tl.float32)
        tf = t.to(tl.float32)
        sq_a += tl.sum(af * af, axis=1)
        sq_t += tl.sum(tf * tf, axis=0)
        if FP32:  # fp32 (or mixed) operands: exact fp32 products, no TF32
            acc = tl.dot(af, tf, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, t, acc)
        a_ptrs += BLOCK_K * p_sd
        t_ptrs += BLOCK_K * t_sd
    inv_a = 1.0 / tl.maximum(tl.sqrt(sq_a), _NORM_EPS)
    inv_t = 1.0 / tl.maximum(tl.sqrt(sq_t), _NORM_EPS)
    acc = acc * inv_a[:, None] * inv_t[None, :]
    img = rm // HW
    pix = rm % HW
    # [C, h, w] maps: pixels are the output's contiguous axis, so they go fastest (class-major tile, flat store)
    dst = out_ptr + img[None, :].to(tl.int64) * C * HW + rc[:, None] * HW + pix[None, :]
    _scatter(dst, tl.trans(acc), (rc < C)[:, None] & (rm < M)[None, :])


def patch_text_logits(patches, text):
    b, h, w, d = patches.shape
    c = text.shape[0]
    out = _empty(b, c, h, w, dtype=torch.float32, device=patches.device)
    m = b * h * w
    low = patches.dtype in (torch.float16, torch.bfloat16) and patches.dtype == text.dtype
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
    _cosine_logits[grid](patches, *patches.stride(), text, *text.stride(), out, m, h * w, w, c, d, FP32=not low)
    return out


@triton.jit
def _taps(dst, in_size, out_size):
    """Bilinear (align_corners=False) source taps of int32 output coordinates: (i0, i1, weight of i1)."""
    num = tl.maximum((2 * dst + 1) * in_size - out_size, 0)
    i0 = num // (2 * out_size)
    frac = (num - i0 * (2 * out_size)).to(tl.float32) / (2.0 * out_size)
    i0 = tl.minimum(i0, in_size - 1)
    return i0, tl.minimum(i0 + 1, in_size - 1), frac


@triton.jit
def _pixel_taps(h, w, H, W, BLOCK_P: tl.constexpr):
    """This program's block of output pixels p of an H x W resize of an h x w map: (p, p < H * W, then the
    row taps (y0, y1, wy) and the column taps (x0, x1, wx))."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    y0, y1, wy = _taps(p // W, h, H)
    x0, x1, wx = _taps(p % W, w, W)
    return p, p < H * W, y0, y1, wy, x0, x1, wx


@triton.jit
def _gather(ptrs, mask):
    """tl.load of a [BLOCK_C, BLOCK_P] gather (zeros where masked) as one flat load, pixels fastest, reshaped back.
    Triton cannot order a 2D gather's axes by contiguity, and its coalescing breaks that tie towards the first axis
    in 3.6 (lanes along classes: every per-pixel value replicated 16x, uncoalesced reads, spills) and towards the
    last in 3.9; flat, a warp's lanes run along the pixels in both, as one thread per pixel does in the CUDA decode."""
    rows: tl.constexpr = ptrs.shape[0]
    cols: tl.constexpr = ptrs.shape[1]
    flat = tl.load(tl.reshape(ptrs, [rows * cols]), mask=tl.reshape(tl.broadcast_to(mask, [rows, cols]), [rows * cols]),
                   other=0.0)
    return tl.reshape(flat, [rows, cols]).to(tl.float32)


@triton.jit
def _bilinear(ptrs, y0, y1, wy, x0, x1, wx, s_h, s_w, mask):
    """[BLOCK_C, BLOCK_P] bilinear values: `ptrs` [BLOCK_C, 1] point at each class's map, taps are [BLOCK_P]."""
    r0 = (y0 * s_h)[None, :]
    r1 = (y1 * s_h)[None, :]
    q0 = (x0 * s_w)[None, :]
    q1 = (x1 * s_w)[None, :]
    v00 = _gather(ptrs + (r0 + q0), mask)
    v10 = _gather(ptrs + (r1 + q0), mask)
    v01 = _gather(ptrs + (r0 + q1), mask)
    v11 = _gather(ptrs + (r1 + q1), mask)
    wy = wy[None, :]
    wx = wx[None, :]
    # rows first, then columns, as the reference does (rounding may differ from F.interpolate in the last bit)
    return (v00 * (1.0 - wy) + v10 * wy) * (1.0 - wx) + (v01 * (1.0 - wy) + v11 * wy) * wx


@triton.jit
def _class_chunk(base, c0, C, s_c, y0, y1, wy, x0, x1, wx, s_h, s_w, p_ok, BLOCK_C: tl.constexpr):
    """(classes, [BLOCK_C, BLOCK_P] bilinear values) of classes [c0, c0 + BLOCK_C) of the map at `base`; -inf for
    classes past C."""
    classes = c0 + tl.arange(0, BLOCK_C)
    c_ok = classes < C
    v = _bilinear(base + classes[:, None] * s_c, y0, y1, wy, x0, x1, wx, s_h, s_w, c_ok[:, None] & p_ok[None, :])
    return classes, tl.where(c_ok[:, None], v, float("-inf"))


@triton.jit
def _online_sum_exp(total, old_max, new_max, v):
    """sum over classes of exp(v - new_max), added to a running `total` kept relative to old_max."""
    return total * tl.exp(old_max - new_max) + tl.sum(tl.exp(v - new_max[None, :]), axis=0)


@triton.jit
def _box(table_ptr, k):
    """(y0, x0, y1, x1, offset) of window k in the window table."""
    box = table_ptr + k * 5
    return tl.load(box), tl.load(box + 1), tl.load(box + 2), tl.load(box + 3), tl.load(box + 4).to(tl.int64)


@triton.jit
def _argmax_update(v, classes, best, label):
    """Online argmax over class chunks; ties keep the lowest class index, like torch.max."""
    chunk_max = tl.max(v, axis=0)
    chunk_arg = tl.min(tl.where(v == chunk_max[None, :], classes[:, None], 2147483647), axis=0)
    better = chunk_max > best
    return tl.where(better, chunk_max, best), tl.where(better, chunk_arg, label)


# Keyed on the class count only: every image size would otherwise re-run the autotuner (~1 s) on a ms kernel.
@autotune("dense._upsample_argmax", _DECODE_CONFIGS, key=["C", "SOFTMAX"], interpret=_DECODE_INTERPRET)
@triton.jit
def _upsample_argmax(x_ptr, s_b, s_c, s_h, s_w, labels_ptr, scores_ptr, C, h, w, H, W,
                     SOFTMAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(1)
    p, p_ok, y0, y1, wy, x0, x1, wx = _pixel_taps(h, w, H, W, BLOCK_P)
    base = x_ptr + b.to(tl.int64) * s_b
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    label = tl.zeros([BLOCK_P], dtype=tl.int32)
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        classes, v = _class_chunk(base, c0, C, s_c, y0, y1, wy, x0, x1, wx, s_h, s_w, p_ok, BLOCK_C)
        new_best, label = _argmax_update(v, classes, best, label)
        if SOFTMAX:  # online softmax normaliser: total = sum_c exp(v_c - best)
            total = _online_sum_exp(total, best, new_best, v)
        best = new_best
    out = b.to(tl.int64) * H * W + p
    tl.store(labels_ptr + out, label.to(tl.int64), mask=p_ok)
    tl.store(scores_ptr + out, 1.0 / total if SOFTMAX else best, mask=p_ok)


def upsample_argmax(logits, size, softmax: bool):
    b, c, h, w = logits.shape
    out_h, out_w = size
    _check_sides("upsample_argmax", height=out_h, width=out_w)
    labels = _empty(b, out_h, out_w, dtype=torch.int64, device=logits.device)
    scores = _empty(b, out_h, out_w, dtype=torch.float32, device=logits.device)
    grid = lambda meta: (triton.cdiv(out_h * out_w, meta["BLOCK_P"]), b)  # noqa: E731
    _upsample_argmax[grid](logits, *logits.stride(), labels, scores, c, h, w, out_h, out_w, SOFTMAX=softmax)
    return labels, scores


@autotune("dense._window_lse", _DECODE_CONFIGS, key=["C"], interpret=_DECODE_INTERPRET)
@triton.jit
def _window_lse(x_ptr, s_n, s_c, s_h, s_w, table_ptr, lse_ptr, C, h, w, max_area,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """lse[off_k + i] = logsumexp over classes of window k's logits upsampled to its box, at box pixel i."""
    k = tl.program_id(1)
    by0, bx0, by1, bx1, off = _box(table_ptr, k)
    bh = by1 - by0
    bw = bx1 - bx0
    p, p_ok, y0, y1, wy, x0, x1, wx = _pixel_taps(h, w, bh, bw, BLOCK_P)
    base = x_ptr + k.to(tl.int64) * s_n
    run_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        _, v = _class_chunk(base, c0, C, s_c, y0, y1, wy, x0, x1, wx, s_h, s_w, p_ok, BLOCK_C)
        new_max = tl.maximum(run_max, tl.max(v, axis=0))
        total = _online_sum_exp(total, run_max, new_max, v)
        run_max = new_max
    tl.store(lse_ptr + off + p, run_max + tl.log(total), mask=p_ok)


@triton.jit
def _add_window_tap(acc, base, classes, c_ok, s_c, s_h, s_w, h, w, lse_ptr, off, bh, bw, ly, lx, p_ok, coef,
                    SOFTMAX: tl.constexpr):
    """acc + coef * (softmaxed) value of one window at one canvas tap (ly, lx: window-local) per pixel,
    [BLOCK_C, BLOCK_P]; pixels whose tap lies outside the window, or has zero weight, add nothing. Taps with zero
    weight (all of them but one when the final resize is the identity) skip the loads altogether."""
    inside = p_ok & (ly >= 0) & (ly < bh) & (lx >= 0) & (lx < bw) & (coef != 0.0)
    if tl.max(inside.to(tl.int32), axis=0) > 0:
        acc += _window_value(base, classes, c_ok, s_c, s_h, s_w, h, w, lse_ptr, off, bh, bw, ly, lx, inside, coef,
                             SOFTMAX)
    return acc


@triton.jit
def _window_value(base, classes, c_ok, s_c, s_h, s_w, h, w, lse_ptr, off, bh, bw, ly, lx, inside, coef,
                  SOFTMAX: tl.constexpr):
    """coef * (softmaxed) value of one window at one canvas tap per pixel, [BLOCK_C, BLOCK_P] (0 where outside)."""
    y0, y1, wy = _taps(ly, h, bh)
    x0, x1, wx = _taps(lx, w, bw)
    mask = c_ok[:, None] & inside[None, :]
    v = _bilinear(base + classes[:, None] * s_c, y0, y1, wy, x0, x1, wx, s_h, s_w, mask)
    if SOFTMAX:
        lse = tl.load(lse_ptr + off + ly * bw + lx, mask=inside, other=0.0)
        v = tl.exp(v - lse[None, :])
    return tl.where(mask, v * coef[None, :], 0.0)


@autotune("dense._slide_decode", _SLIDE_CONFIGS, key=["C", "SOFTMAX"], interpret=_DECODE_INTERPRET)
@triton.jit
def _slide_decode(x_ptr, s_n, s_c, s_h, s_w, table_ptr, n_windows, lse_ptr, labels_ptr, scores_ptr,
                  C, h, w, Hc, Wc, H, W, SOFTMAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    p, p_ok, cy0, cy1, fy, cx0, cx1, fx = _pixel_taps(Hc, Wc, H, W, BLOCK_P)
    # number of windows covering each of the four canvas taps (canvas pixel values are window averages)
    n00 = tl.zeros([BLOCK_P], dtype=tl.int32)
    n01 = tl.zeros([BLOCK_P], dtype=tl.int32)
    n10 = tl.zeros([BLOCK_P], dtype=tl.int32)
    n11 = tl.zeros([BLOCK_P], dtype=tl.int32)
    for k in range(n_windows):
        by0, bx0, by1, bx1, _ = _box(table_ptr, k)
        in_y0 = (cy0 >= by0) & (cy0 < by1)
        in_y1 = (cy1 >= by0) & (cy1 < by1)
        in_x0 = (cx0 >= bx0) & (cx0 < bx1)
        in_x1 = (cx1 >= bx0) & (cx1 < bx1)
        n00 += (in_y0 & in_x0).to(tl.int32)
        n01 += (in_y0 & in_x1).to(tl.int32)
        n10 += (in_y1 & in_x0).to(tl.int32)
        n11 += (in_y1 & in_x1).to(tl.int32)
    # final bilinear weight of each tap over its window count (coverage is checked on the host)
    a00 = (1.0 - fy) * (1.0 - fx) / tl.maximum(n00, 1).to(tl.float32)
    a01 = (1.0 - fy) * fx / tl.maximum(n01, 1).to(tl.float32)
    a10 = fy * (1.0 - fx) / tl.maximum(n10, 1).to(tl.float32)
    a11 = fy * fx / tl.maximum(n11, 1).to(tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    label = tl.zeros([BLOCK_P], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        classes = c0 + tl.arange(0, BLOCK_C)
        c_ok = classes < C
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for k in range(n_windows):
            by0, bx0, by1, bx1, off = _box(table_ptr, k)
            bh = by1 - by0
            bw = bx1 - bx0
            base = x_ptr + k * s_n  # int32: the input has < 2**31 elements (supports)
            ly0, ly1, lx0, lx1 = cy0 - by0, cy1 - by0, cx0 - bx0, cx1 - bx0  # the four taps, window-local
            acc = _add_window_tap(acc, base, classes, c_ok, s_c, s_h, s_w, h, w, lse_ptr, off, bh, bw, ly0, lx0, p_ok,
                                  a00, SOFTMAX)
            acc = _add_window_tap(acc, base, classes, c_ok, s_c, s_h, s_w, h, w, lse_ptr, off, bh, bw, ly0, lx1, p_ok,
                                  a01, SOFTMAX)
            acc = _add_window_tap(acc, base, classes, c_ok, s_c, s_h, s_w, h, w, lse_ptr, off, bh, bw, ly1, lx0, p_ok,
                                  a10, SOFTMAX)
            acc = _add_window_tap(acc, base, classes, c_ok, s_c, s_h, s_w, h, w, lse_ptr, off, bh, bw, ly1, lx1, p_ok,
                                  a11, SOFTMAX)
        best, label = _argmax_update(tl.where(c_ok[:, None], acc, float("-inf")), classes, best, label)
    tl.store(labels_ptr + p, label.to(tl.int64), mask=p_ok)
    tl.store(scores_ptr + p, best, mask=p_ok)


def slide_decode(window_logits, boxes, canvas_size, size, softmax: bool):
    n_windows, c, h, w = window_logits.shape
    out_h, out_w = size
    _check_sides("slide_decode", canvas_height=canvas_size[0], canvas_width=canvas_size[1], height=out_h, width=out_w)
    device = window_logits.device
    table, total_area, max_area = device_window_table(boxes, canvas_size, size, device)
    strides = window_logits.stride()
    lse = _empty(total_area if softmax else 1, dtype=torch.float32, device=device)
    if softmax:
        grid = lambda meta: (triton.cdiv(max_area, meta["BLOCK_P"]), n_windows)  # noqa: E731
        _window_lse[grid](window_logits, *strides, table, lse, c, h, w, max_area)
    labels = _empty(out_h, out_w, dtype=torch.int64, device=device)
    scores = _empty(out_h, out_w, dtype=torch.float32, device=device)
    grid = lambda meta: (triton.cdiv(out_h * out_w, meta["BLOCK_P"]),)  # noqa: E731
    _slide_decode[grid](window_logits, *strides, table, n_windows, lse, labels, scores, c, h, w, *canvas_size,
                        out_h, out_w, SOFTMAX=softmax)
    return labels, scores


for _op, _kernel in (("patch_text_logits", patch_text_logits), ("upsample_argmax", upsample_argmax),
                     ("slide_decode", slide_decode)):
    add_kernels("triton", _op, {_op: _kernel}, supports=dense_supports("Triton", _op, max_elements=2 ** 31 - 1))

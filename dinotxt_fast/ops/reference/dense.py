"""Reference dense decoding (the "torch" backend's patch_text_logits, upsample_argmax and slide_decode): cosine
logits, and bilinear upsampling + (softmax) + argmax in bands of output rows, never a full-resolution [C, H, W] map."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import add_kernels
from ..planning import accumulation_dtype
from . import common


def patch_text_logits(patches, text):
    """Cosine similarity of every patch [B,h,w,D] with every class [C,D] -> [B,C,h,w] (fp32, fp64 for fp64)."""
    acc = accumulation_dtype(patches.dtype)
    p = F.normalize(patches.to(acc), dim=-1)
    t = F.normalize(text.to(acc), dim=-1)
    return torch.einsum("bhwd,cd->bchw", p, t).contiguous()


def _source_index(out_size: int, in_size: int, device, dtype):
    """Bilinear (align_corners=False) taps along one axis, as F.interpolate computes them: (i0, i1, w1)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, (src - i0).to(dtype)


def _bilinear_rows(x, out_h: int, out_w: int, rows: torch.Tensor):
    """Rows `rows` of F.interpolate(x [..., h, w], (out_h, out_w), "bilinear", align_corners=False)."""
    y0, y1, wy = (t[rows] for t in _source_index(out_h, x.shape[-2], x.device, x.dtype))
    x0, x1, wx = _source_index(out_w, x.shape[-1], x.device, x.dtype)
    wy = wy[:, None]
    top = x[..., y0, :] * (1 - wy) + x[..., y1, :] * wy
    return top[..., x0] * (1 - wx) + top[..., x1] * wx


def _row_chunks(n_rows: int, elements_per_row: int):
    step = max(1, common.CHUNK_ELEMENTS // max(1, elements_per_row))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def upsample_argmax(logits, size, softmax: bool):
    """Labels [B,H,W] int64 and winning scores [B,H,W] of bilinearly upsampled logits [B,C,h,w].

    Works on bands of output rows, so no [B,C,H,W] tensor is ever allocated."""
    b, c, _, _ = logits.shape
    out_h, out_w = size
    x = logits.to(accumulation_dtype(logits.dtype))
    labels = torch.empty(b, out_h, out_w, dtype=torch.int64, device=logits.device)
    scores = torch.empty(b, out_h, out_w, dtype=x.dtype, device=logits.device)
    for start, stop in _row_chunks(out_h, b * c * out_w):
        band = _bilinear_rows(x, out_h, out_w, torch.arange(start, stop, device=x.device))
        if softmax:
            band = band.softmax(dim=1)
        scores[:, start:stop], labels[:, start:stop] = band.max(dim=1)
    return labels, scores


def _canvas_rows(window_logits, boxes, canvas_w: int, rows: torch.Tensor, softmax: bool):
    """Window-averaged (softmaxed) logits of canvas rows `rows` -> [C, len(rows), canvas_w]."""
    c = window_logits.shape[1]
    acc = torch.zeros(c, rows.numel(), canvas_w, dtype=window_logits.dtype, device=window_logits.device)
    count = torch.zeros(rows.numel(), canvas_w, dtype=window_logits.dtype, device=window_logits.device)
    for logits, (y0, x0, y1, x1) in zip(window_logits, boxes.tolist()):
        inside = (rows >= y0) & (rows < y1)
        if not bool(inside.any()):
            continue
        band = _bilinear_rows(logits, y1 - y0, x1 - x0, rows[inside] - y0)
        if softmax:
            band = band.softmax(dim=0)
        acc[:, inside, x0:x1] += band
        count[inside, x0:x1] += 1
    if bool((count == 0).any()):
        raise ValueError("slide_decode: the window boxes do not cover the whole canvas")
    return acc / count


def slide_decode(window_logits, boxes, canvas_size, size, softmax: bool):
    """The sliding-window protocol without a full-resolution [C,H,W] map: labels [H,W] int64 and scores [H,W].

    Each window's logits [Nw,C,h,w] are upsampled to its box (y0, x0, y1, x1) on the canvas, softmaxed over classes
    when asked, averaged where windows overlap, then bilinearly resized to `size`. Output rows are produced in bands:
    each band needs only the canvas rows its bilinear taps touch."""
    canvas_h, canvas_w = canvas_size
    out_h, out_w = size
    x = window_logits.to(accumulation_dtype(window_logits.dtype))
    c = x.shape[1]
    y0_all, y1_all, wy_all = _source_index(out_h, canvas_h, x.device, x.dtype)
    x0, x1, wx = _source_index(out_w, canvas_w, x.device, x.dtype)
    labels = torch.empty(out_h, out_w, dtype=torch.int64, device=x.device)
    scores = torch.empty(out_h, out_w, dtype=x.dtype, device=x.device)
    for start, stop in _row_chunks(out_h, 2 * c * max(canvas_w, out_w)):
        y0, y1, wy = y0_all[start:stop], y1_all[start:stop], wy_all[start:stop, None]
        needed, where = torch.unique(torch.cat([y0, y1]), return_inverse=True)
        canvas = _canvas_rows(x, boxes, canvas_w, needed, softmax)  # [C, len(needed), Wc]
        n = stop - start
        band = canvas[:, where[:n]] * (1 - wy) + canvas[:, where[n:]] * wy
        band = band[..., x0] * (1 - wx) + band[..., x1] * wx
        scores[start:stop], labels[start:stop] = band.max(dim=0)
    return labels, scores


add_kernels("torch", "patch_text_logits", {"patch_text_logits": patch_text_logits})
add_kernels("torch", "upsample_argmax", {"upsample_argmax": upsample_argmax})
add_kernels("torch", "slide_decode", {"slide_decode": slide_decode})

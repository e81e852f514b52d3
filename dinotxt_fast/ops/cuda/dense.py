"""CUDA dense patch-text decoding (wrappers of dinotxt_fast._C) and the host-side window table shared with Triton."""
from __future__ import annotations

import functools

import torch

from ... import _ext
from ..dispatch import add_kernels
from .pooling import DTYPE_CODES

MAX_SIDE = 32767  # the kernels compute (2 * dst + 1) * in in int32
# Every output and workspace is allocated through this, so that tests can poison them (NaN / -1).
_empty = torch.empty


def _tap_rows(out_size: int, in_size: int) -> torch.Tensor:
    """Source rows (both bilinear taps, align_corners=False) that resizing in_size -> out_size reads."""
    dst = torch.arange(out_size, dtype=torch.int64)
    i0 = ((2 * dst + 1) * in_size - out_size).clamp_min(0) // (2 * out_size)
    i0 = i0.clamp_max(in_size - 1)
    return torch.unique(torch.cat([i0, (i0 + 1).clamp_max(in_size - 1)]))


def window_table(boxes, canvas_size, size):
    """([[y0, x0, y1, x1, offset]] per window, total box area, largest box area) for the slide_decode kernels;
    `offset` is where a window's per-pixel values start in a buffer of all boxes' pixels, row-major.

    Raises the reference's ValueError when a canvas row that the final resize reads is not covered by windows
    across its whole width."""
    rows = boxes.tolist() if isinstance(boxes, torch.Tensor) else boxes
    table, total, largest = _window_table(tuple(tuple(int(v) for v in box) for box in rows),
                                          tuple(int(s) for s in canvas_size), tuple(int(s) for s in size))
    return [list(row) for row in table], total, largest


@functools.lru_cache(maxsize=256)  # the same geometry comes back for every image of a size
def _window_table(boxes: tuple, canvas_size: tuple, size: tuple):
    canvas_h, canvas_w = canvas_size
    b = torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4)
    # Cells between consecutive box edges are covered by a window entirely or not at all.
    ys = torch.unique(torch.cat([torch.tensor([0, canvas_h]), b[:, 0], b[:, 2]]))
    xs = torch.unique(torch.cat([torch.tensor([0, canvas_w]), b[:, 1], b[:, 3]]))
    covered = ((b[:, 0, None, None] <= ys[:-1, None]) & (b[:, 2, None, None] >= ys[1:, None])
               & (b[:, 1, None, None] <= xs[None, :-1]) & (b[:, 3, None, None] >= xs[None, 1:])).any(0)
    needed = torch.bucketize(_tap_rows(size[0], canvas_h), ys, right=True) - 1  # cell row of each row read
    if len(boxes) == 0 or not bool(covered[needed].all()):
        raise ValueError("slide_decode: the window boxes do not cover the whole canvas")
    table, offset, largest = [], 0, 0
    for y0, x0, y1, x1 in boxes:
        area = (y1 - y0) * (x1 - x0)
        table.append((y0, x0, y1, x1, offset))
        offset += area
        largest = max(largest, area)
    if offset >= 2 ** 31:
        raise ValueError(f"slide_decode: the window boxes hold {offset} pixels in all; the kernels index them with "
                         "int32 (at most 2**31 - 1)")
    return tuple(table), offset, largest


def _extension():
    ext = _ext.extension()
    if ext is None:
        raise RuntimeError(f"the CUDA dense decoding kernels need dinotxt_fast._C: {_ext.extension_error()}")
    return ext


def _check(op: str, name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{op} (cuda): {name} must be a CUDA tensor, got one on {t.device}")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{op} (cuda): {name} must be float32, float16 or bfloat16, got {t.dtype}")


def patch_text_logits(patches, text):
    _check("patch_text_logits", "patches", patches)
    _check("patch_text_logits", "text", text)
    # unit stride along D; any other strides are passed through
    patches = patches if patches.stride(3) == 1 else patches.contiguous()
    text = text if text.stride(1) == 1 else text.contiguous()
    b, h, w, d = patches.shape
    c = text.shape[0]
    out = _empty(b, c, h, w, dtype=torch.float32, device=patches.device)
    inv_norms = _empty(b * h * w + c, dtype=torch.float32, device=patches.device)
    _extension().dense_patch_text_logits(
        patches.data_ptr(), DTYPE_CODES[patches.dtype], b, h, w, d, *patches.stride()[:3], text.data_ptr(),
        DTYPE_CODES[text.dtype], c, text.stride(0), inv_norms.data_ptr(), out.data_ptr(),
        _ext.current_stream_ptr(patches.device))
    return out


def upsample_argmax(logits, size, softmax: bool):
    _check("upsample_argmax", "logits", logits)
    b, c, h, w = logits.shape
    out_h, out_w = size
    labels = _empty(b, out_h, out_w, dtype=torch.int64, device=logits.device)
    scores = _empty(b, out_h, out_w, dtype=torch.float32, device=logits.device)
    _extension().dense_upsample_argmax(
        logits.data_ptr(), DTYPE_CODES[logits.dtype], b, c, h, w, *logits.stride(), out_h, out_w, bool(softmax),
        labels.data_ptr(), scores.data_ptr(), _ext.current_stream_ptr(logits.device))
    return labels, scores


def slide_decode(window_logits, boxes, canvas_size, size, softmax: bool):
    _check("slide_decode", "window_logits", window_logits)
    n_windows, c, h, w = window_logits.shape
    device = window_logits.device
    table, total_area, max_area = window_table(boxes, canvas_size, size)
    table = torch.tensor(table, dtype=torch.int32, device=device)
    lse = _empty(total_area if softmax else 1, dtype=torch.float32, device=device)
    labels = _empty(*size, dtype=torch.int64, device=device)
    scores = _empty(*size, dtype=torch.float32, device=device)
    _extension().dense_slide_decode(
        window_logits.data_ptr(), DTYPE_CODES[window_logits.dtype], n_windows, c, h, w, *window_logits.stride(),
        table.data_ptr(), max_area, lse.data_ptr(), canvas_size[0], canvas_size[1], size[0], size[1], bool(softmax),
        labels.data_ptr(), scores.data_ptr(), _ext.current_stream_ptr(device))
    return labels, scores


def _supports(name: str):
    def check(tensor: torch.Tensor, info: dict):
        if tensor.dtype not in DTYPE_CODES:
            return f"the CUDA {name} kernel takes float32, float16 or bfloat16, got {tensor.dtype}"
        if tensor.numel() == 0 or info.get("num_classes", 1) == 0:
            return f"the CUDA {name} kernel needs non-empty inputs, got shape {tuple(tensor.shape)}"
        if name != "patch_text_logits" and max(tensor.shape[2:]) > MAX_SIDE:
            return f"the CUDA {name} kernel's int32 index math needs sides <= {MAX_SIDE}, got {tuple(tensor.shape)}"
        return None
    return check


_C = _ext.extension()
if _C is not None and hasattr(_C, "dense_slide_decode"):
    add_kernels("cuda", "patch_text_logits", {"patch_text_logits": patch_text_logits},
                supports=_supports("patch_text_logits"))
    add_kernels("cuda", "upsample_argmax", {"upsample_argmax": upsample_argmax}, supports=_supports("upsample_argmax"))
    add_kernels("cuda", "slide_decode", {"slide_decode": slide_decode}, supports=_supports("slide_decode"))

"""CUDA dense patch-text decoding (wrappers of dinotxt_fast._C), same contract as reference/dense.py; the window
table of slide_decode is planning.device_window_table (made once per geometry and kept on the device), shared with
the Triton kernels."""
from __future__ import annotations

import torch

from ... import _ext
from ..dispatch import add_kernels
from ..planning import DTYPE_CODES, KERNEL_DTYPES, dense_supports, device_window_table
from . import require_extension

# Every output and workspace is allocated through this, so that tests can poison them (NaN / -1).
_empty = torch.empty


def _extension():
    return require_extension("dense decoding")


def _check(op: str, name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{op} (cuda): {name} must be a CUDA tensor, got one on {t.device}")
    if t.dtype not in KERNEL_DTYPES:
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
    table, total_area, max_area = device_window_table(boxes, canvas_size, size, device)
    lse = _empty(total_area if softmax else 1, dtype=torch.float32, device=device)
    labels = _empty(*size, dtype=torch.int64, device=device)
    scores = _empty(*size, dtype=torch.float32, device=device)
    _extension().dense_slide_decode(
        window_logits.data_ptr(), DTYPE_CODES[window_logits.dtype], n_windows, c, h, w, *window_logits.stride(),
        table.data_ptr(), max_area, lse.data_ptr(), canvas_size[0], canvas_size[1], size[0], size[1], bool(softmax),
        labels.data_ptr(), scores.data_ptr(), _ext.current_stream_ptr(device))
    return labels, scores


_C = _ext.extension()
if _C is not None and hasattr(_C, "dense_slide_decode"):
    for _op, _kernel in (("patch_text_logits", patch_text_logits), ("upsample_argmax", upsample_argmax),
                         ("slide_decode", slide_decode)):
        add_kernels("cuda", _op, {_op: _kernel}, supports=dense_supports("CUDA", _op))

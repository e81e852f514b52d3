"""Backend-neutral host helpers that more than one backend uses (no kernel code, no import of a backend).

Numbers every backend agrees on (log2(e), the normalisation clamp, the accumulation dtype, the compiled kernels'
dtype codes), how many programs fill a device, how pooling splits an image's token rows over programs, how a
contrastive dS panel is cut into enough programs, the window table of slide_decode (kept on the device per
geometry), and the `supports` checks that the Triton and CUDA kernels of a family share. `ops/triton` and `ops/cuda`
import this module, never each other.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch

# Softmax kernels work in base 2: exp(x) = exp2(x * LOG2E), ln(x) = log2(x) / LOG2E.
LOG2E = math.log2(math.e)
# F.normalize's clamp of the norm: x / max(||x||, NORM_EPS).
NORM_EPS = 1e-12
# dtype codes of the compiled kernels' entry points (csrc: the `dtype` arguments of pooling, dense, attention).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# The floating dtypes the Triton and CUDA pooling and dense kernels take.
KERNEL_DTYPES = tuple(DTYPE_CODES)
MAX_SIDE = 32767  # the dense kernels compute (2 * dst + 1) * in in int32

Supports = Callable[[torch.Tensor, dict], Optional[str]]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: what every backend accumulates (and returns statistics) in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(x: int, unit: int) -> int:
    return cdiv(x, unit) * unit


# ------------------------------------------------------------------------------------------------ patch pooling
def fill_target(device: torch.device) -> int:
    """Programs a launch wants at least to fill the device: 4 per SM on a GPU; 4 on the CPU (Triton's interpreter:
    small, so that tests at small shapes exercise the split paths)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def row_splits(batch: int, rows: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of each image's `rows` token rows: enough blocks to fill the GPU when the batch is
    small (a fixed function of the shape, so the partial sums, and the result, are deterministic)."""
    target, min_rows = fill_target(device), (32 if device.type == "cuda" else 16)
    splits = max(1, min(cdiv(target, batch), cdiv(rows, min_rows)))
    per = cdiv(rows, splits)
    return cdiv(rows, per), per


def pooling_supports(kernels: str, max_dim: int) -> Supports:
    """The patch_pool `supports` check of the `kernels` ("Triton", "CUDA") pooling kernels, which keep a token row
    of at most `max_dim` features in registers."""
    def check(tokens: torch.Tensor, info: dict) -> Optional[str]:
        if tokens.dtype not in KERNEL_DTYPES:
            return f"the {kernels} pooling kernels take float32, float16 or bfloat16 tokens, got {tokens.dtype}"
        if tokens.numel() == 0:
            return f"the {kernels} pooling kernels need non-empty tokens, got shape {tuple(tokens.shape)}"
        if info.get("dim", tokens.shape[-1]) > max_dim:
            return (f"the {kernels} pooling kernels keep a row in registers: D must be <= {max_dim}, got "
                    f"{tokens.shape[-1]}")
        return None
    return check


# ------------------------------------------------------------------------------------------ contrastive dS panels
def _parts(units: int, wanted: int) -> int:
    """The smallest divisor of `units` that is >= wanted (all of them: one unit each, when none is)."""
    return next((p for p in range(max(1, wanted), units + 1) if units % p == 0), units)


def ds_parts(row_chunks: int, col_chunks: int, row_chunk: int, col_chunk: int, unit: int,
             target: int) -> tuple[int, int]:
    """(row parts, column parts) to cut every (row chunk, column chunk) of a dS panel launch into, so that the launch
    has at least `target` programs where the chunks allow it (at B_local = 32768 a panel is one column chunk: 32
    programs for 132 SMs otherwise). Each part is a whole number of `unit`s (a chunk of q units is cut into a divisor
    of q parts), so that every part lies in one chunk and fold_ds_partials can sum each chunk's parts exactly, in a
    fixed order."""
    wanted = cdiv(target, row_chunks * col_chunks)
    if wanted <= 1:
        return 1, 1
    rows = _parts(row_chunk // unit, math.isqrt(wanted - 1) + 1)
    return rows, _parts(col_chunk // unit, cdiv(wanted, rows))


def fold_ds_partials(partials: torch.Tensor, ds_dot_s: torch.Tensor, first_chunk: int, row_parts: int,
                     col_parts: int) -> None:
    """ds_dot_s[:, first_chunk + j] = the sum of the parts of each (row chunk, column chunk j) in `partials`
    [row chunks * row_parts, panel chunks * col_parts] (parts never launched hold zeros)."""
    rows, cols = partials.shape[0] // row_parts, partials.shape[1] // col_parts
    sums = partials.view(rows, row_parts, cols, col_parts).sum(dim=(1, 3))
    ds_dot_s[:rows, first_chunk:first_chunk + cols].copy_(sums)


# ------------------------------------------------------------------------------------------------- dense decode
def dense_supports(kernels: str, op: str, max_elements: Optional[int] = None) -> Supports:
    """The `supports` check of the `kernels` ("Triton", "CUDA") dense decoding kernel of `op`; `max_elements`
    bounds the input's size where the kernel indexes it with int32."""
    def check(tensor: torch.Tensor, info: dict) -> Optional[str]:
        if tensor.dtype not in KERNEL_DTYPES:
            return f"the {kernels} {op} kernel takes float32, float16 or bfloat16, got {tensor.dtype}"
        if tensor.numel() == 0 or info.get("num_classes", 1) == 0:
            return f"the {kernels} {op} kernel needs non-empty inputs, got shape {tuple(tensor.shape)}"
        if op != "patch_text_logits" and max(tensor.shape[2:]) > MAX_SIDE:
            return f"the {kernels} {op} kernel's int32 index math needs sides <= {MAX_SIDE}, got {tuple(tensor.shape)}"
        if max_elements is not None and tensor.numel() > max_elements:
            return f"the {kernels} {op} kernel indexes its input with int32, got {tensor.numel()} elements"
        return None
    return check


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


def device_window_table(boxes, canvas_size, size, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """window_table with the table as an int32 [windows, 5] tensor on `device`, made once per geometry and device
    and kept: a slide_decode call then copies nothing to the GPU (no host-to-device copy and sync per image)."""
    rows = boxes.tolist() if isinstance(boxes, torch.Tensor) else boxes
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _device_window_table(tuple(tuple(int(v) for v in box) for box in rows), tuple(int(s) for s in canvas_size),
                                tuple(int(s) for s in size), device)


@functools.lru_cache(maxsize=256)
def _device_window_table(boxes: tuple, canvas_size: tuple, size: tuple, device: torch.device):
    table, total, largest = _window_table(boxes, canvas_size, size)
    return torch.tensor(table, dtype=torch.int32, device=device), total, largest


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

"""Reference dense decoding (the "torch" backend's patch_text_logits, upsample_argmax and slide_decode): cosine
logits, and bilinear resizing + (softmax) + argmax in bands of output rows, never a full-resolution [C, H, W] map.

The resize is separable and runs channels last ([rows, width, C]): the source rows a band reads are resized along the
width once (a 2-tap gather, kept in a block for the next bands), then combined along the height by one small matrix
product per band ([band rows, block rows], two non-zero taps a row). The argmax, the softmax and the window averaging
of slide_decode run on each band while it is hot in cache; labels are the first maximum of the logits (the softmax is
monotone per pixel), only the returned score needs the softmax's sum.
"""
from __future__ import annotations

import bisect
import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..dispatch import add_kernels
from ..planning import NORM_EPS, accumulation_dtype
from . import common

Rows = tuple  # sorted, distinct row indices (python ints)


def patch_text_logits(patches, text):
    """Cosine similarity of every patch [B,h,w,D] with every class [C,D] -> [B,C,h,w] (fp32, fp64 for fp64).

    One batched product of the normalised classes with the raw patches, written [B, C, h*w] in place, then scaled by
    each patch's 1 / max(||p||, eps): no normalised copy of the patches, no transposing copy of the result."""
    acc = accumulation_dtype(patches.dtype)
    b, h, w, d = patches.shape
    p = patches.to(acc).reshape(b, h * w, d)
    inv_norm = torch.linalg.vector_norm(p, dim=-1).clamp_min_(NORM_EPS).reciprocal_()  # [B, h*w]
    logits = torch.matmul(F.normalize(text.to(acc), dim=-1), p.transpose(1, 2))  # [B, C, h*w]
    return logits.mul_(inv_norm[:, None, :]).view(b, -1, h, w)


class _Axis(NamedTuple):
    """Bilinear (align_corners=False) taps of one axis resized in_size -> out_size: output i reads source rows i0[i]
    and i1[i] with weights w0[i], w1[i]; `reads` are the source indices read, sorted."""
    i0: tuple
    i1: tuple
    w0: torch.Tensor
    w1: torch.Tensor
    reads: tuple
    same: bool  # in_size == out_size: the identity (w0 = 1, w1 = 0), skipped as an exact copy


@functools.lru_cache(maxsize=256)  # the same geometry comes back for every window and every image of a size
def _axis(out_size: int, in_size: int, dtype) -> _Axis:
    """The taps computed as F.interpolate computes them in `dtype`, so that resized values round as the
    full-resolution map's do."""
    scale = torch.tensor(in_size, dtype=dtype) / out_size
    src = ((torch.arange(out_size, dtype=dtype) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().to(torch.int64).clamp_max(in_size - 1)
    lam = (src - i0).clamp(0, 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    same = in_size == out_size
    reads = tuple(range(out_size)) if same else tuple(torch.unique(torch.cat([i0, i1])).tolist())
    return _Axis(tuple(i0.tolist()), tuple(i1.tolist()), 1 - lam, lam, reads, same)


@functools.lru_cache(maxsize=256)
def _width_taps(out_size: int, in_size: int, dtype, device):
    axis = _axis(out_size, in_size, dtype)
    return (torch.tensor(axis.i0, device=device), torch.tensor(axis.i1, device=device),
            axis.w0.to(device)[:, None], axis.w1.to(device)[:, None])


@functools.lru_cache(maxsize=4096)  # bands of equal geometry repeat over windows and images
def _height_mix(out_size: int, in_size: int, dtype, out_rows: tuple, block_rows: tuple):
    """(mix [len(out_rows), span], first, last): output rows `out_rows` as combinations of the block's rows
    block_rows[first:last + 1], the span their taps cover (taps are monotone in the output row); two entries a row,
    one where both taps are the same row."""
    axis = _axis(out_size, in_size, dtype)
    position = {r: k for k, r in enumerate(block_rows)}
    first, last = position[axis.i0[out_rows[0]]], position[axis.i1[out_rows[-1]]]
    mix = torch.zeros(len(out_rows), last + 1 - first, dtype=dtype)
    picks, at = torch.tensor(out_rows), torch.arange(len(out_rows))
    for taps, weights in ((axis.i0, axis.w0), (axis.i1, axis.w1)):
        columns = torch.tensor([position[taps[r]] - first for r in out_rows])
        mix.index_put_((at, columns), weights[picks], accumulate=True)
    return mix, first, last


def _take_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """x[rows] along dim 0: a view when the rows are consecutive."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return x[rows[0]:rows[-1] + 1]
    return x.index_select(0, torch.tensor(rows, device=x.device))


class _Resize:
    """Rows of the bilinear resize (align_corners=False) of a channels-last image [in_h, in_w, C] to
    [out_h, out_w, C], whose source rows come from `source(rows) -> [len(rows), in_w, C]`.

    `rows(out_rows)` returns [len(out_rows), out_w, C] (a view of the source or of the kept block where no resize
    applies: do not write into it). Width-resized source rows are kept in one block of at least `block_rows` of the
    rows the resize reads, so that each source row is fetched and resized about once for all bands."""

    def __init__(self, source: Callable[[Rows], torch.Tensor], in_size, out_size, block_rows: int, dtype, device):
        self.source, self.block_rows, self.dtype, self.device = source, max(1, block_rows), dtype, device
        self.in_size, self.out_size = tuple(in_size), tuple(out_size)
        self.height = _axis(out_size[0], in_size[0], dtype)
        self.block, self.block_rows_held, self.block_index = None, (), {}

    def _resize_width(self, x: torch.Tensor) -> torch.Tensor:
        """[n, in_w, C] -> [n, out_w, C]: w0 * x[:, i0] + w1 * x[:, i1], the taps gathered as whole C-vectors (an
        index_select along dim 0 of the [n * in_w, C] rows: row copies, unlike a gather along the middle dim)."""
        n, in_w, c = x.shape
        if in_w == self.out_size[1]:
            return x
        i0, i1, w0, w1 = _width_taps(self.out_size[1], in_w, self.dtype, self.device)
        rows = x.reshape(n * in_w, c)
        offsets = torch.arange(0, n * in_w, in_w, device=x.device)[:, None]
        tap = lambda index: rows.index_select(0, (offsets + index).reshape(-1)).view(n, -1, c)  # noqa: E731
        return tap(i0).mul_(w0).addcmul_(tap(i1), w1)

    def _block_for(self, first_row: int, last_row: int) -> torch.Tensor:
        """The kept block, refilled with the read rows from first_row on when it lacks first_row or last_row."""
        if first_row not in self.block_index or last_row not in self.block_index:
            reads = self.height.reads
            first = bisect.bisect_left(reads, first_row)
            last = max(bisect.bisect_left(reads, last_row) + 1, first + self.block_rows)
            rows = reads[first:last]
            self.block = None  # released before its successor is built
            self.block = self._resize_width(self.source(rows))
            self.block_rows_held, self.block_index = rows, {r: k for k, r in enumerate(rows)}
        return self.block

    def rows(self, out_rows: Rows, out: torch.Tensor = None) -> torch.Tensor:
        if self.height.same:
            block = self._block_for(out_rows[0], out_rows[-1])
            return _take_rows(block, [self.block_index[r] for r in out_rows])
        block = self._block_for(self.height.i0[out_rows[0]], self.height.i1[out_rows[-1]])
        mix, first, last = _height_mix(self.out_size[0], self.in_size[0], self.dtype, tuple(out_rows),
                                       self.block_rows_held)
        flat = block[first:last + 1].reshape(last + 1 - first, -1)
        if out is None:
            out = torch.empty(len(out_rows), *block.shape[1:], dtype=block.dtype, device=block.device)
        torch.mm(mix.to(block.device), flat, out=out.view(len(out_rows), -1))
        return out


def _band_rows(row_elements: int, device) -> int:
    return max(1, common.chunk_elements(device) // max(1, row_elements))


def _bands(n_rows: int, step: int):
    for start in range(0, n_rows, step):
        yield tuple(range(start, min(start + step, n_rows)))


def _argmax_into(band, softmax: bool, labels, scores, work) -> None:
    """labels/scores [n, W] <- the first maximum over classes of band [n, W, C] and its value, or its softmax
    probability 1 / sum(exp(band - max)); `work` is a scratch tensor of band's size."""
    torch.max(band, dim=-1, out=(scores, labels))
    if softmax:
        torch.sub(band, scores[..., None], out=work).exp_()
        torch.sum(work, dim=-1, out=scores)
        scores.reciprocal_()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """[..., C, h, w] in the accumulation dtype -> [..., h, w, C] contiguous (a copy the size of the logits)."""
    return x.to(accumulation_dtype(x.dtype)).movedim(-3, -1).contiguous()


def upsample_argmax(logits, size, softmax: bool):
    """Labels [B,H,W] int64 and winning scores [B,H,W] of bilinearly upsampled logits [B,C,h,w], band by band."""
    b, c, h, w = logits.shape
    out_h, out_w = size
    acc, device = accumulation_dtype(logits.dtype), logits.device
    labels = torch.empty(b, out_h, out_w, dtype=torch.int64, device=device)
    scores = torch.empty(b, out_h, out_w, dtype=acc, device=device)
    step = _band_rows(out_w * c, device)
    band_buffer = torch.empty(min(step, out_h), out_w, c, dtype=acc, device=device)
    work = torch.empty_like(band_buffer) if softmax else None
    for i in range(b):
        x = _channels_last(logits[i])  # [h, w, C]
        resize = _Resize(lambda rows: _take_rows(x, rows), (h, w), (out_h, out_w), step, acc, device)
        for rows in _bands(out_h, step):
            n, r0 = len(rows), rows[0]
            band = resize.rows(rows, out=band_buffer[:n])
            _argmax_into(band, softmax, labels[i, r0:r0 + n], scores[i, r0:r0 + n], None if work is None else work[:n])
    return labels, scores


class _Canvas:
    """Rows of the window-averaged canvas of slide_decode, channels last: each window's logits resized to its box,
    softmaxed over classes when asked, summed where windows overlap and divided by the number of windows."""

    def __init__(self, windows, boxes, canvas_size, softmax: bool, device):
        self.windows, self.boxes, self.softmax, self.device = windows, boxes, softmax, device
        self.width = canvas_size[1]
        self.resizes: dict[int, _Resize] = {}

    def _resize(self, k: int) -> _Resize:
        if k not in self.resizes:
            y0, x0, y1, x1 = self.boxes[k]
            x = self.windows[k]
            self.resizes[k] = _Resize(lambda rows, x=x: _take_rows(x, rows), x.shape[:2], (y1 - y0, x1 - x0),
                                      _band_rows((x1 - x0) * x.shape[2], self.device), x.dtype, self.device)
        return self.resizes[k]

    def rows(self, rows: Rows) -> torch.Tensor:
        c = self.windows.shape[-1]
        total = torch.zeros(len(rows), self.width, c, dtype=self.windows.dtype, device=self.device)
        count = torch.zeros(len(rows), self.width, 1, dtype=self.windows.dtype, device=self.device)
        position = {r: j for j, r in enumerate(rows)}
        for k, (y0, x0, y1, x1) in enumerate(self.boxes):
            if y1 <= rows[0]:
                self.resizes.pop(k, None)  # the bands are past this window
                continue
            inside = [r for r in rows if y0 <= r < y1]
            if not inside:
                continue
            values = self._resize(k).rows(tuple(r - y0 for r in inside))
            if self.softmax:
                values = torch.softmax(values, dim=-1)
            at = [position[r] for r in inside]
            if at[-1] - at[0] + 1 == len(at):
                total[at[0]:at[-1] + 1, x0:x1] += values
                count[at[0]:at[-1] + 1, x0:x1] += 1
            else:
                where = torch.tensor(at, device=self.device)
                total[:, x0:x1].index_add_(0, where, values)
                count[:, x0:x1].index_add_(0, where, torch.ones_like(values[..., :1]))
        if bool((count == 0).any()):
            raise ValueError("slide_decode: the window boxes do not cover the whole canvas")
        return total.div_(count)


def slide_decode(window_logits, boxes, canvas_size, size, softmax: bool):
    """The sliding-window protocol without a full-resolution [C,H,W] map: labels [H,W] int64 and scores [H,W].

    Each window's logits [Nw,C,h,w] are upsampled to its box (y0, x0, y1, x1) on the canvas, softmaxed over classes
    when asked, averaged where windows overlap, then bilinearly resized to `size`. Output rows are produced in bands;
    only the canvas rows the final resize reads are computed (once, or twice at the edge of a kept block)."""
    out_h, out_w = size
    x = _channels_last(window_logits)  # [Nw, h, w, C]
    acc, device, c = x.dtype, x.device, x.shape[-1]
    canvas = _Canvas(x, [tuple(box) for box in boxes.tolist()], canvas_size, softmax, device)
    step = _band_rows(max(canvas_size[1], out_w) * c, device)
    final = _Resize(canvas.rows, canvas_size, size, step, acc, device)
    labels = torch.empty(out_h, out_w, dtype=torch.int64, device=device)
    scores = torch.empty(out_h, out_w, dtype=acc, device=device)
    for rows in _bands(out_h, step):
        r0, n = rows[0], len(rows)
        _argmax_into(final.rows(rows), False, labels[r0:r0 + n], scores[r0:r0 + n], None)
    return labels, scores


add_kernels("torch", "patch_text_logits", {"patch_text_logits": patch_text_logits})
add_kernels("torch", "upsample_argmax", {"upsample_argmax": upsample_argmax})
add_kernels("torch", "slide_decode", {"slide_decode": slide_decode})

"""The contrastive loss's tile driver, shared by every backend: the partial-kernel contract, the host loops over a
backend's tile primitives (`ContrastiveTiles`), the float64 log-sum-exp merges, and the single-process loss built on
the partial pair. Backends differ only in their tiles (reference/contrastive.py: TorchTiles; triton/contrastive.py,
cuda/contrastive.py: `KernelTiles`, whose chunk and panel sizing they share).

Every backend computes the loss from a pair of "partial" kernels: rows (images) against columns (texts), tile by
tile, never holding the [rows, columns] logits. s_ij = exp(logit_scale) * <img_i, txt_j> (of the L2-normalised
rows with `normalize`); the positive of row i is column i + diag_offset.
  partial forward  -> lse_rows [M] (over all N columns), lse_cols [N] (over these M rows only: the distributed
                      path merges the ranks' values), both float64, and diag [M] = s_{i, i+offset} in fp32 (fp64
                      for fp64 inputs). The log-sum-exps are float64 because the backward takes exp(s - lse) for
                      s ~ lse ~ exp(logit_scale) = 14..100, where an fp32 lse would be off by ~1e-6 absolute: that
                      alone is a 1e-5 relative error on dS = P - 1 of a confident positive. Kernels split it into
                      fp32 hi + lo and subtract hi first (exactly, for s near lse).
  partial backward -> d_img [M, E] (img's dtype), g_txt [N, E] (fp32/fp64: the gradient with respect to the
                      NORMALISED columns, so that the ranks' shares can be summed before the normalisation's
                      backward), d_logit_scale; for
                      dS_ij = row_coef_i (P_row_ij - d_ij) + col_coef_j (P_col_ij - d_ij),
                      P_row = exp(s - lse_rows), P_col = exp(s - lse_cols), d_ij = [j == i + offset].
The single-process loss is the pair with M = N, offset 0 and row_coef = col_coef = grad / (2B).

The partial kernels of every backend share one host driver (tiled_partial_forward / tiled_partial_backward) over
a backend's tile primitives (`ContrastiveTiles`):
- forward: a grid of (row chunk, column chunk) programs; each loops over its tiles, keeps the rows' (max, sum of
  exp(s - max)) online and merges the columns' into a per-row-chunk scratch row; a float64 merge over the chunks
  finishes both log-sum-exps.
- backward: columns in panels of bounded size: one kernel recomputes the panel's logits and writes dS (scaled by
  the inverse norms and 1/kappa so that it fits fp16) to a [M, panel] buffer, then two GEMMs accumulate
  d_img += dS @ txt_panel and write g_txt[panel] = dS^T @ img. Deterministic: no atomics, fixed reduction orders.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol

import torch

from .planning import accumulation_dtype, cdiv, round_up


class ContrastiveTiles(Protocol):
    """Tile primitives of one backend; see tiled_partial_forward / tiled_partial_backward for how they compose.

    inv_* / norm_*: per-row 1 / max(||x||, eps) and max(||x||, eps) (ones without normalisation), accumulation dtype.
    Chunks must be multiples of the backend's tile sizes; panels a multiple of the column chunk."""

    def chunks(self, m: int, n: int) -> tuple[int, int]:
        ...

    def panel_columns(self, m: int, n: int, col_chunk: int, dtype: torch.dtype) -> int:
        ...

    def ds_dtype(self, dtype: torch.dtype) -> torch.dtype:
        ...

    def row_norms(self, x, normalize: bool):
        """-> (inv [R], norm [R])."""
        ...

    def forward_tiles(self, img, txt, inv_i, inv_t, logit_scale, offset, row_chunk, col_chunk, row_max, row_sum,
                      col_max, col_sum, diag):
        """Fill row_max / row_sum [n_col_chunks, M] (each row's max and sum of exp(s - max) over one column chunk),
        col_max / col_sum [n_row_chunks, N] (the same for each column over one row chunk) and diag [M]."""
        ...

    def ds_tiles(self, img, txt, inv_i, inv_t, logit_scale, lse_rows, lse_cols, row_coef, col_coef, inv_kappa, offset,
                 col_begin, col_end, row_chunk, col_chunk, ds, ds_dot_s):
        """For columns [col_begin, col_end): ds[:, j - col_begin] = dS_ij inv_i_i inv_t_j inv_kappa (ds.dtype) and
        ds_dot_s[row chunk, column chunk] = sum of dS_ij s_ij over the chunk pair (global column chunk index);
        lse_rows / lse_cols are float64."""
        ...

    def gemm(self, a, b, c, alpha, row_scale, accumulate: bool):
        """c (+)= alpha * row_scale[:, None] * (a @ b); c in the accumulation dtype; a and b may be strided views."""
        ...

    def normalize_backward(self, g, x, normalize: bool):
        """Gradient w.r.t. x (x's dtype) of x / max(||x||, eps), given g = the gradient w.r.t. that; g.to(x.dtype)
        without normalisation."""
        ...


class KernelTiles(ContrastiveTiles):
    """The chunk and panel sizing of the GPU kernels' tiles (Triton and CUDA): square chunks of `chunk_unit`
    multiples, about `target_blocks` (row chunk, column chunk) programs for big problems, a dS panel of
    `panel_bytes` stored in the input dtype; subclasses provide the kernels."""

    def __init__(self, chunk_unit: int, target_blocks: int, panel_bytes: int):
        self.chunk_unit, self.target_blocks, self.panel_bytes = chunk_unit, target_blocks, panel_bytes

    def chunks(self, m, n):
        unit = self.chunk_unit
        side = max(unit, round(math.sqrt(m * n / self.target_blocks) / unit) * unit)
        return min(side, round_up(m, unit)), min(side, round_up(n, unit))

    def panel_columns(self, m, n, col_chunk, dtype):
        columns = self.panel_bytes // (max(1, m) * torch.finfo(dtype).bits // 8)
        return max(col_chunk, columns // col_chunk * col_chunk)

    def ds_dtype(self, dtype):
        return dtype


def unit_norms(x: torch.Tensor, dtype: torch.dtype = torch.float32):
    """row_norms without normalisation: (ones [R], ones [R])."""
    ones = torch.ones(x.shape[0], dtype=dtype, device=x.device)
    return ones, ones


def check_partial(img, txt, diag_offset: int) -> None:
    if not 0 <= diag_offset <= txt.shape[0] - img.shape[0]:
        raise ValueError(f"contrastive partial kernels: diag_offset {diag_offset} must place the positives of the "
                         f"{img.shape[0]} rows inside the {txt.shape[0]} columns")


def merge_lse(maxes, sums):
    """log(sum_k sums[k] * exp(maxes[k])) over dim 0, in float64. Every entry has a finite max in every chunk."""
    maxes = maxes.to(torch.float64)
    top = maxes.max(dim=0).values
    return top + (sums.to(torch.float64) * torch.exp(maxes - top)).sum(dim=0).log()


def split_lse(lse, dtype: torch.dtype):
    """(hi, lo) in `dtype` with hi + lo = lse (float64): exp(s - lse) is then computed as exp((s - hi) - lo)."""
    hi = lse.to(dtype)
    return hi, (lse - hi.to(torch.float64)).to(dtype)


def tiled_partial_forward(tiles: ContrastiveTiles, img, txt, logit_scale, normalize: bool, diag_offset: int):
    """The partial forward (see above) of any backend, from its tile primitives."""
    check_partial(img, txt, diag_offset)
    m, n = img.shape[0], txt.shape[0]
    acc = accumulation_dtype(img.dtype)
    inv_i, _ = tiles.row_norms(img, normalize)
    inv_t, _ = tiles.row_norms(txt, normalize)
    row_chunk, col_chunk = tiles.chunks(m, n)
    row_max = img.new_empty((cdiv(n, col_chunk), m), dtype=acc)
    row_sum = torch.empty_like(row_max)
    col_max = img.new_empty((cdiv(m, row_chunk), n), dtype=acc)
    col_sum = torch.empty_like(col_max)
    diag = img.new_empty((m,), dtype=acc)
    tiles.forward_tiles(img, txt, inv_i, inv_t, logit_scale, diag_offset, row_chunk, col_chunk, row_max, row_sum,
                        col_max, col_sum, diag)
    return merge_lse(row_max, row_sum), merge_lse(col_max, col_sum), diag


def tiled_partial_backward(tiles: ContrastiveTiles, img, txt, logit_scale, lse_rows, lse_cols, row_coef, col_coef,
                           normalize: bool, diag_offset: int):
    """The partial backward (see above) of any backend, from its tile primitives."""
    check_partial(img, txt, diag_offset)
    m, n = img.shape[0], txt.shape[0]
    acc = accumulation_dtype(img.dtype)
    inv_i, norm_i = tiles.row_norms(img, normalize)
    inv_t, norm_t = tiles.row_norms(txt, normalize)
    row_coef, col_coef = row_coef.to(acc).contiguous(), col_coef.to(acc).contiguous()
    # dS is stored as dS * inv_i * inv_t / kappa, at most 2 in magnitude: no fp16 overflow, and no underflow from
    # the 1 / 2B of big batches (only rows whose norms are orders of magnitude above the batch's smallest reach
    # fp16's subnormals). The GEMMs multiply kappa back (alpha) with the norms (row scales).
    kappa = (torch.maximum(row_coef.abs().max(), col_coef.abs().max()) * inv_i.max() * inv_t.max()).reshape(1)
    kappa = torch.where(kappa > 0, kappa, torch.ones_like(kappa))
    alpha = logit_scale.detach().to(acc).reshape(1).exp() * kappa
    row_chunk, col_chunk = tiles.chunks(m, n)
    panel = min(tiles.panel_columns(m, n, col_chunk, tiles.ds_dtype(img.dtype)), cdiv(n, col_chunk) * col_chunk)
    ds = img.new_empty((m, min(panel, n)), dtype=tiles.ds_dtype(img.dtype))
    ds_dot_s = img.new_empty((cdiv(m, row_chunk), cdiv(n, col_chunk)), dtype=acc)
    g_img = img.new_empty(img.shape, dtype=acc)
    g_txt = img.new_empty(txt.shape, dtype=acc)
    for begin in range(0, n, panel):
        end = min(begin + panel, n)
        ds_panel = ds[:, :end - begin]
        tiles.ds_tiles(img, txt, inv_i, inv_t, logit_scale, lse_rows, lse_cols, row_coef, col_coef, 1.0 / kappa,
                       diag_offset, begin, end, row_chunk, col_chunk, ds_panel, ds_dot_s)
        tiles.gemm(ds_panel, txt[begin:end], g_img, alpha, norm_i, accumulate=begin > 0)
        tiles.gemm(ds_panel.T, img, g_txt[begin:end], alpha, norm_t[begin:end], accumulate=False)
    d_img = tiles.normalize_backward(g_img, img, normalize)
    d_scale = ds_dot_s.sum().reshape(logit_scale.shape).to(logit_scale.dtype)
    return d_img, g_txt, d_scale


def single_forward(partial_forward, img, txt, logit_scale, normalize: bool):
    """The single-process op contract (loss, lse_rows, lse_cols) from a backend's partial forward."""
    lse_rows, lse_cols, diag = partial_forward(img, txt, logit_scale, normalize, 0)
    loss = 0.5 * ((lse_rows - diag).mean() + (lse_cols - diag).mean())
    return loss.to(diag.dtype), lse_rows, lse_cols


def single_backward(partial_backward, normalize_backward, grad_loss, img, txt, logit_scale, lse_rows, lse_cols,
                    normalize: bool):
    """(d_img, d_txt, d_logit_scale) of the single-process loss: dS = g / (2B) * (P_row + P_col - 2I)."""
    b = img.shape[0]
    coef = (grad_loss.detach().to(accumulation_dtype(img.dtype)).reshape(1) * (0.5 / b)).expand(b).contiguous()
    d_img, g_txt, d_scale = partial_backward(img, txt, logit_scale, lse_rows, lse_cols, coef, coef, normalize, 0)
    return d_img, normalize_backward(g_txt, txt, normalize), d_scale



# Why the Triton and CUDA tiles refuse fp16 (the reference tiles store dS in fp32 and take it).
TILED_FP16_REASON = ("fp16 is not taken: the backward stores dS pre-scaled by the batch's largest inverse norms, "
                     "and one near-zero feature row would underflow every other row's dS in fp16's range; use bf16 "
                     "or fp32")


def tiled_dtype_problem(kernels: str, dtype: torch.dtype) -> Optional[str]:
    """Why the `kernels` ("Triton", "CUDA") contrastive tiles cannot take `dtype` (they take bf16 and fp32), or None:
    the dispatch's supports check of both kernel backends."""
    if dtype == torch.float16:
        return f"the {kernels} contrastive kernels: {TILED_FP16_REASON}"
    if dtype not in (torch.bfloat16, torch.float32):
        return (f"the {kernels} contrastive kernels take float32 or bfloat16, got {dtype} "
                "(use backend='torch' for float64)")
    return None


def tiled_kernels(tiles: ContrastiveTiles) -> dict:
    """The contrastive family's four kernels (dispatch.FAMILIES["contrastive_loss"]) for a backend that provides
    the tile primitives: every backend shares this host driver, only the tiles differ."""

    def contrastive_partial_forward(img, txt, logit_scale, normalize: bool, diag_offset: int):
        """(lse_rows [M], partial lse_cols [N] (float64), diag [M]) of rows img [M, E] against columns txt [N, E]."""
        return tiled_partial_forward(tiles, img, txt, logit_scale, normalize, diag_offset)

    def contrastive_partial_backward(img, txt, logit_scale, lse_rows, lse_cols, row_coef, col_coef, normalize: bool,
                                     diag_offset: int):
        """(d_img [M, E], g_txt [N, E] w.r.t. the normalised columns, d_logit_scale); see the section comment."""
        return tiled_partial_backward(tiles, img, txt, logit_scale, lse_rows, lse_cols, row_coef, col_coef,
                                      normalize, diag_offset)

    def contrastive_forward(img, txt, logit_scale, normalize: bool):
        """Symmetric InfoNCE: (loss 0-d, lse_rows [B], lse_cols [B]) in fp32 (fp64 for fp64 inputs)."""
        return single_forward(contrastive_partial_forward, img, txt, logit_scale, normalize)

    def contrastive_backward(grad_loss, img, txt, logit_scale, lse_rows, lse_cols, normalize: bool):
        """(d_img, d_txt, d_logit_scale): dLogits = g / (2B) * (softmax_rows + softmax_cols - 2I)."""
        return single_backward(contrastive_partial_backward, tiles.normalize_backward, grad_loss, img, txt,
                               logit_scale, lse_rows, lse_cols, normalize)

    return {"contrastive_forward": contrastive_forward, "contrastive_backward": contrastive_backward,
            "contrastive_partial_forward": contrastive_partial_forward,
            "contrastive_partial_backward": contrastive_partial_backward}

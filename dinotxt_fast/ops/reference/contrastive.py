"""Reference contrastive loss (the "torch" backend's contrastive_loss family): the shared tile driver
(contrastive_tiles.py) over tiles computed in PyTorch, in chunks of up to common.CHUNK_ELEMENTS logits."""
from __future__ import annotations

import torch

from ..contrastive_tiles import ContrastiveTiles, split_lse, tiled_kernels, unit_norms
from ..dispatch import add_kernels
from ..planning import NORM_EPS, accumulation_dtype
from . import common


def contrastive_normalize_backward(g, x, normalize: bool):
    """d/dx of x / max(||x||, eps) applied to g (the gradient w.r.t. the normalised rows) -> x's dtype."""
    if not normalize:
        return g.to(x.dtype)
    acc = accumulation_dtype(x.dtype)
    y, norm = common.normalized(x.to(acc), True)
    return common.normalize_backward(g.to(acc), y, norm).to(x.dtype)


class TorchTiles(ContrastiveTiles):
    """The tile primitives in PyTorch: chunks of up to common.CHUNK_ELEMENTS logits, in fp32 (fp64 for fp64)."""

    def chunks(self, m, n):
        return m, max(1, min(n, common.CHUNK_ELEMENTS // max(1, m)))

    def panel_columns(self, m, n, col_chunk, dtype):
        return col_chunk

    def ds_dtype(self, dtype):
        return accumulation_dtype(dtype)

    def row_norms(self, x, normalize):
        acc = accumulation_dtype(x.dtype)
        if not normalize:
            return unit_norms(x, acc)
        norm = torch.linalg.vector_norm(x.to(acc), dim=1).clamp_min(NORM_EPS)
        return 1.0 / norm, norm

    @staticmethod
    def _logits(img, txt, inv_i, inv_t, logit_scale, rows: slice, cols: slice):
        acc = inv_i.dtype
        scaled = img[rows].to(acc) * (inv_i[rows] * logit_scale.detach().to(acc).reshape(()).exp())[:, None]
        return scaled @ (txt[cols].to(acc) * inv_t[cols, None]).T

    @staticmethod
    def _diagonal(rows: slice, cols: slice, offset: int, device):
        """(i, j) local indices of the positives (i, i + offset) inside the block rows x cols."""
        i = torch.arange(rows.start, rows.stop, device=device)
        inside = (i + offset >= cols.start) & (i + offset < cols.stop)
        return i[inside] - rows.start, i[inside] + offset - cols.start

    def forward_tiles(self, img, txt, inv_i, inv_t, logit_scale, offset, row_chunk, col_chunk, row_max, row_sum,
                      col_max, col_sum, diag):
        m, n = img.shape[0], txt.shape[0]
        for a, r0 in enumerate(range(0, m, row_chunk)):
            rows = slice(r0, min(r0 + row_chunk, m))
            for b, c0 in enumerate(range(0, n, col_chunk)):
                cols = slice(c0, min(c0 + col_chunk, n))
                s = self._logits(img, txt, inv_i, inv_t, logit_scale, rows, cols)
                top = s.max(dim=1).values
                row_max[b, rows], row_sum[b, rows] = top, torch.exp(s - top[:, None]).sum(dim=1)
                top = s.max(dim=0).values
                col_max[a, cols], col_sum[a, cols] = top, torch.exp(s - top).sum(dim=0)
                i, j = self._diagonal(rows, cols, offset, s.device)
                diag[i + r0] = s[i, j]

    def ds_tiles(self, img, txt, inv_i, inv_t, logit_scale, lse_rows, lse_cols, row_coef, col_coef, inv_kappa, offset,
                 col_begin, col_end, row_chunk, col_chunk, ds, ds_dot_s):
        m = img.shape[0]
        (row_hi, row_lo), (col_hi, col_lo) = split_lse(lse_rows, inv_i.dtype), split_lse(lse_cols, inv_i.dtype)
        for a, r0 in enumerate(range(0, m, row_chunk)):
            rows = slice(r0, min(r0 + row_chunk, m))
            for c0 in range(col_begin, col_end, col_chunk):
                cols = slice(c0, min(c0 + col_chunk, col_end))
                s = self._logits(img, txt, inv_i, inv_t, logit_scale, rows, cols)
                d = (row_coef[rows, None] * torch.exp((s - row_hi[rows, None]) - row_lo[rows, None])
                     + col_coef[None, cols] * torch.exp((s - col_hi[None, cols]) - col_lo[None, cols]))
                i, j = self._diagonal(rows, cols, offset, s.device)
                d[i, j] -= row_coef[i + r0] + col_coef[j + c0]
                ds_dot_s[a, c0 // col_chunk] = (d * s).sum()
                ds[rows, c0 - col_begin:cols.stop - col_begin] = d * inv_i[rows, None] * inv_t[None, cols] * inv_kappa

    def gemm(self, a, b, c, alpha, row_scale, accumulate):
        out = (a.to(c.dtype) @ b.to(c.dtype)) * (alpha * row_scale[:, None])
        if accumulate:
            c += out
        else:
            c.copy_(out)

    def normalize_backward(self, g, x, normalize):
        return contrastive_normalize_backward(g, x, normalize)


TORCH_TILES = TorchTiles()


KERNELS = tiled_kernels(TORCH_TILES)
add_kernels("torch", "contrastive_loss", KERNELS)

"""Reference contrastive loss (the "torch" backend's contrastive_loss family): the shared tile driver
(contrastive_tiles.py) over tiles computed in PyTorch, of at most common.chunk_elements logits each (all rows by a
few hundred columns at B = 8192 on a CPU), so that memory is O(B) and every tile's passes stay in cache.

Each tile is one matrix product of the raw features with the inverse norms and exp(logit_scale) applied to the
product (never a scaled copy of the features per tile), then in-place passes over a few reused tile buffers."""
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


def _normalize_backward_into(g, x):
    """contrastive_normalize_backward(g, x, True) computed in g's memory (g: a driver temporary in the accumulation
    dtype): g / n - x (g . x) / n^3 with n = max(||x||, eps), and g / eps where the norm is clamped."""
    xf = x.to(g.dtype)
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    inv = norm.clamp_min(NORM_EPS).reciprocal_()
    dot = torch.bmm(g[:, None, :], xf[:, :, None])[:, 0]  # [B, 1] row dot products, no [B, E] temporary
    coef = (dot * inv.pow(3)).masked_fill_(norm <= NORM_EPS, 0.0)
    return g.mul_(inv).addcmul_(xf, coef, value=-1).to(x.dtype)


class TorchTiles(ContrastiveTiles):
    """The tile primitives in PyTorch, in fp32 (fp64 for fp64), tiles of at most common.chunk_elements(device)
    logits: one instance per kind of device (`cpu`), since the driver asks for chunk sizes before any tensor."""

    def __init__(self, cpu: bool):
        self.device = torch.device("cpu") if cpu else torch.device("cuda")

    def chunks(self, m, n):
        budget = common.chunk_elements(self.device)
        rows = min(m, budget)
        return rows, max(1, min(n, budget // rows))

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
    def _logits(img, txt, row_scale, inv_t, rows: slice, cols: slice, out):
        """s = (img[rows] @ txt[cols].T) * row_scale[rows, None] * inv_t[None, cols], into `out`."""
        acc = row_scale.dtype
        s = torch.mm(img[rows].to(acc), txt[cols].to(acc).T, out=out)
        return s.mul_(row_scale[rows, None]).mul_(inv_t[None, cols])

    @staticmethod
    def _diagonal(rows: slice, cols: slice, offset: int, device):
        """(i, j) local indices of the positives (i, i + offset) inside the block rows x cols."""
        i = torch.arange(rows.start, rows.stop, device=device)
        inside = (i + offset >= cols.start) & (i + offset < cols.stop)
        return i[inside] - rows.start, i[inside] + offset - cols.start

    @staticmethod
    def _buffers(count: int, row_chunk: int, col_chunk: int, like):
        return [like.new_empty((row_chunk * col_chunk,)) for _ in range(count)]

    @staticmethod
    def _tile(buffer, rows: slice, cols: slice):
        return buffer[:(rows.stop - rows.start) * (cols.stop - cols.start)].view(rows.stop - rows.start, -1)

    def forward_tiles(self, img, txt, inv_i, inv_t, logit_scale, offset, row_chunk, col_chunk, row_max, row_sum,
                      col_max, col_sum, diag):
        m, n = img.shape[0], txt.shape[0]
        row_scale = inv_i * logit_scale.detach().to(inv_i.dtype).reshape(()).exp()
        s_buf, e_buf = self._buffers(2, row_chunk, col_chunk, inv_i)
        for a, r0 in enumerate(range(0, m, row_chunk)):
            rows = slice(r0, min(r0 + row_chunk, m))
            for b, c0 in enumerate(range(0, n, col_chunk)):
                cols = slice(c0, min(c0 + col_chunk, n))
                s = self._logits(img, txt, row_scale, inv_t, rows, cols, self._tile(s_buf, rows, cols))
                e = self._tile(e_buf, rows, cols)
                top = torch.amax(s, dim=1, out=row_max[b, rows])
                torch.sum(torch.sub(s, top[:, None], out=e).exp_(), dim=1, out=row_sum[b, rows])
                top = torch.amax(s, dim=0, out=col_max[a, cols])
                torch.sum(torch.sub(s, top, out=e).exp_(), dim=0, out=col_sum[a, cols])
                i, j = self._diagonal(rows, cols, offset, s.device)
                diag[i + r0] = s[i, j]

    def ds_tiles(self, img, txt, inv_i, inv_t, logit_scale, lse_rows, lse_cols, row_coef, col_coef, inv_kappa, offset,
                 col_begin, col_end, row_chunk, col_chunk, ds, ds_dot_s):
        m, acc = img.shape[0], inv_i.dtype
        row_scale = inv_i * logit_scale.detach().to(acc).reshape(()).exp()
        # coef * exp((s - hi) - lo) = exp(s - hi) * (coef * exp(-lo)): the float64 lse split into hi + lo, hi
        # subtracted exactly (s is near hi where the term matters), lo folded into the per-row / per-column factor.
        (row_hi, row_lo), (col_hi, col_lo) = split_lse(lse_rows, acc), split_lse(lse_cols, acc)
        row_factor, col_factor = row_coef * torch.exp(-row_lo), col_coef * torch.exp(-col_lo)
        ds_row_scale = inv_i * inv_kappa
        s_buf, d_buf, e_buf = self._buffers(3, row_chunk, col_chunk, inv_i)
        for a, r0 in enumerate(range(0, m, row_chunk)):
            rows = slice(r0, min(r0 + row_chunk, m))
            for c0 in range(col_begin, col_end, col_chunk):
                cols = slice(c0, min(c0 + col_chunk, col_end))
                s = self._logits(img, txt, row_scale, inv_t, rows, cols, self._tile(s_buf, rows, cols))
                d = torch.sub(s, row_hi[rows, None], out=self._tile(d_buf, rows, cols)).exp_()
                d.mul_(row_factor[rows, None])
                e = torch.sub(s, col_hi[None, cols], out=self._tile(e_buf, rows, cols)).exp_()
                d.addcmul_(e, col_factor[None, cols])
                i, j = self._diagonal(rows, cols, offset, s.device)
                d[i, j] -= row_coef[i + r0] + col_coef[j + c0]
                ds_dot_s[a, c0 // col_chunk] = torch.mul(d, s, out=e).sum()
                out = ds[rows, c0 - col_begin:cols.stop - col_begin]
                torch.mul(d, ds_row_scale[rows, None], out=out).mul_(inv_t[None, cols])

    def gemm(self, a, b, c, alpha, row_scale, accumulate):
        scale = (alpha * row_scale).to(c.dtype)[:, None]
        if accumulate:  # the row scale goes on a's rows (a panel, smaller than c): c += (scale * a) @ b in place
            c.addmm_(a.to(c.dtype) * scale, b.to(c.dtype))
        else:
            torch.mm(a.to(c.dtype), b.to(c.dtype), out=c).mul_(scale)

    def normalize_backward(self, g, x, normalize):
        if normalize and g.dtype == accumulation_dtype(x.dtype):
            return _normalize_backward_into(g, x)  # g is the driver's own temporary
        return contrastive_normalize_backward(g, x, normalize)


_CPU_KERNELS = tiled_kernels(TorchTiles(cpu=True))
_OTHER_KERNELS = tiled_kernels(TorchTiles(cpu=False))


def _by_device(name: str):
    def kernel(img, *args):
        return (_CPU_KERNELS if img.device.type == "cpu" else _OTHER_KERNELS)[name](img, *args)
    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = _CPU_KERNELS[name].__doc__
    return kernel


KERNELS = {name: _by_device(name) for name in _CPU_KERNELS}
add_kernels("torch", "contrastive_loss", KERNELS)

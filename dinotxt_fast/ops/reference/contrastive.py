"""Reference contrastive loss (the "torch" backend's contrastive_loss family): the shared tile driver
(contrastive_tiles.py) over tiles computed in PyTorch, of at most common.chunk_elements logits each (all rows by a
few hundred columns at B = 8192 on a CPU), so that memory is O(B) and every tile's passes stay in cache.

Each tile is one matrix product of the raw features with the inverse norms and exp(logit_scale) applied to the
product (never a scaled copy of the features per tile), then in-place passes over a few reused tile buffers.

A small problem (at most DIRECT_ELEMENTS = 256 x 256 logits: the embedded trainer's B = 64) takes the direct path
instead: whole-matrix ops with fused log-softmaxes and softmaxes in place of the driver's per-tile Python, chunk
bookkeeping, split log-sum-exps and float64 merges. At B = 64 the driver's ~120 small ops, not the arithmetic,
were the cost (2.8x the naive expression on one CPU thread); the direct path runs ~60."""
from __future__ import annotations

import torch

from ..contrastive_tiles import ContrastiveTiles, check_partial, split_lse, tiled_kernels, unit_norms
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


# ----------------------------------------------------------------------------------------- the direct path
# Logits of the problems the direct path takes: 256 x 256, so that its float64 temporaries (0.5 MB each) stay far
# below any tile and the naive expression's own [B, B] buffers. Read at call time (tests move it).
DIRECT_ELEMENTS = 1 << 16


def takes_direct_path(img, txt) -> bool:
    """Whether the [M, N] logits are small enough for the direct path (and would be one tile of the driver)."""
    logits = img.shape[0] * txt.shape[0]
    return logits <= DIRECT_ELEMENTS and logits <= common.chunk_elements(img.device)


class _Direct:
    """A small problem's features in the accumulation dtype: the unit rows x_hat, y_hat (the rows themselves
    without normalisation), their inverse norms and clamped norms [R, 1] (None without normalisation), and the
    logits s = exp(logit_scale) x_hat y_hat^T; the scaled copies cost nothing at these sizes and serve the backward's
    products too. (One [M + N, E] normalisation for both measured slower: mm into row slices of one buffer.)"""

    def __init__(self, img, txt, logit_scale, normalize: bool):
        acc = accumulation_dtype(img.dtype)
        self.scale = logit_scale.to(acc).exp()
        (self.x_hat, self.inv_x, self.norm_x), (self.y_hat, self.inv_y, self.norm_y) = (
            self._unit_rows(img.to(acc), normalize), self._unit_rows(txt.to(acc), normalize))
        self.s = torch.mm(self.x_hat, self.y_hat.T).mul_(self.scale)

    @staticmethod
    def _unit_rows(x, normalize: bool):
        if not normalize:
            return x, None, None
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(NORM_EPS)
        inv = norm.reciprocal()
        return x * inv, inv, norm

    def gradients(self, ds):
        """(d img, d txt) from ds = dL/ds * exp(logit_scale): d/d x_hat = ds y_hat, d/d y_hat = ds^T x_hat, each
        through its normalisation."""
        g_img, g_txt = self.partial_gradients(ds)
        return g_img, _normalize_backward_given(g_txt, self.y_hat, self.inv_y, self.norm_y)

    def partial_gradients(self, ds):
        """(d img, g_txt w.r.t. y_hat) from ds as in gradients: the partial backward's contract."""
        g_img, g_txt = torch.mm(ds, self.y_hat), torch.mm(ds.T, self.x_hat)
        return _normalize_backward_given(g_img, self.x_hat, self.inv_x, self.norm_x), g_txt


def _normalize_backward_given(g, y, inv, norm):
    """d x of y = x / max(||x||, eps) given g = d y, y and the clamped norms [R, 1], in g's memory:
    (g - y (g . y)) / n, and g / eps where the norm is clamped (the projection term vanishes there, y = x / eps
    being linear in x); g itself without normalisation (inv None)."""
    if inv is None:
        return g
    dot = (g * y).sum(1, keepdim=True).masked_fill_(norm <= NORM_EPS, 0.0)
    return g.addcmul_(y, dot, value=-1).mul_(inv)


def _log_softmaxes(s):
    """(log_softmax over the rows, over the columns) of the float64 logits: one fused op each; the log-sum-exps are
    s - log_softmax at any entry (exact to float64: both terms are within a few |s| of each other)."""
    s64 = s.to(torch.float64)
    return s64, torch.log_softmax(s64, 1), torch.log_softmax(s64, 0)


def direct_forward(img, txt, logit_scale, normalize: bool):
    """contrastive_forward of a small problem, in float64 from the logits (where the tiles' fp32 max and fp32 sum
    of exponentials are exact to fp32 in the sum): loss = -(mean log P_row(ii) + mean log P_col(ii)) / 2."""
    s = _Direct(img, txt, logit_scale, normalize).s
    s64, log_rows, log_cols = _log_softmaxes(s)
    on_rows, on_cols, positives = log_rows.diagonal(), log_cols.diagonal(), s64.diagonal()
    loss = torch.add(on_rows, on_cols).mean().mul_(-0.5)
    return loss.to(s.dtype), positives - on_rows, positives - on_cols


def direct_backward(grad_loss, img, txt, logit_scale, lse_rows, lse_cols, normalize: bool):
    """contrastive_backward of a small problem: dS = g / (2B) (softmax_rows + softmax_cols - 2I). The two softmaxes
    are recomputed from s (two fused ops, the same values as exp(s - lse) of the saved log-sum-exps, which the
    distributed path's partial backward must use: there lse_cols spans every rank)."""
    problem = _Direct(img, txt, logit_scale, normalize)
    s = problem.s
    ds = torch.softmax(s, 1).add_(torch.softmax(s, 0))
    ds.diagonal().sub_(2.0)
    coef = grad_loss.to(s.dtype) * (0.5 / img.shape[0])
    d_scale = (torch.vdot(ds.view(-1), s.view(-1)) * coef).reshape(logit_scale.shape).to(logit_scale.dtype)
    d_img, d_txt = problem.gradients(ds.mul_(coef * problem.scale))
    return d_img.to(img.dtype), d_txt.to(txt.dtype), d_scale


def direct_partial_forward(img, txt, logit_scale, normalize: bool, diag_offset: int):
    """contrastive_partial_forward of a small problem (float64 log-sum-exps as direct_forward)."""
    check_partial(img, txt, diag_offset)
    s = _Direct(img, txt, logit_scale, normalize).s
    s64, log_rows, log_cols = _log_softmaxes(s)
    return s64[:, 0] - log_rows[:, 0], s64[0] - log_cols[0], s.diagonal(diag_offset).clone()


def direct_partial_backward(img, txt, logit_scale, lse_rows, lse_cols, row_coef, col_coef, normalize: bool,
                            diag_offset: int):
    """contrastive_partial_backward of a small problem: dS = row_coef P_row + col_coef P_col - (row_coef +
    col_coef) on the positives, in float64 from the given float64 log-sum-exps (s ~ lse ~ exp(logit_scale): no
    hi + lo split needed in float64), rounded once to the accumulation dtype."""
    check_partial(img, txt, diag_offset)
    problem = _Direct(img, txt, logit_scale, normalize)
    s64 = problem.s.to(torch.float64)
    row_coef, col_coef = row_coef.to(torch.float64), col_coef.to(torch.float64)
    ds = torch.sub(s64, lse_rows[:, None]).exp_().mul_(row_coef[:, None])
    ds.addcmul_(torch.sub(s64, lse_cols).exp_(), col_coef)
    ds.diagonal(diag_offset).sub_(row_coef + col_coef[diag_offset:diag_offset + img.shape[0]])
    d_scale = torch.vdot(ds.view(-1), s64.view(-1)).reshape(logit_scale.shape).to(logit_scale.dtype)
    d_img, g_txt = problem.partial_gradients(ds.to(problem.s.dtype).mul_(problem.scale))
    return d_img.to(img.dtype), g_txt, d_scale


_DIRECT_KERNELS = {"contrastive_forward": direct_forward, "contrastive_backward": direct_backward,
                   "contrastive_partial_forward": direct_partial_forward,
                   "contrastive_partial_backward": direct_partial_backward}
_CPU_KERNELS = tiled_kernels(TorchTiles(cpu=True))
_OTHER_KERNELS = tiled_kernels(TorchTiles(cpu=False))


def _by_problem(name: str):
    """The kernel `name`: the direct path for small problems, else the tile driver (per kind of device)."""
    def kernel(*args):
        img, txt = (args[1], args[2]) if name == "contrastive_backward" else (args[0], args[1])
        if takes_direct_path(img, txt):
            return _DIRECT_KERNELS[name](*args)
        return (_CPU_KERNELS if img.device.type == "cpu" else _OTHER_KERNELS)[name](*args)
    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = _CPU_KERNELS[name].__doc__
    return kernel


KERNELS = {name: _by_problem(name) for name in _CPU_KERNELS}
add_kernels("torch", "contrastive_loss", KERNELS)

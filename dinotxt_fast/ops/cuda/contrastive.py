"""CUDA contrastive loss (dinotxt_fast._C.contrastive_*): the tile primitives of contrastive_tiles.ContrastiveTiles,
so the partial kernels and the single-process loss follow exactly the contract (and host driver) of the torch and
Triton backends. See csrc/contrastive/contrastive.h for the kernels."""
from __future__ import annotations

import torch

from ... import _ext
from ..contrastive_tiles import KernelTiles, tiled_dtype_problem, tiled_kernels, unit_norms
from ..dispatch import add_kernels
from ..planning import cdiv, ds_parts, fill_target, fold_ds_partials
from . import require_extension

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
TILE = 64  # csrc/contrastive: kTile
# About this many (row chunk, column chunk) blocks for big problems (see the Triton module for the trade-off).
TARGET_BLOCKS = 2048
PANEL_BYTES = 64 << 20  # the backward's dS panel buffer
# Every output is allocated through this, so that tests can poison it (NaN).
_empty = torch.empty


def _extension():
    return require_extension("contrastive")


def _dtype_name(t: torch.Tensor) -> str:
    try:
        return _DTYPE_NAMES[t.dtype]
    except KeyError:
        raise TypeError(f"contrastive_loss (cuda): expected float32, float16 or bfloat16, got {t.dtype}") from None


def _rows(t: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """t with unit stride along the last dimension (the kernels' layout), after device checks."""
    if t.device != device:
        raise ValueError(f"contrastive_loss (cuda): {name} is on {t.device}, expected {device}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _vector(t: torch.Tensor, name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A contiguous vector on `device` (statistics, coefficients and scalars are read as fp32 arrays; the
    log-sum-exps as float64)."""
    if t.device != device:
        raise ValueError(f"contrastive_loss (cuda): {name} is on {t.device}, expected {device}")
    return t.detach().reshape(-1).to(dtype).contiguous()


class CudaTiles(KernelTiles):
    def row_norms(self, x, normalize):
        if not normalize:
            return unit_norms(x)
        x = _rows(x, "x", x.device)
        rows, dim = x.shape
        inv = _empty(rows, dtype=torch.float32, device=x.device)
        norm = _empty(rows, dtype=torch.float32, device=x.device)
        with torch.cuda.device(x.device):
            _extension().contrastive_row_norms(_dtype_name(x), x.data_ptr(), rows, dim, x.stride(0), inv.data_ptr(),
                                               norm.data_ptr(), _ext.current_stream_ptr(x.device))
        return inv, norm

    def forward_tiles(self, img, txt, inv_i, inv_t, logit_scale, offset, row_chunk, col_chunk, row_max, row_sum,
                      col_max, col_sum, diag):
        device = img.device
        img, txt = _rows(img, "img", device), _rows(txt, "txt", device)
        if txt.dtype != img.dtype:
            raise TypeError(f"contrastive_loss (cuda): txt has dtype {txt.dtype} but img has {img.dtype}")
        (m, dim), n = img.shape, txt.shape[0]
        log_scale = _vector(logit_scale, "logit_scale", device)
        with torch.cuda.device(device):
            _extension().contrastive_forward_tiles(
                _dtype_name(img), img.data_ptr(), txt.data_ptr(), inv_i.data_ptr(), inv_t.data_ptr(),
                log_scale.data_ptr(), row_max.data_ptr(), row_sum.data_ptr(), col_max.data_ptr(), col_sum.data_ptr(),
                diag.data_ptr(), m, n, dim, offset, img.stride(0), txt.stride(0), row_chunk, col_chunk,
                _ext.current_stream_ptr(device))

    def ds_tiles(self, img, txt, inv_i, inv_t, logit_scale, lse_rows, lse_cols, row_coef, col_coef, inv_kappa, offset,
                 col_begin, col_end, row_chunk, col_chunk, ds, ds_dot_s):
        device = img.device
        img, txt = _rows(img, "img", device), _rows(txt, "txt", device)
        if ds.stride(1) != 1 or ds.dtype != img.dtype:
            raise ValueError(f"contrastive_loss (cuda): the dS panel must be {img.dtype} with unit column stride")
        (m, dim), n = img.shape, txt.shape[0]
        log_scale, coef_r, coef_c, ik = (_vector(t, name, device) for t, name in (
            (logit_scale, "logit_scale"), (row_coef, "row_coef"), (col_coef, "col_coef"), (inv_kappa, "inv_kappa")))
        lse_r, lse_c = (_vector(t, name, device, torch.float64) for t, name in ((lse_rows, "lse_rows"),
                                                                               (lse_cols, "lse_cols")))
        # Enough blocks to fill the GPU: each chunk pair cut into parts, their partial sums folded per chunk after.
        row_chunks, panel_chunks = cdiv(m, row_chunk), cdiv(col_end - col_begin, col_chunk)
        row_parts, col_parts = ds_parts(row_chunks, panel_chunks, row_chunk, col_chunk, TILE, fill_target(device))
        first, split = col_begin // col_chunk, row_parts * col_parts > 1
        partials = torch.zeros(row_chunks * row_parts, panel_chunks * col_parts, dtype=torch.float32,
                               device=device) if split else ds_dot_s[:, first:]
        with torch.cuda.device(device):
            _extension().contrastive_ds_tiles(
                _dtype_name(img), img.data_ptr(), txt.data_ptr(), inv_i.data_ptr(), inv_t.data_ptr(),
                log_scale.data_ptr(), lse_r.data_ptr(), lse_c.data_ptr(), coef_r.data_ptr(), coef_c.data_ptr(),
                ik.data_ptr(), ds.data_ptr(), partials.data_ptr(), m, n, dim, offset, img.stride(0), txt.stride(0),
                ds.stride(0), col_begin, col_end, row_chunk // row_parts, col_chunk // col_parts, partials.stride(0),
                _ext.current_stream_ptr(device))
        if split:
            fold_ds_partials(partials, ds_dot_s, first, row_parts, col_parts)

    def gemm(self, a, b, c, alpha, row_scale, accumulate):
        device = c.device
        if a.dtype != b.dtype or a.device != device or b.device != device:
            raise ValueError(f"contrastive gemm (cuda): operands {a.dtype} on {a.device} and {b.dtype} on {b.device} "
                             f"must share a dtype and the output's device {device}")
        if c.dtype != torch.float32 or c.stride(1) != 1:
            raise ValueError("contrastive gemm (cuda): the output must be fp32 with unit column stride")
        m, k = a.shape
        n = b.shape[1]
        al, scale = _vector(alpha, "alpha", device), _vector(row_scale, "row_scale", device)
        with torch.cuda.device(device):
            _extension().contrastive_gemm(_dtype_name(a), a.data_ptr(), b.data_ptr(), c.data_ptr(), al.data_ptr(),
                                          scale.data_ptr(), m, n, k, a.stride(0), a.stride(1), b.stride(0),
                                          b.stride(1), c.stride(0), bool(accumulate), _ext.current_stream_ptr(device))

    def normalize_backward(self, g, x, normalize):
        device = x.device
        x = _rows(x, "x", device)
        g = _rows(g, "g", device)
        if g.dtype != torch.float32 or g.shape != x.shape:
            raise ValueError(f"contrastive_loss (cuda): the gradient must be fp32 {tuple(x.shape)}, got {g.dtype} "
                             f"{tuple(g.shape)}")
        out = _empty(x.shape, dtype=x.dtype, device=device)
        rows, dim = x.shape
        with torch.cuda.device(device):
            _extension().contrastive_normalize_backward(_dtype_name(x), g.data_ptr(), x.data_ptr(), out.data_ptr(),
                                                        rows, dim, g.stride(0), x.stride(0), out.stride(0),
                                                        bool(normalize), _ext.current_stream_ptr(device))
        return out


TILES = CudaTiles(TILE, TARGET_BLOCKS, PANEL_BYTES)
KERNELS = tiled_kernels(TILES)


def supports(tensor: torch.Tensor, info: dict):
    return tiled_dtype_problem("CUDA", tensor.dtype)


_C = _ext.extension()
if _C is not None and hasattr(_C, "contrastive_forward_tiles"):
    add_kernels("cuda", "contrastive_loss", KERNELS, supports=supports)

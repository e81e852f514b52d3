"""CUDA fused attention forward (dinotxt_fast._C.attention_forward) with the Triton backward: the "cuda" backend's
attention family.

Same contract as reference/attention.py's attention_forward: o [B, Nq, H, Dh] in q's dtype (contiguous) and lse fp32
[B, H, Nq], the natural-log log-sum-exp of the scaled scores, which is what the Triton backward reads; so
`backend="cuda"` runs this forward and the "triton" backend's attention_backward, looked up in the dispatch at call
time (this module never imports the Triton one). fp16/bf16, Dh = Dv in {64, 128}, any N, [B, N, H, Dh] inputs
with any batch/token/head strides (views of a fused qkv projection are read in place).

Two kernels: "sm80" (mma.sync, any compute capability >= 8.0) and "sm90" (wgmma + TMA, H100/H200 only, when the module
was compiled for sm_90a). "auto" takes sm90 where it can run. The environment variable DINOTXT_FAST_ATTENTION_PATH
(auto | sm80 | sm90, read at every call) forces one, e.g. to compare them in tests and benchmarks.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ... import _ext
from .. import dispatch
from ..planning import DTYPE_CODES
from . import require_extension

PATH_ENV_VAR = "DINOTXT_FAST_ATTENTION_PATH"
PATH_CODES = {"auto": 0, "sm80": 1, "sm90": 2}
PATH_NAMES = {code: name for name, code in PATH_CODES.items()}
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
MAX_BATCH_HEADS = 2**31 - 1
_VECTOR = 8  # elements per 16-byte vector: addresses and strides the kernels read must be multiples of it
# Every output is allocated through this, so that tests can poison it (NaN).
_empty = torch.empty


def requested_path() -> str:
    """The kernel DINOTXT_FAST_ATTENTION_PATH asks for ("auto" when unset)."""
    value = os.environ.get(PATH_ENV_VAR, "").strip().lower() or "auto"
    if value not in PATH_CODES:
        raise ValueError(f"{PATH_ENV_VAR}={os.environ[PATH_ENV_VAR]!r}: expected one of {sorted(PATH_CODES)}")
    return value


def _extension():
    return require_extension("attention")


def _validate(q, k, v, causal: bool, lengths) -> None:
    """Errors naming the problem, before anything touches the extension or the GPU."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention (cuda): {name} must be a 4-d tensor [B, N, H, Dh], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    if k.shape != (b, n_k, h, d) or v.shape != (b, n_k, h, v.shape[3]):
        raise ValueError(f"attention (cuda): mismatched shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (need q [B,Nq,H,Dh], k [B,Nk,H,Dh], v [B,Nk,H,Dh])")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"attention (cuda): empty inputs q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.dtype not in ATTENTION_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention (cuda): q, k, v must all be float16 or all bfloat16, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if d not in HEAD_DIMS or v.shape[3] != d:
        raise ValueError(f"attention (cuda): head dims must be equal and in {HEAD_DIMS}, got Dh={d}, Dv={v.shape[3]}")
    if causal and n_q != n_k:
        raise ValueError(f"attention (cuda): causal attention needs Nq == Nk, got {n_q} and {n_k}")
    if b * h > MAX_BATCH_HEADS:
        raise ValueError(f"attention (cuda): B * H = {b * h} exceeds {MAX_BATCH_HEADS}")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"attention (cuda): lengths must be an int32/int64 tensor [B], got "
                            f"{getattr(lengths, 'dtype', type(lengths).__name__)}")
        if lengths.shape != (b,):
            raise ValueError(f"attention (cuda): lengths must have shape ({b},), got {tuple(lengths.shape)}")
    devices = {t.device for t in (q, k, v)} | ({lengths.device} if lengths is not None else set())
    if len(devices) != 1 or q.device.type != "cuda":
        raise ValueError(f"attention (cuda): q, k, v (and lengths) must be on one CUDA device, got "
                         f"{sorted(str(d) for d in devices)}")


def _readable(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernels can read it in place (unit stride along Dh; 16-byte aligned address and
    batch/token/head strides), else an aligned contiguous copy."""
    aligned = t.data_ptr() % 16 == 0 and all(s % _VECTOR == 0 for s, n in zip(t.stride()[:3], t.shape[:3]) if n > 1)
    if t.stride(3) == 1 and aligned:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def forward(q, k, v, causal: bool, scale: float, lengths: Optional[torch.Tensor] = None,
            path: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """(o, lse, the kernel that ran: "sm80" or "sm90"). `path` is "auto", "sm80" or "sm90"; an explicit path the
    device or build cannot run is a ValueError."""
    if path not in PATH_CODES:
        raise ValueError(f"attention (cuda): path must be one of {sorted(PATH_CODES)}, got {path!r}")
    _validate(q, k, v, causal, lengths)
    ext = _extension()
    q, k, v = _readable(q), _readable(k), _readable(v)
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    o = _empty(b, n_q, h, d, dtype=q.dtype, device=q.device)
    lse = _empty(b, h, n_q, dtype=torch.float32, device=q.device)
    # The kernels read int32 and clamp to [0, Nk] themselves; int64 lengths are clamped before narrowing (they may
    # not fit int32; values past Nk mask nothing).
    lens = lengths
    if lengths is not None:
        lens = (lengths if lengths.dtype == torch.int32 else lengths.clamp(0, n_k).to(torch.int32)).contiguous()
    # The launcher queries and launches on the current device: make it the tensors' one (callers other than the
    # torch.library op, e.g. tests and benchmarks, may hold tensors on another GPU).
    with torch.cuda.device(q.device):
        ran = ext.attention_forward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
            lens.data_ptr() if lens is not None else 0, DTYPE_CODES[q.dtype], b, n_q, n_k, h, d, q.stride()[:3],
            k.stride()[:3], v.stride()[:3], o.stride()[:3], bool(causal), float(scale), PATH_CODES[path],
            _ext.current_stream_ptr(q.device))
    return o, lse, PATH_NAMES[ran]


def attention_forward(q, k, v, causal: bool, scale: float, lengths=None):
    """The "cuda" backend's attention_forward: o [B,N,H,Dh] (q's dtype, contiguous), lse [B,H,N] fp32; the kernel
    is chosen by DINOTXT_FAST_ATTENTION_PATH (default auto)."""
    o, lse, _ = forward(q, k, v, causal, scale, lengths, path=requested_path())
    return o, lse


def supports(tensor: torch.Tensor, info: dict) -> Optional[str]:
    """None when the CUDA kernel can run the call (q as `tensor`), else why not."""
    if tensor.device.type != "cuda":
        return f"the CUDA attention kernel needs CUDA tensors, got a tensor on {tensor.device}"
    if tensor.dtype not in ATTENTION_DTYPES:
        return f"the CUDA attention kernel takes fp16 or bf16, got {tensor.dtype}"
    d, dv = info.get("head_dim", tensor.shape[-1]), info.get("value_dim", tensor.shape[-1])
    if d != dv or d not in HEAD_DIMS:
        return f"the CUDA attention kernel takes Dh == Dv in {HEAD_DIMS}, got Dh={d}, Dv={dv}"
    if tensor.stride(-1) != 1:
        return f"the CUDA attention kernel reads unit stride along Dh, got stride {tensor.stride(-1)}"
    batch_heads = info.get("batch_heads")
    if batch_heads is not None and batch_heads > MAX_BATCH_HEADS:
        return f"the CUDA attention kernel indexes B*H as int32, got B*H={batch_heads}"
    return None


def attention_backward(grad_o, q, k, v, o, lse, causal: bool, scale: float, lengths=None):
    """The "cuda" backend's attention_backward: the "triton" backend's, which reads this forward's lse."""
    return dispatch.get_kernel("triton", "attention_backward")(grad_o, q, k, v, o, lse, causal, scale, lengths)


def _triton_has_attention() -> bool:
    """Whether the Triton backend (imported before this package, see ops/__init__.py) registered its attention."""
    triton = dispatch.registered().get("triton")
    return triton is not None and "attention" in triton.families()


_C = _ext.extension()
if _C is not None and hasattr(_C, "attention_forward") and _triton_has_attention():
    dispatch.add_kernels("cuda", "attention", {"attention_forward": attention_forward,
                                               "attention_backward": attention_backward}, supports=supports)

"""The attention family: the reference (torch backend) against float64 autograd oracles, the Triton kernels
(dinotxt_fast/ops/triton/attention.py; under the CPU interpreter here) against the same oracles and the reference,
and the `lengths` key masking of ops.attention on every backend that has it.

Without a GPU the kernels run under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1): small odd
shapes, fp32 and fp16 only (the 3.9 interpreter miscomputes tl.dot on bf16). GPU tests (marked) run the real DINO.txt
shapes in bf16 with the rule of docs/design.md, "Testing and evidence": error at most 2x that of PyTorch's SDPA in
the same dtype, both against float64. The CUDA forward has its own files (test_attention_cuda.py,
test_attention_cuda_build.py).
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from dinotxt_fast import ops
from dinotxt_fast.ops import dispatch
from dinotxt_fast.ops.reference import attention as ref_attention
from dinotxt_fast.ops.reference import common

from .backends import PROVE, TORCH_AND_TRITON, kernel_module, needs_triton, proving

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def triton_attention():
    return kernel_module("triton", "attention")


# ------------------------------------------------------------------------------------------------ helpers
def oracle(q, k, v, causal, scale=None, lengths=None):
    """Plain-autograd attention on [B,N,H,Dh] (run it in float64); rows that see no key give 0, NaN-free."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    hidden = torch.zeros(s.shape[-2:], dtype=torch.bool, device=s.device)[None, None]
    if causal:
        hidden = hidden | torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
    if lengths is not None:
        hidden = hidden | (torch.arange(s.shape[-1], device=s.device) >= lengths.to(s.device).long()[:, None])[
            :, None, None, :]
    hidden = hidden.expand(s.shape)
    empty = hidden.all(-1, keepdim=True)
    p = s.masked_fill(hidden | empty, float("-inf")).masked_fill(empty, 0.0).softmax(-1) * ~empty
    return (p @ v).transpose(1, 2)


def _inputs(b, n_q, n_k, h, d, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n, dim: torch.randn(b, n, h, dim, generator=g, dtype=torch.float64)  # noqa: E731
    q64, k64, v64, go = mk(n_q, d), mk(n_k, d), mk(n_k, dv), mk(n_q, dv)
    return (q64, k64, v64), go, tuple(t.to(dtype).requires_grad_() for t in (q64, k64, v64))


def _fwd_bwd(fn, inputs, grad_out):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))


def _max_errors(got, want):
    return [(a.double() - w).abs().max().item() for a, w in zip(got, want)]


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


# ------------------------------------------------------------------ reference (torch backend), float64
@pytest.mark.parametrize("n_q,n_k,h,dh,causal", [
    (1, 1, 1, 8, False), (1, 1, 1, 8, True), (5, 5, 3, 16, False), (5, 5, 3, 16, True),
    (77, 77, 2, 8, False), (77, 77, 2, 8, True), (7, 13, 2, 4, False),
])
def test_attention_matches_float64_oracle(n_q, n_k, h, dh, causal):
    b = 2
    q = torch.randn(b, n_q, h, dh, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, n_k, h, dh, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, n_k, h, dh, dtype=torch.float64, requires_grad=True)
    out, want = ops.attention(q, k, v, causal=causal), oracle(q, k, v, causal)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for got, exp in zip(_grads(out, (q, k, v)), _grads(want, (q, k, v))):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


def test_attention_on_strided_qkv_views_and_low_precision():
    b, n, h, dh = 2, 261, 2, 16
    qkv64 = torch.randn(b, n, 3, h, dh, dtype=torch.float64)
    want = oracle(*qkv64.unbind(2), causal=False)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, None)):
        qkv = qkv64.to(dtype)
        q, k, v = qkv.unbind(2)  # non-contiguous views
        assert not q.is_contiguous()
        out = ops.attention(q, k, v, scale=dh ** -0.5)
        assert out.dtype == dtype and out.shape == (b, n, h, dh) and out.is_contiguous()
        if tol is not None:
            torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
        else:  # low precision: no worse than 2x PyTorch's own bf16 SDPA error (docs/design.md,
            # "Testing and evidence")
            sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
            assert (out.double() - want).abs().max() <= 2 * (sdpa.double() - want).abs().max() + 1e-3


def test_attention_chunked_path_equals_unchunked(monkeypatch):
    q, k, v = (torch.randn(1, 37, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    full = ops.attention(q, k, v, causal=True)
    g_full = _grads(full, (q, k, v))
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 37 * 5)  # 5 query rows a chunk (a head's scores do not fit)
    chunked = ops.attention(q, k, v, causal=True)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    for a, b in zip(_grads(chunked, (q, k, v)), g_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_chunks_of_whole_heads_equal_one_chunk(causal, monkeypatch):
    """Chunks of 2 of the 6 (batch, head) pairs, with lengths: the float64 result of one chunk."""
    q, k, v = (torch.randn(2, 11, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([11, 4])
    full = ops.attention(q, k, v, causal=causal, lengths=lengths)
    g_full = _grads(full, (q, k, v))
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 2 * 11 * 11)
    assert ref_attention._chunks(6, 11, 11, q.device) == (2, 11)
    chunked = ops.attention(q, k, v, causal=causal, lengths=lengths)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-13)
    for a, b in zip(_grads(chunked, (q, k, v)), g_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.skipif(ref_attention._CPU_FLASH is None, reason="this torch has no CPU flash-attention op")
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_fp32_runs_pytorch_flash_kernels_with_the_family_contract(causal, monkeypatch):
    """On a CPU, fp32 attention (forward with lse, backward) is PyTorch's flash kernel: the float64 oracle's output
    and gradients, lengths as a key mask, lse = -inf and zero gradients for a sequence that sees no key."""
    calls = []
    flash = ref_attention._CPU_FLASH
    monkeypatch.setattr(ref_attention, "_CPU_FLASH", lambda *a, **kw: calls.append(1) or flash(*a, **kw))
    ref_inputs, go, inputs = _inputs(3, 33, 33, 2, 16, 16, torch.float32, seed=7)
    lengths = torch.tensor([33, 0, 9])
    got = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, causal=causal, lengths=lengths, backend="torch"),
                   inputs, go)
    want = _fwd_bwd(lambda q, k, v: oracle(q, k, v, causal, lengths=lengths),
                    tuple(t.requires_grad_() for t in ref_inputs), go)
    assert calls == [1]
    for name, a, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32 and a.is_contiguous(), name
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=2e-5, msg=name)
        assert a[1].abs().max() == 0, name
    _, lse = torch.ops.dinotxt_fast.attention_fwd(*inputs, causal, 0.25, lengths, "torch")
    assert lse.shape == (3, 2, 33) and lse.is_contiguous() and bool((lse[1] == float("-inf")).all())
    want_lse = ref_attention._chunked_forward(*(t.detach() for t in ref_inputs), causal, 0.25, lengths)[1]
    torch.testing.assert_close(lse[[0, 2]].double(), want_lse[[0, 2]], rtol=1e-5, atol=1e-5)  # the same convention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [None, [0, 3, 9, 40]])
def test_inference_on_the_torch_backend_uses_sdpa_with_the_same_result(causal, lengths, monkeypatch):
    """Gradient-free calls on the torch backend run PyTorch's SDPA (on CUDA; forced here on the CPU): same o as the
    float64 reference, lengths as a key mask, zero rows for sequences that see no key, o in q's dtype."""
    monkeypatch.setattr(ref_attention, "sdpa_forward_applies", lambda q: True)
    calls = []
    sdpa = ref_attention.attention_forward_sdpa
    monkeypatch.setattr(ref_attention, "attention_forward_sdpa", lambda *a: calls.append(1) or sdpa(*a))
    b, n, h, dh = 4, 9, 2, 8
    lens = None if lengths is None else torch.tensor(lengths)
    q, k, v = (torch.randn(b, n, h, dh, dtype=torch.float64) for _ in range(3))
    want = ref_attention.attention_forward(q, k, v, causal, dh ** -0.5, lens)[0]  # the chunked float64 reference
    with torch.no_grad():
        got = ops.attention(q, k, v, causal=causal, lengths=lens)
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.attention(q.float(), k.float(), v.float(), causal=causal, lengths=lens).dtype == torch.float32
    q.requires_grad_(True)
    calls.clear()
    out = ops.attention(q, k, v, causal=causal, lengths=lens)  # training: the op with its lse and backward
    assert calls == [] and out.requires_grad


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, proving(True)])
def test_gpu_torch_backend_inference_runs_sdpa(causal):
    """On CUDA the gradient-free torch backend is PyTorch's SDPA: bf16 error within 2x of SDPA's own (it is SDPA),
    lengths masked, zero rows for empty sequences."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q64, k64, v64 = (torch.randn(3, 261, 4, 64, device="cuda", dtype=torch.float64, generator=g) for _ in range(3))
    lens = torch.tensor([0, 100, 261], device="cuda")
    want = ref_attention.attention_forward(q64, k64, v64, causal, 0.125, lens)[0]
    with torch.no_grad():
        got = ops.attention(q64.bfloat16(), k64.bfloat16(), v64.bfloat16(), causal=causal, lengths=lens)
    assert got.dtype == torch.bfloat16 and got.is_contiguous() and bool(torch.isfinite(got).all())
    assert got[0].abs().max() == 0
    assert (got.double() - want).abs().max() < 2e-2


@pytest.mark.gpu
@PROVE
def test_reference_ops_on_cuda():
    q, k, v = (torch.randn(2, 261, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ops.attention(q, k, v, backend="torch")
    want = oracle(q.double(), k.double(), v.double(), False)
    assert (out.double() - want).abs().max() < 2e-2


def test_attention_bad_inputs():
    q = torch.randn(2, 5, 2, 8)
    with pytest.raises(ValueError, match=r"\[B, N, H, Dh\]"):
        ops.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="incompatible shapes"):
        ops.attention(q, q[:, :, :1], q)
    with pytest.raises(TypeError, match="dtype"):
        ops.attention(q, q.half(), q)
    with pytest.raises(TypeError, match="dtype"):
        ops.attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match="causal"):
        ops.attention(q, q[:, :3], q[:, :3], causal=True)


# ------------------------------------------------------------------------- Triton: fp32 / fp16, every backend
CASES = [  # b, n_q, n_k, h, d, dv, causal
    (2, 77, 77, 3, 32, 32, True),      # text-like: tails of 13 rows / keys, odd B*H packed 2 pairs a program
    (2, 77, 77, 3, 64, 64, False),
    (1, 1, 1, 2, 64, 64, True),        # N = 1
    (1, 1, 1, 3, 32, 32, False),
    (2, 5, 13, 3, 96, 40, False),      # Nq != Nk, Dh = 96 (not a power of two), Dv != Dh
    (1, 261, 261, 2, 64, 64, False),   # ViT: cls + 4 registers + 256 patches
    (1, 37, 37, 1, 128, 128, True),
    (3, 33, 33, 1, 8, 8, True),        # head dim below tl.dot's 16
]


@needs_triton
@pytest.mark.parametrize("b,n_q,n_k,h,d,dv,causal", CASES)
def test_fp32_forward_and_gradients_match_float64(b, n_q, n_k, h, d, dv, causal):
    ref_inputs, go, inputs = _inputs(b, n_q, n_k, h, d, dv, torch.float32)
    got = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, causal=causal, backend="triton"), inputs, go)
    want = _fwd_bwd(lambda q, k, v: oracle(q, k, v, causal), tuple(t.requires_grad_() for t in ref_inputs), go)
    for name, a, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32 and a.is_contiguous(), name
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
@pytest.mark.parametrize("b,n,h,d,causal", [(2, 77, 3, 64, True), (1, 261, 2, 64, False)])
def test_fp16_error_at_most_twice_pytorch_sdpa(backend, b, n, h, d, causal):
    ref_inputs, go, inputs = _inputs(b, n, n, h, d, d, torch.float16, seed=1)
    want = _fwd_bwd(lambda q, k, v: oracle(q, k, v, causal), tuple(t.requires_grad_() for t in ref_inputs), go)
    got = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, causal=causal, backend=backend), inputs, go)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal).transpose(1, 2)

    base = _fwd_bwd(sdpa, tuple(t.detach().requires_grad_() for t in inputs), go)
    assert all(t.dtype == torch.float16 for t in got)
    for name, e, e_torch in zip(("o", "dq", "dk", "dv"), _max_errors(got, want), _max_errors(base, want)):
        assert e <= 2 * e_torch + 1e-4, f"{name}: error {e:.2e} vs PyTorch fp16 SDPA {e_torch:.2e}"


@needs_triton
def test_lse_follows_the_reference_convention():
    _, _, (q, k, v) = _inputs(2, 21, 21, 3, 32, 32, torch.float32)
    lengths = torch.tensor([21, 6])
    for causal in (False, True):
        o, lse = torch.ops.dinotxt_fast.attention_fwd(q, k, v, causal, 0.3, lengths, "triton")
        o_ref, lse_ref = torch.ops.dinotxt_fast.attention_fwd(q, k, v, causal, 0.3, lengths, "torch")
        assert lse.dtype == torch.float32 and lse.shape == (2, 3, 21)
        torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)  # natural log of the scaled scores
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_strided_qkv_views_and_transposed_layouts_match_contiguous_inputs(backend):
    b, n, h, d = 2, 45, 3, 32
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(b, n, 3, h, d, generator=g).unbind(2)  # views of one fused projection
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # SDPA-style [B,H,N,D] storage seen as [B,N,H,D]
    go = torch.randn(b, h, n, d, generator=g).transpose(1, 2)  # a non-contiguous upstream gradient
    assert not q.is_contiguous() and not k.is_contiguous() and not go.is_contiguous()
    run = lambda *t: ops.attention(*t, causal=True, backend=backend)  # noqa: E731
    strided = _fwd_bwd(run, [t.detach().requires_grad_() for t in (q, k, v)], go)
    dense = _fwd_bwd(run, [t.detach().contiguous().requires_grad_() for t in (q, k, v)], go.contiguous())
    for a, w in zip(strided, dense):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("use_deterministic", [False, True])
def test_every_output_element_is_written(poison, use_deterministic):
    """Outputs are allocated NaN-filled (the poison fixture): any element a kernel forgets to write shows up."""
    torch.use_deterministic_algorithms(use_deterministic)
    try:
        for b, n_q, n_k, h, d, dv, causal in [(2, 77, 77, 3, 32, 32, True), (2, 5, 13, 3, 96, 40, False)]:
            _, go, inputs = _inputs(b, n_q, n_k, h, d, dv, torch.float32)
            lengths = torch.tensor([n_k, 3])
            o, lse = torch.ops.dinotxt_fast.attention_fwd(*inputs, causal, 0.25, lengths, "triton")
            grads = torch.ops.dinotxt_fast.attention_bwd(go.float(), *inputs, o, lse, causal, 0.25, lengths, "triton")
            for t in (o, lse, *grads):
                assert not t.isnan().any()
    finally:
        torch.use_deterministic_algorithms(False)


# ----------------------------------------------------------------------------------- lengths (key masking)
@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
@pytest.mark.parametrize("causal,n_q,n_k", [(True, 77, 77), (False, 77, 77), (False, 9, 40)])
def test_lengths_mask_keys_and_match_float64(backend, causal, n_q, n_k):
    b, h, d = 4, 2, 32
    ref_inputs, go, inputs = _inputs(b, n_q, n_k, h, d, d, torch.float32, seed=4)
    lengths = torch.tensor([n_k, 1, 17, 1000], dtype=torch.int32)  # everything, one key, some, more than Nk
    got = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, causal=causal, lengths=lengths, backend=backend),
                   inputs, go)
    want = _fwd_bwd(lambda q, k, v: oracle(q, k, v, causal, lengths=lengths),
                    tuple(t.requires_grad_() for t in ref_inputs), go)
    for name, a, w in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=2e-5, msg=name)
    for grad in got[2:]:  # keys past the length get exactly zero gradient
        assert grad[1, 1:].abs().max() == 0 and grad[2, 17:].abs().max() == 0


@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
@pytest.mark.parametrize("causal", [False, True])
def test_rows_without_any_key_are_nan_free(backend, causal):
    _, go, (q, k, v) = _inputs(3, 20, 20, 2, 32, 32, torch.float32, seed=5)
    lengths = torch.tensor([0, 2**40, -3], dtype=torch.int64)  # sequences 0 and 2 see no key at all, 1 sees all
    o, lse = torch.ops.dinotxt_fast.attention_fwd(q, k, v, causal, 0.2, lengths, backend)
    assert (o[[0, 2]] == 0).all() and (lse[[0, 2]] == float("-inf")).all() and lse[1].isfinite().all()
    grads = torch.autograd.grad(ops.attention(q, k, v, causal=causal, lengths=lengths, backend=backend), (q, k, v), go)
    for grad in grads:
        assert grad.isfinite().all() and (grad[[0, 2]] == 0).all() and grad[1].abs().max() > 0


@needs_triton
def test_triton_never_reads_masked_keys():
    """NaN in the padded keys and values must not reach anything: their blocks are skipped or masked on load."""
    b, n, h, d = 2, 77, 2, 32
    ref_inputs, go, _ = _inputs(b, n, n, h, d, d, torch.float32, seed=6)
    lengths = torch.tensor([70, 19])
    q, k, v = (t.float().clone() for t in ref_inputs)
    k[1, 19:], v[1, 19:], k[0, 70:], v[0, 70:] = float("nan"), float("nan"), float("nan"), float("nan")
    for det in (False, True):
        torch.use_deterministic_algorithms(det)
        try:
            got = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, causal=True, lengths=lengths, backend="triton"),
                           [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())], go)
        finally:
            torch.use_deterministic_algorithms(False)
        want = _fwd_bwd(lambda q, k, v: oracle(q, k, v, True, lengths=lengths),
                        tuple(t.detach().clone().requires_grad_() for t in ref_inputs), go)
        for a, w in zip(got, want):
            assert not a.isnan().any()
            torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=2e-5)


def test_lengths_validation():
    q = torch.randn(2, 5, 2, 16)
    with pytest.raises(TypeError, match="int32/int64"):
        ops.attention(q, q, q, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        ops.attention(q, q, q, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="int32/int64"):
        ops.attention(q, q, q, lengths=[1, 2])


@needs_triton
def test_strided_lengths_are_read_through_their_stride():
    q, k, v = (torch.randn(2, 9, 2, 16) for _ in range(3))
    strided = torch.tensor([[5, 0], [3, 0]])[:, 0]
    assert not strided.is_contiguous()
    want = ops.attention(q, k, v, lengths=strided.contiguous(), backend="torch")
    torch.testing.assert_close(ops.attention(q, k, v, lengths=strided, backend="triton"), want, rtol=1e-5,
                               atol=1e-5)


@needs_triton
def test_backward_is_nan_free_for_very_negative_scores_with_padded_key_tiles():
    # All scores near -100: lse < -88, so an unmasked padded key's exp2(0 - lse) is inf (and inf * 0 = NaN in dQ).
    q = (-5 * torch.ones(1, 20, 1, 16)).requires_grad_(True)
    k = (5 * torch.ones(1, 20, 1, 16) + 0.01 * torch.randn(1, 20, 1, 16)).requires_grad_(True)
    v = torch.randn(1, 20, 1, 16, requires_grad=True)
    grads = {}
    for backend in ("torch", "triton"):
        out = ops.attention(q, k, v, backend=backend)
        grads[backend] = torch.autograd.grad(out.sum(), (q, k, v))
    for got, want in zip(grads["triton"], grads["torch"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- backward modes, dispatch
def test_deterministic_mode_uses_the_separate_dq_pass(monkeypatch, deterministic, triton_attention):
    calls = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            calls.append("dq pass")
            return self.kernel[grid]

    monkeypatch.setattr(triton_attention, "_bwd_q_kernel", Spy(triton_attention._bwd_q_kernel))
    ref_inputs, go, inputs = _inputs(2, 40, 40, 3, 64, 64, torch.float32, seed=7)
    run = lambda: _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, causal=True, backend="triton"),  # noqa: E731
                           [t.detach().requires_grad_() for t in inputs], go)
    first, second = run(), run()
    assert calls == ["dq pass", "dq pass"]
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # bitwise reproducible
    torch.use_deterministic_algorithms(False)
    atomic = run()
    assert calls == ["dq pass"] * 2  # the default backward takes dQ from atomic adds in the dK/dV pass
    want = _fwd_bwd(lambda q, k, v: oracle(q, k, v, True), tuple(t.requires_grad_() for t in ref_inputs), go)
    for a, b, w in zip(first, atomic, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(b.double(), w, rtol=1e-5, atol=2e-5)


@needs_triton
def test_batch_heads_are_not_bounded_by_a_grid_axis(triton_attention):
    """B*H and the tiles share one grid axis (2**31 - 1 programs), not a 65,535 one: a text batch of 3,277 x 20
    heads runs; only a launch beyond 2**31 programs is refused."""
    ta = triton_attention
    x = torch.empty(1, dtype=torch.float16)
    assert ta.supports(x, {"batch_heads": 3277 * 20, "seq": 77, "head_dim": 64, "value_dim": 64}) is None
    assert "2**31" in ta.supports(x, {"batch_heads": 2**27, "seq": 4101, "head_dim": 64, "value_dim": 64})
    assert ta._grid("BLOCK_M", 77, 70000)({"BLOCK_M": 32, "PAIRS": 2}) == (3 * 35000,)  # 2 full tiles + a tail


@needs_triton
def test_backward_pre_pass_puts_batch_heads_on_grid_axis_0(triton_attention, monkeypatch):
    """The delta pre-pass launches B*H programs on axis 0 (2**31 - 1), the row blocks on axis 1 (65,535 at most):
    B*H = 70,000 would not launch on axis 1. The launch is recorded, not run."""
    ta = triton_attention
    grids = []

    class Stop(Exception):
        pass

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append(grid)
                raise Stop
            return launch

    monkeypatch.setattr(ta, "_delta_kernel", Recorder())
    q = torch.zeros(1, 5, 70000, 16, dtype=torch.float16)
    lse = torch.zeros(1, 70000, 5)
    with pytest.raises(Stop):
        ta.attention_backward(q, q, q, q, q, lse, False, 0.25)
    assert grids == [(70000, 1)]


@needs_triton
def test_unsupported_calls_fail_clearly():
    x = torch.randn(1, 3, 1, 16)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        ops.attention(x.double(), x.double(), x.double(), backend="triton")
    with pytest.raises(ValueError, match="bf16"):
        ops.attention(x.bfloat16(), x.bfloat16(), x.bfloat16(), backend="triton")
    wide = torch.randn(1, 3, 1, 160)
    with pytest.raises(ValueError, match="head dims"):
        ops.attention(wide, wide, wide, backend="triton")
    assert dispatch.resolve("attention", None, x) == "torch"  # auto on CPU stays the reference


@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_opcheck_and_compile_fullgraph_with_lengths(backend):
    q, k, v = (torch.randn(2, 7, 2, 16, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([7, 3])
    opcheck(torch.ops.dinotxt_fast.attention_fwd.default, (q, k, v, True, 0.25, lengths, backend))
    torch._dynamo.reset()

    def step(q, k, v, lengths):
        return ops.attention(q, k, v, causal=True, lengths=lengths, backend=backend).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, k, v, lengths), step(q, k, v, lengths)
    torch.testing.assert_close(got, want)
    for a, e in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v))):
        torch.testing.assert_close(a, e)


def test_deterministic_mode_runs_one_fixed_config_and_tuning_keys_on_batch_heads(triton_attention):
    """Deterministic mode must not pick tiles by timing (results would differ between processes): the pruner keeps
    one fixed configuration; B*H is part of the autotuning key (it changes how many programs fill the GPU)."""
    from dinotxt_fast.ops.triton.tuning import TUNED

    ta = triton_attention
    for name, n in (("attention._fwd_kernel", 1029), ("attention._bwd_kv_kernel", 77),
                    ("attention._bwd_q_kernel", 4101)):
        select = TUNED[name].select  # the GPU candidates' rule (the interpreter itself runs one configuration)
        args = {"Q": torch.empty(1, dtype=torch.bfloat16), "BLOCK_D": 64, "BLOCK_DV": 64, "N_Q": n, "N_K": n}
        tuned = select(list(TUNED[name].configs), {**args, "FIXED_CONFIG": 0})
        fixed = select(list(TUNED[name].configs), {**args, "FIXED_CONFIG": 1})
        # the dQ pass runs in deterministic mode only, so it has its fixed configuration alone
        assert (len(tuned) > 1 or name == "attention._bwd_q_kernel") and fixed == tuned[:1]
    for kernel in (ta._fwd_kernel, ta._bwd_kv_kernel, ta._bwd_q_kernel):
        assert {"BH_BUCKET", "FIXED_CONFIG"} <= set(kernel.keys)
    q = torch.zeros(3, 5, 7, 16)
    assert ta._common(q, q, q, False, None, q)[0]["BH_BUCKET"] == 32
    torch.use_deterministic_algorithms(True)
    try:
        assert ta._common(q, q, q, False, None, q)[0]["FIXED_CONFIG"] == 1
    finally:
        torch.use_deterministic_algorithms(False)
    assert ta._common(q, q, q, False, None, q)[0]["FIXED_CONFIG"] == 0


@needs_triton
def test_text_tower_on_triton_matches_the_reference(monkeypatch):
    from dinotxt_fast.models.config import make_config
    from dinotxt_fast.models.text import TextTower

    torch.manual_seed(8)
    tower = TextTower(make_config("dinov2_vitl14_reg4_dinotxt", text_dim=64, text_heads=4, text_layers=2)).eval()
    ids = torch.zeros(3, 77, dtype=torch.long)
    for row, n in enumerate((4, 30, 11)):  # SOT, words, EOT, padding
        ids[row, 0], ids[row, 1:n - 1], ids[row, n - 1] = 49406, torch.randint(1, 49406, (n - 2,)), 49407
    with torch.no_grad():
        want = tower(ids, truncate=False)
        monkeypatch.setenv(ops.ENV_VAR, "triton")
        got = tower(ids, truncate=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


_COMPILE_SCRIPT = r"""
import re
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dinotxt_fast.ops.triton.attention as A

def jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel

SCALARS = {"H", "N_Q", "N_K", "BH", "N_Q_BUCKET", "N_K_BUCKET", "BH_BUCKET", "FIXED_CONFIG"}
for label, kernel, configs, atomic in (("_fwd_kernel", A._fwd_kernel, A._CONFIGS["fwd"][2, 128, "short"], False),
                                       ("_bwd_kv_kernel", A._bwd_kv_kernel, A._CONFIGS["bwd_kv"][2, 128, "long"], True),
                                       ("_bwd_q_kernel", A._bwd_q_kernel, A._CONFIGS["bwd_q"][2, 128, "long"], False)):
    fn, config = jit(kernel), configs[0]
    n, causal = (77, True) if label == "_fwd_kernel" else (261, False)
    consts = dict(HEAD_D=96, HEAD_DV=96, BLOCK_D=128, BLOCK_DV=128, CAUSAL=causal, HAS_LENS=True, ATOMIC_DQ=atomic,
                  DOT_PREC="tf32", BLOCK_M_TAIL=A._tail(n, config.kwargs["BLOCK_M"]),
                  BLOCK_N_TAIL=A._tail(n, config.kwargs["BLOCK_N"]), **config.kwargs)
    if "DQ_PASS" in fn.arg_names:  # the backward kernel: the dK/dV pass (atomic fp32 dQ) or the dQ pass
        consts["DQ_PASS"] = label == "_bwd_q_kernel"
    FP32_POINTERS = {"LSE", "DELTA"} | ({"DQ"} if atomic else set())
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in ("qk_scale", "scale"):
            signature[name] = "fp32"
        elif name in SCALARS or name[0].islower():
            signature[name] = "i32"
        else:
            signature[name] = "*i64" if name == "LENS" else "*fp32" if name in FP32_POINTERS else "*bf16"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    ptx = compiled.asm["ptx"]
    assert "mma" in ptx, label
    atomics = [line for line in ptx.splitlines() if re.match(r"\s*(@!?%p\d+\s+)?(atom|red)\.", line)]
    assert bool(atomics) == atomic and all(".relaxed" in line for line in atomics), (label, atomics[:3])
    print("compiled", label)
"""


@needs_triton
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the GPU compiler rejects: compile each kernel to PTX and SASS for an H100 target
    (bf16, Dh = 96 padded to 128, lengths, causal and not, atomic dQ) with Triton's bundled ptxas."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["compiled", "_fwd_kernel", "compiled", "_bwd_kv_kernel", "compiled",
                                     "_bwd_q_kernel"]


# ------------------------------------------------------------------------------------------- GPU (real shapes)
def _gpu_errors(b, n_q, n_k, h, d, causal, dtype, lengths=None, seed=0):
    """Max errors (o, dq, dk, dv) of the Triton kernels and of PyTorch's SDPA in `dtype`, both vs float64."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q64, k64, v64 = (torch.randn(b, n, h, d, device="cuda", dtype=torch.float64, generator=g)
                     for n in (n_q, n_k, n_k))
    go = torch.randn(b, n_q, h, d, device="cuda", dtype=torch.float64, generator=g)
    want = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, causal=causal, lengths=lengths, backend="torch"),
                    [t.requires_grad_() for t in (q64, k64, v64)], go)
    low = [t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64)]
    got = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, causal=causal, lengths=lengths, backend="triton"), low, go)

    def sdpa(q, k, v):
        mask = None
        if lengths is not None:
            mask = (torch.arange(n_k, device="cuda") < lengths[:, None])[:, None, None, :]
            if causal:
                mask = mask & torch.ones(n_q, n_k, dtype=torch.bool, device="cuda").tril()
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                             is_causal=causal and mask is None)
        return out.transpose(1, 2)

    base = _fwd_bwd(sdpa, [t.detach().requires_grad_() for t in low], go)
    for t in got:
        assert t.dtype == dtype and t.isfinite().all()
    return _max_errors(got, want), _max_errors(base, want)


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("n,b", [(261, 8), (1029, 3), (4101, 1)])
def test_gpu_vit_shapes_bf16(n, b):
    ours, torch_err = _gpu_errors(b, n, n, 16, 64, False, torch.bfloat16)
    for name, e, e_torch in zip(("o", "dq", "dk", "dv"), ours, torch_err):
        assert e <= 2 * e_torch, f"N={n} {name}: {e:.2e} vs SDPA bf16 {e_torch:.2e}"


@pytest.mark.gpu
@PROVE
def test_gpu_text_causal_with_lengths_bf16():
    lengths = torch.randint(2, 78, (96,), device="cuda")
    ours, torch_err = _gpu_errors(96, 77, 77, 20, 64, True, torch.bfloat16, lengths=lengths, seed=1)
    for name, e, e_torch in zip(("o", "dq", "dk", "dv"), ours, torch_err):
        assert e <= 2 * e_torch, f"text {name}: {e:.2e} vs SDPA bf16 {e_torch:.2e}"


# proved: fp16 causal at Dh 96 (padded to 128), bf16 query/key lengths apart at Dh 128, bf16 tiny at Dh 32
_PROVED_HEAD_DIMS = {(96, torch.float16, (True, 261, 261)), (128, torch.bfloat16, (False, 77, 1029)),
                     (32, torch.bfloat16, (False, 1, 5))}


@pytest.mark.gpu
@pytest.mark.parametrize("d,dtype,causal,n_q,n_k", [
    proving(d, dtype, *shape) if (d, dtype, shape) in _PROVED_HEAD_DIMS else (d, dtype, *shape)
    for d in (32, 96, 128) for dtype in (torch.float16, torch.bfloat16)
    for shape in ((True, 261, 261), (False, 77, 1029), (False, 1, 5))])
def test_gpu_head_dims_and_odd_shapes(d, dtype, causal, n_q, n_k):
    ours, torch_err = _gpu_errors(3, n_q, n_k, 5, d, causal, dtype, seed=2)
    for name, e, e_torch in zip(("o", "dq", "dk", "dv"), ours, torch_err):
        assert e <= 2 * e_torch + 1e-6, f"{name}: {e:.2e} vs SDPA {e_torch:.2e}"


@pytest.mark.gpu
@PROVE
def test_gpu_fp32_is_accurate_and_deterministic_mode_is_bitwise_reproducible():
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 261, 16, 64, device="cuda", generator=g, requires_grad=True) for _ in range(3))
    go = torch.randn(2, 261, 16, 64, device="cuda", generator=g)
    want = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, backend="torch"),
                    [t.detach().double().requires_grad_() for t in (q, k, v)], go.double())
    got = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, backend="triton"), (q, k, v), go)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=2e-5)
    torch.use_deterministic_algorithms(True)
    try:
        low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        first = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, backend="triton"), low, go)
        second = _fwd_bwd(lambda q, k, v: ops.attention(q, k, v, backend="triton"), low, go)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _fused_qkv_loss(qkv):
    q, k, v = qkv.unbind(2)
    return ops.attention(q, k, v, backend="triton").float().square().sum()


@pytest.mark.gpu
@PROVE
def test_gpu_fused_qkv_views():
    """q, k, v as strided views of one fused projection (no copies) against the same values made contiguous."""
    qkv = torch.randn(4, 261, 3, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = _fused_qkv_loss(qkv)
    (g_eager,) = torch.autograd.grad(eager, qkv)
    split = [t.detach().contiguous().requires_grad_() for t in qkv.unbind(2)]
    want = ops.attention(*split, backend="triton").float().square().sum()
    torch.testing.assert_close(eager, want)
    for g, w in zip(g_eager.unbind(2), torch.autograd.grad(want, split)):
        torch.testing.assert_close(g, w, rtol=0.02, atol=0.02)  # atomic dQ: summation order varies


@pytest.mark.gpu
def test_gpu_fused_qkv_views_and_compile():
    qkv = torch.randn(4, 261, 3, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = _fused_qkv_loss(qkv)
    (g_eager,) = torch.autograd.grad(eager, qkv)
    compiled = torch.compile(_fused_qkv_loss, fullgraph=True)(qkv)
    (g_compiled,) = torch.autograd.grad(compiled, qkv)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager, rtol=0.02, atol=0.02)  # atomic dQ: summation order varies

"""The patch pooling family: the reference (torch backend) against float64 autograd oracles, the Triton kernels
(CPU interpreter here, GPU when present) and the CUDA kernels (GPU only) against float64.

Every output and workspace the kernels allocate is poisoned (NaN, or -1 for integers; the poison fixture, for every
test here) first, so an element a kernel forgets to write shows up as a mismatch.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from dinotxt_fast import ops
from dinotxt_fast.ops.planning import row_splits
from dinotxt_fast.ops.reference import common
from dinotxt_fast.ops.reference import pooling as ref_pooling

from .backends import TORCH_AND_TRITON, available, kernel_module, needs_triton, proving, require

pytestmark = pytest.mark.usefixtures("poison")


def oracle(tokens, r, w, b, eps, normalize):
    x = F.layer_norm(tokens, tokens.shape[-1:], w, b, eps) if w is not None else tokens
    out = torch.cat([x[:, 0], x[:, 1 + r:].mean(1)], -1)
    return F.normalize(out, dim=-1) if normalize else out


def make_inputs(b, n, d, ln, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = (torch.randn(b, n, d, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(device)
    w = (torch.randn(d, generator=g, dtype=torch.float64) * 0.5 + 1).to(device) if ln else None
    bias = torch.randn(d, generator=g, dtype=torch.float64).to(device) if ln == "weight+bias" else None
    grad = torch.randn(b, 2 * d, generator=g, dtype=torch.float64).to(device)
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return (cast(tokens), cast(w), cast(bias)), (tokens, w, bias), grad


def run(tokens, w, b, r, normalize, grad, backend):
    """Output and gradients w.r.t. (tokens, w, b present) for upstream gradient `grad`; backend "eager" is the
    plain-autograd PyTorch oracle, computed in the inputs' own dtype."""
    if backend == "eager":
        out = oracle(tokens, r, w, b, 1e-5, normalize)
    else:
        out = ops.patch_pool(tokens, num_registers=r, ln_weight=w, ln_bias=b, eps=1e-5, normalize=normalize,
                             backend=backend)
    inputs = [t for t in (tokens, w, b) if t is not None]
    return out, torch.autograd.grad(out, inputs, grad.to(out.dtype))


def exact_copies(*tensors):
    """float64 leaves holding exactly the (low-precision) inputs: what the float64 oracle should see."""
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def _rel_err(got, want):
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max().clamp_min(1e-30))


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


# ------------------------------------------------------------------ reference (torch backend), float64
@pytest.mark.parametrize("r", [0, 4])
@pytest.mark.parametrize("ln", [None, "weight", "weight+bias"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_patch_pool_matches_float64_oracle(r, ln, normalize, chunked, monkeypatch):
    b, p, d = 3, 7, 24
    if chunked:  # the reference splits big batches: 2 samples per chunk here (chunks of 2 and 1)
        monkeypatch.setattr(common, "CHUNK_ELEMENTS", 2 * (1 + r + p) * d)
        assert len(ref_pooling._batch_chunks(torch.empty(b, 1 + r + p, d))) == 2
    tokens = torch.randn(b, 1 + r + p, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, dtype=torch.float64, requires_grad=True) if ln else None
    bias = torch.randn(d, dtype=torch.float64, requires_grad=True) if ln == "weight+bias" else None
    out = ops.patch_pool(tokens, num_registers=r, ln_weight=w, ln_bias=bias, eps=1e-5, normalize=normalize)
    want = oracle(tokens, r, w, bias, 1e-5, normalize)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (tokens, w, bias) if t is not None]
    grads = _grads(out, inputs)
    for got, exp in zip(grads, _grads(want, inputs)):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-9)
    if r:
        assert grads[0][:, 1:1 + r].abs().max() == 0  # registers get exactly zero gradient


@pytest.mark.parametrize("normalize", [False, True])
def test_patch_pool_fp32_with_offset_tokens_matches_float64(normalize):
    """Tokens whose mean is 100x their spread (a residual stream's offset): the reference's LayerNorm statistics
    and closed-form backward stay at fp32 accuracy (no cancellation from expanding the centred sums)."""
    g = torch.Generator().manual_seed(2)
    tokens64 = torch.randn(3, 1 + 4 + 50, 64, generator=g, dtype=torch.float64) + 100
    w64, b64 = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    grad = torch.randn(3, 128, generator=g, dtype=torch.float64)
    want, want_grads = run(*exact_copies(tokens64, w64, b64), 4, normalize, grad, "eager")
    inputs = [t.float().requires_grad_() for t in (tokens64, w64, b64)]
    out, grads = run(*inputs, 4, normalize, grad, "torch")
    assert _rel_err(out, want) < 1e-5
    for got, exp in zip(grads, want_grads):
        assert _rel_err(got, exp) < 1e-5


@pytest.mark.parametrize("normalize", [False, True])
def test_patch_pool_main_job_shape_single_chunk_matches_chunked_and_float64(normalize, monkeypatch):
    """The embedded trainer's 64x65x64 (no registers) is one chunk, computed without the chunk loop's copies; it
    agrees with the chunked path and with the float64 oracle."""
    g = torch.Generator().manual_seed(4)
    tokens64 = torch.randn(64, 65, 64, generator=g, dtype=torch.float64) * 1.5 + 0.3
    w64, b64 = torch.randn(64, generator=g, dtype=torch.float64) * 0.5 + 1, torch.randn(64, generator=g,
                                                                                        dtype=torch.float64)
    grad = torch.randn(64, 128, generator=g, dtype=torch.float64)
    inputs = [t.float().requires_grad_() for t in (tokens64, w64, b64)]
    assert len(ref_pooling._batch_chunks(inputs[0])) == 1
    out, grads = run(*inputs, 0, normalize, grad, "torch")
    want, want_grads = run(*exact_copies(*inputs), 0, normalize, grad, "eager")
    assert _rel_err(out, want) < 1e-6
    for got, exp in zip(grads, want_grads):
        assert _rel_err(got, exp) < 1e-5
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 10 * 65 * 64)  # chunks of 10 samples
    assert len(ref_pooling._batch_chunks(inputs[0])) == 7
    chunked, chunked_grads = run(*inputs, 0, normalize, grad, "torch")
    torch.testing.assert_close(chunked, out, rtol=1e-6, atol=1e-6)
    for got, exp in zip(chunked_grads, grads):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5 * float(exp.abs().max()))


def test_patch_pool_low_precision_and_errors():
    tokens = torch.randn(2, 10, 16)
    out = ops.patch_pool(tokens.bfloat16(), num_registers=4)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 32)
    with pytest.raises(ValueError, match="no patch"):
        ops.patch_pool(tokens[:, :5], num_registers=4)
    with pytest.raises(ValueError, match="ln_weight"):
        ops.patch_pool(tokens, num_registers=4, ln_weight=torch.ones(15))
    with pytest.raises(ValueError, match="without ln_weight"):
        ops.patch_pool(tokens, num_registers=4, ln_bias=torch.ones(16))
    with pytest.raises(ValueError, match="num_registers"):
        ops.patch_pool(tokens, num_registers=-1)


def test_patch_pool_with_low_precision_tokens_and_fp32_layernorm():
    # what autocast training produces: bf16 tokens, fp32 LayerNorm parameters (gradients in their own dtype)
    tokens = torch.randn(3, 11, 16, dtype=torch.bfloat16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    opcheck(torch.ops.dinotxt_fast.patch_pool_fwd.default, (tokens, 4, w, b, 1e-5, True, "torch"))
    out = ops.patch_pool(tokens, num_registers=4, ln_weight=w, ln_bias=b)
    d_tokens, d_w, d_b = torch.autograd.grad(out.float().sum(), (tokens, w, b))
    assert (d_tokens.dtype, d_w.dtype, d_b.dtype) == (torch.bfloat16, torch.float32, torch.float32)


# ------------------------------------------------------------------------------------------- interpreter (CPU)
@needs_triton
@pytest.mark.parametrize("b,p,d", [(3, 7, 24), (1, 77, 100)])
@pytest.mark.parametrize("r", [0, 4])
@pytest.mark.parametrize("ln", [None, "weight", "weight+bias"])
@pytest.mark.parametrize("normalize", [False, True])
def test_triton_pool_matches_float64(b, p, d, r, ln, normalize):
    (tokens, w, bias), _, grad = make_inputs(b, 1 + r + p, d, ln)
    out, grads = run(tokens, w, bias, r, normalize, grad, "triton")
    want, want_grads = run(*exact_copies(tokens, w, bias), r, normalize, grad, "eager")
    assert out.dtype == torch.float32 and out.shape == (b, 2 * d) and out.is_contiguous()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, want_grads):
        assert got.dtype == torch.float32 and got.shape == exp.shape
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5 * float(exp.abs().max()))
    if r:
        assert grads[0][:, 1:1 + r].abs().max() == 0  # registers get exactly zero gradient


@needs_triton
@pytest.mark.parametrize("ln,normalize", [(None, False), ("weight+bias", True)])
def test_triton_pool_fp16_within_twice_pytorch_error(ln, normalize):
    r, d = 4, 100
    (tokens, w, bias), _, grad = make_inputs(2, 1 + r + 77, d, ln, dtype=torch.float16)
    want, want_grads = run(*exact_copies(tokens, w, bias), r, normalize, grad, "eager")
    out, grads = run(tokens, w, bias, r, normalize, grad, "triton")
    ref, ref_grads = run(tokens, w, bias, r, normalize, grad, "eager")  # PyTorch, in fp16
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    assert _rel_err(out, want) <= 2 * _rel_err(ref, want)
    for got, torch_fp16, exp in zip(grads, ref_grads, want_grads):
        assert _rel_err(got, exp) <= 2 * _rel_err(torch_fp16, exp)


@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_pool_strided_tokens_equal_contiguous(backend):
    b, n, d, r = 2, 1 + 4 + 37, 24, 4
    wide = torch.randn(b, n, d + 8)
    views = [wide[:, :, 3:3 + d], torch.randn(b, d, n).transpose(1, 2)]  # row stride != D; unit stride != 1
    w, bias = torch.randn(d), torch.randn(d)
    for view in views:
        assert not view.is_contiguous()
        got = ops.patch_pool(view, num_registers=r, ln_weight=w, ln_bias=bias, normalize=True, backend=backend)
        want = ops.patch_pool(view.contiguous(), num_registers=r, ln_weight=w, ln_bias=bias, normalize=True,
                              backend=backend)
        assert torch.equal(got, want)


def test_triton_pool_backward_is_deterministic_and_splits_agree(monkeypatch):
    tpool = kernel_module("triton", "pooling")
    (tokens, w, bias), _, grad = make_inputs(1, 1 + 4 + 77, 40, "weight+bias")
    first = run(tokens, w, bias, 4, True, grad, "triton")
    again = run(tokens, w, bias, 4, True, grad, "triton")
    for a, e in zip([first[0], *first[1]], [again[0], *again[1]]):
        assert torch.equal(a, e)
    # one split per image (the large-batch GPU regime) gives the same values up to rounding
    monkeypatch.setattr(tpool, "row_splits", lambda batch, rows, device: (1, rows))
    single = run(tokens, w, bias, 4, True, grad, "triton")
    for a, e in zip([first[0], *first[1]], [single[0], *single[1]]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_pool_under_torch_compile(backend):
    torch._dynamo.reset()
    (tokens, w, bias), _, grad = make_inputs(2, 1 + 4 + 9, 16, "weight+bias")

    def f(x, w, b):
        return ops.patch_pool(x, num_registers=4, ln_weight=w, ln_bias=b, normalize=True, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(tokens, w, bias)
    want = f(tokens, w, bias)
    assert torch.equal(got, want)
    for a, e in zip(torch.autograd.grad(got, (tokens, w, bias), grad.float()),
                    torch.autograd.grad(want, (tokens, w, bias), grad.float())):
        assert torch.equal(a, e)


@needs_triton
def test_autotune_keys_do_not_depend_on_the_batch():
    """The rows per split change with the batch size (planning.row_splits): keyed on them, every tail batch of an
    epoch would re-run the autotuner. The keys hold the image's rows instead."""
    tpool = kernel_module("triton", "pooling")
    assert tpool._pool_partial.keys == ["D", "n_rows", "HAS_LN"]
    assert tpool._pool_backward.keys == ["D", "n_tokens", "HAS_LN"]
    assert row_splits(3, 256, torch.device("cpu")) != row_splits(1024, 256, torch.device("cpu"))


@needs_triton
def test_triton_pool_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.patch_pool(torch.randn(1, 3, 8, dtype=torch.float64), num_registers=0, backend="triton")
    with pytest.raises(ValueError, match="D must be <= 4096"):
        ops.patch_pool(torch.randn(1, 3, 4097), num_registers=0, backend="triton")
    with pytest.raises(ValueError, match="non-empty"):
        ops.patch_pool(torch.randn(0, 3, 8), num_registers=0, backend="triton")


def test_row_splits_partition_the_rows():
    for batch, rows in [(1, 1), (1, 77), (2, 261), (3, 5), (1024, 261)]:
        splits, per = row_splits(batch, rows, torch.device("cpu"))
        assert splits >= 1 and splits * per >= rows and (splits - 1) * per < rows


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("ln,normalize", [proving(None, False), ("weight", False), proving("weight+bias", True)])
def test_gpu_pool_real_shapes_bf16(backend, ln, normalize):
    """B=64, N=1+4+256, D=1024 in bf16 (LayerNorm parameters too): no worse than 2x PyTorch's bf16 error."""
    require(backend, "patch_pool")
    r, d = 4, 1024
    (tokens, w, bias), _, grad = make_inputs(64, 1 + r + 256, d, ln, dtype=torch.bfloat16, device="cuda")
    want, want_grads = run(*exact_copies(tokens, w, bias), r, normalize, grad, "eager")
    ref, ref_grads = run(tokens, w, bias, r, normalize, grad, "eager")
    out, grads = run(tokens, w, bias, r, normalize, grad, backend)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, want) <= 2 * _rel_err(ref, want)
    for got, torch_bf16, exp in zip(grads, ref_grads, want_grads):
        assert _rel_err(got, exp) <= 2 * _rel_err(torch_bf16, exp)
    assert grads[0][:, 1:1 + r].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype,b,p,d,r", [
    proving(dtype, *shape) if (dtype, shape) in ((torch.float32, (1, 261, 102, 4)), (torch.float16, (3, 1029, 1536, 4)))
    else (dtype, *shape)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for shape in ((5, 77, 24, 0), (1, 261, 102, 4), (3, 1029, 1536, 4), (7, 1, 1000, 4))])
def test_gpu_pool_odd_shapes(backend, dtype, b, p, d, r):
    """Odd sizes: D not a multiple of 4 (scalar loads), D = 1536, one patch, a B that leaves SMs idle."""
    require(backend, "patch_pool")
    for ln, normalize in ((None, True), ("weight+bias", False), ("weight+bias", True)):
        (tokens, w, bias), _, grad = make_inputs(b, 1 + r + p, d, ln, dtype=dtype, device="cuda")
        want = run(*exact_copies(tokens, w, bias), r, normalize, grad, "eager")
        got = run(tokens, w, bias, r, normalize, grad, backend)
        ref = run(tokens, w, bias, r, normalize, grad, "eager")  # PyTorch in this dtype
        for i, (g, e, t) in enumerate(zip([got[0], *got[1]], [want[0], *want[1]], [ref[0], *ref[1]])):
            limit = 1e-5 if dtype == torch.float32 else 2 * _rel_err(t, e)
            assert _rel_err(g, e) <= limit, (ln, normalize, i)


@pytest.mark.gpu
def test_gpu_pool_backends_agree_and_compile():
    (tokens, w, bias), _, grad = make_inputs(16, 1 + 4 + 256, 768, "weight+bias", device="cuda")
    results = {}
    for backend in available("patch_pool"):
        torch._dynamo.reset()
        f = torch.compile(lambda x, w, b, backend=backend: ops.patch_pool(x, num_registers=4, ln_weight=w, ln_bias=b,
                                                                           normalize=True, backend=backend),
                          fullgraph=True)
        out = f(tokens, w, bias)
        results[backend] = (out, *torch.autograd.grad(out, (tokens, w, bias), grad.float()))
    want = run(tokens, w, bias, 4, True, grad, "torch")
    for backend, got in results.items():
        for a, e in zip(got, [want[0], *want[1]]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))

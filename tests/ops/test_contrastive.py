"""The contrastive loss family: the reference (torch backend) against float64 oracles, through the shared tiled
driver with many chunks; the Triton kernels under the CPU interpreter against the same oracles (odd shapes, several
chunks and panels, poisoned outputs, determinism) and compiled ahead of time for sm_80 / sm_90; the partial
(distributed) kernel contract; bf16 tests of the Triton and CUDA kernels at real shapes on a GPU (marked `gpu`).
The distributed op is in test_contrastive_distributed.py, the nn module in tests/nn/test_contrastive_module.py."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from dinotxt_fast import ops
from dinotxt_fast.ops import contrastive_tiles, dispatch
from dinotxt_fast.ops.reference import common
from dinotxt_fast.ops.reference import contrastive as ref_contrastive

from .backends import PROVE, TORCH_AND_TRITON, kernel_module, needs_triton, proving, require
from .oracles import features, oracle

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF_KERNELS = ref_contrastive.KERNELS


@pytest.fixture
def tc():
    return kernel_module("triton", "contrastive")


# ------------------------------------------------------------------------------------------------ oracles
def partial_oracle(img, txt_n, logit_scale, normalize, offset, row_coef, col_coef):
    """The partial kernels' contract as a plain-autograd scalar: its gradients are (d_img, g_txt, d_logit_scale) for
    txt_n = the (normalised) columns, and its pieces the forward's (lse_rows, lse_cols, diag)."""
    i = F.normalize(img, dim=-1) if normalize else img
    s = logit_scale.exp() * i @ txt_n.T
    rows = torch.arange(img.shape[0], device=img.device)
    lse_rows, lse_cols, diag = s.logsumexp(1), s.logsumexp(0), s[rows, rows + offset]
    value = (row_coef * (lse_rows - diag)).sum() + (col_coef * lse_cols).sum() - (col_coef[rows + offset] * diag).sum()
    return value, (lse_rows, lse_cols, diag)


def loss_and_grads(fn, img, txt, scale, dtype, **kw):
    i, t = (x.detach().to(dtype).requires_grad_(True) for x in (img, txt))
    s = scale.detach().to(torch.float32 if dtype != torch.float64 else dtype).requires_grad_(True)
    loss = fn(i, t, s, **kw)
    loss.backward()
    return loss.detach().double(), [g.double() for g in (i.grad, t.grad, s.grad)]


def max_err(got, want):
    return (got.double() - want.double()).abs().max().item()


def assert_rel(got, want, rel, floor=1e-7):
    """max |got - want| <= rel * max |want| + floor (gradients of a 1-row batch are exactly 0)."""
    err, size = max_err(got, want), want.abs().max().item()
    assert err <= rel * size + floor, f"error {err:.3g} vs magnitude {size:.3g} (allowed relative {rel})"


def _coefficients(m, n, offset):
    g = torch.Generator().manual_seed(m + n + offset)
    return torch.rand(m, generator=g, dtype=torch.float64) - 0.3, torch.rand(n, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ reference (torch backend), float64
@pytest.mark.parametrize("b,e", [(1, 64), (7, 130), (129, 64)])
@pytest.mark.parametrize("normalize", [True, False])
def test_contrastive_matches_float64_oracle(b, e, normalize):
    img = torch.randn(b, e, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(b, e, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.3 if normalize else -1.0, dtype=torch.float64, requires_grad=True)
    loss = ops.contrastive_loss(img, txt, scale, normalize=normalize)
    want = oracle(img, txt, scale, normalize)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for got, exp in zip(torch.autograd.grad(loss, (img, txt, scale)), torch.autograd.grad(want, (img, txt, scale))):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)


def test_contrastive_fp32_and_bf16_inputs_accumulate_in_fp32():
    img, txt = torch.randn(33, 64, dtype=torch.float64), torch.randn(33, 64, dtype=torch.float64)
    scale = torch.tensor(4.0, dtype=torch.float64)
    want = oracle(img, txt, scale, True)
    loss32 = ops.contrastive_loss(img.float(), txt.float(), scale.float())
    assert loss32.dtype == torch.float32
    assert abs(loss32.item() - want.item()) / want.item() < 1e-5
    loss16 = ops.contrastive_loss(img.bfloat16(), txt.bfloat16(), scale.float())
    assert loss16.dtype == torch.float32 and abs(loss16.item() - want.item()) / want.item() < 2e-2


def test_contrastive_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same"):
        ops.contrastive_loss(x, x[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="logit_scale"):
        ops.contrastive_loss(x, x, torch.ones(2))
    with pytest.raises(TypeError, match="dtype"):
        ops.contrastive_loss(x, x.double(), torch.tensor(1.0))


@pytest.mark.parametrize("normalize", [True, False])
def test_torch_tiled_driver_with_many_chunks_matches_oracle(normalize, monkeypatch):
    # 7 columns per chunk and panel: the driver's merges and panel loop, in float64 to 1e-10.
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 31 * 7)
    img, txt = features(31, 20)
    scale = torch.tensor(1.1, dtype=torch.float64)
    want, want_grads = loss_and_grads(oracle, img, txt, scale, torch.float64, normalize=normalize)
    loss, grads = loss_and_grads(ops.contrastive_loss, img, txt, scale, torch.float64, normalize=normalize,
                                 backend="torch")
    assert_rel(loss, want, 1e-12, floor=0)
    for got, exp in zip(grads, want_grads):
        assert_rel(got, exp, 1e-10, floor=1e-14)


def test_torch_partial_kernels_match_oracle(monkeypatch):
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 9 * 10)
    m, n, e, offset = 9, 40, 12, 31
    img, txt = torch.randn(m, e, dtype=torch.float64), torch.randn(n, e, dtype=torch.float64)
    scale = torch.tensor(0.7, dtype=torch.float64)
    row_coef, col_coef = _coefficients(m, n, offset)
    i, s, t_n = img.clone().requires_grad_(True), scale.clone().requires_grad_(True), F.normalize(txt, dim=-1)
    t_n.requires_grad_(True)
    value, pieces = partial_oracle(i, t_n, s, True, offset, row_coef, col_coef)
    want = torch.autograd.grad(value, (i, t_n, s))
    got = REF_KERNELS["contrastive_partial_forward"](img, txt, scale, True, offset)
    for g, w in zip(got, pieces):
        torch.testing.assert_close(g, w.detach(), rtol=1e-12, atol=1e-12)
    grads = REF_KERNELS["contrastive_partial_backward"](img, txt, scale, got[0], got[1], row_coef, col_coef, True,
                                                        offset)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="diag_offset"):
        REF_KERNELS["contrastive_partial_forward"](img, txt, scale, True, n - m + 1)


def test_small_problems_take_the_direct_path(monkeypatch):
    """The embedded trainer's B = 64, E = 128 takes the direct path (forward and backward); a batch whose logits
    exceed DIRECT_ELEMENTS takes the tile driver."""
    calls = []
    for name, fn in list(ref_contrastive._DIRECT_KERNELS.items()):
        monkeypatch.setitem(ref_contrastive._DIRECT_KERNELS, name,
                            lambda *args, _fn=fn, _name=name: calls.append(_name) or _fn(*args))
    for b, e, direct in ((64, 128, True), (257, 8, False)):
        calls.clear()
        img, txt = torch.randn(b, e, requires_grad=True), torch.randn(b, e, requires_grad=True)
        assert ref_contrastive.takes_direct_path(img, txt) == direct
        loss = ops.contrastive_loss(img, txt, torch.tensor(2.6592, requires_grad=True), backend="torch")
        loss.backward()
        assert calls == (["contrastive_forward", "contrastive_backward"] if direct else [])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_direct_path_matches_the_tiled_path_and_the_oracle(normalize, dtype):
    """At the main job's shape both paths apply: the direct kernels against the tile driver's (same outputs) and
    the loss and gradients against the float64 oracle."""
    img, txt = features(64, 128)
    img, txt = img.to(dtype), txt.to(dtype)
    img[5] *= 1e-14  # a row below the norm clamp: the normalisation backward's clamped branch
    scale = torch.tensor(2.6592, dtype=dtype)
    tiled = ref_contrastive._CPU_KERNELS
    assert ref_contrastive.takes_direct_path(img, txt)
    exact = 1e-12 if dtype == torch.float64 else 2e-6
    got = ref_contrastive.direct_forward(img, txt, scale, normalize)
    want = tiled["contrastive_forward"](img, txt, scale, normalize)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_rel(g, w, exact, floor=0)
    grad = torch.tensor(0.7, dtype=dtype)
    got = ref_contrastive.direct_backward(grad, img, txt, scale, want[1], want[2], normalize)
    want = tiled["contrastive_backward"](grad, img, txt, scale, want[1], want[2], normalize)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_rel(g, w, 10 * exact, floor=1e-14 if dtype == torch.float64 else 1e-9)
    oracle_loss, oracle_grads = loss_and_grads(oracle, img.double(), txt.double(), scale.double(), torch.float64,
                                               normalize=normalize)
    loss, grads = loss_and_grads(ops.contrastive_loss, img, txt, scale, dtype, normalize=normalize, backend="torch")
    assert_rel(loss, oracle_loss, exact, floor=0)
    for g, w in zip(grads, oracle_grads):
        assert_rel(g, w, 10 * exact, floor=1e-14 if dtype == torch.float64 else 1e-9)


@pytest.mark.parametrize("normalize", [True, False])
def test_direct_partial_kernels_match_oracle(normalize):
    """The partial (distributed) kernels on the direct path: rows against more columns, a diagonal offset, and
    per-row / per-column coefficients, in float64."""
    m, n, e, offset = 9, 40, 12, 31
    img, txt = torch.randn(m, e, dtype=torch.float64), torch.randn(n, e, dtype=torch.float64)
    assert ref_contrastive.takes_direct_path(img, txt)
    scale = torch.tensor(0.7, dtype=torch.float64)
    row_coef, col_coef = _coefficients(m, n, offset)
    i, s = img.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    t_n = (F.normalize(txt, dim=-1) if normalize else txt.clone()).requires_grad_(True)
    value, pieces = partial_oracle(i, t_n, s, normalize, offset, row_coef, col_coef)
    want = torch.autograd.grad(value, (i, t_n, s))
    got = REF_KERNELS["contrastive_partial_forward"](img, txt, scale, normalize, offset)
    for g, w in zip(got, pieces):
        torch.testing.assert_close(g, w.detach(), rtol=1e-12, atol=1e-12)
    grads = REF_KERNELS["contrastive_partial_backward"](img, txt, scale, got[0], got[1], row_coef, col_coef,
                                                        normalize, offset)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="diag_offset"):
        REF_KERNELS["contrastive_partial_forward"](img, txt, scale, normalize, n - m + 1)


def test_torch_tiles_are_bounded_on_a_cpu():
    """The reference's logits tiles hold at most common.chunk_elements(device) values: O(B) memory at B = 8192."""
    tiles = ref_contrastive.TorchTiles(cpu=True)
    for m, n in ((8192, 8192), (3, 10), (5_000_000, 7)):
        rows, cols = tiles.chunks(m, n)
        assert rows * cols <= max(common.chunk_elements("cpu"), cols) and 1 <= cols <= n and 1 <= rows <= m
    assert tiles.chunks(8192, 8192) == (8192, common.chunk_elements("cpu") // 8192)


def test_in_place_normalize_backward_matches_the_reference_formula():
    """The driver-temporary version (g / n - x (g . x) / n^3, in g's memory) against contrastive_normalize_backward,
    with a zero row and a row below the norm clamp."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)
    x[2] = 0
    x[4] *= 1e-14  # norm below NORM_EPS: the clamped branch
    grad = torch.randn(6, 40, generator=g, dtype=torch.float64)
    want = ref_contrastive.contrastive_normalize_backward(grad, x, True)
    got = ref_contrastive._normalize_backward_into(grad.clone(), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_partial_ops_registration():
    # No autograd formula on purpose: the partial ops run inside ContrastiveDistributed's forward and backward.
    img, txt = torch.randn(3, 8), torch.randn(7, 8)
    scale = torch.tensor(0.5)
    opcheck(torch.ops.dinotxt_fast.contrastive_partial_fwd.default, (img, txt, scale, True, 2, "torch"))
    lse_r, lse_c, _ = REF_KERNELS["contrastive_partial_forward"](img, txt, scale, True, 2)
    opcheck(torch.ops.dinotxt_fast.contrastive_partial_bwd.default,
            (img, txt, scale, lse_r, lse_c, torch.full((3,), 0.1), torch.full((7,), 0.2), True, 2, "torch"))
    assert dispatch.FAMILIES["contrastive_loss"][2:] == ("contrastive_partial_forward", "contrastive_partial_backward")


# ------------------------------------------------------------------------------ Triton under the interpreter
@needs_triton
@pytest.mark.parametrize("b", [1, 7, 129])
@pytest.mark.parametrize("e", [64, 130])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_fp32_matches_float64_oracle(b, e, normalize):
    img, txt = features(b, e, scale=1.0 if normalize else 0.2)
    scale = torch.tensor(math.log(1 / 0.07) if normalize else -0.5, dtype=torch.float64)
    want, want_grads = loss_and_grads(oracle, img, txt, scale, torch.float64, normalize=normalize)
    loss, grads = loss_and_grads(ops.contrastive_loss, img, txt, scale, torch.float32, normalize=normalize,
                                 backend="triton")
    assert_rel(loss, want, 1e-5)
    for got, exp in zip(grads, want_grads):
        assert_rel(got, exp, 1e-5)


@needs_triton
def test_kernel_backends_refuse_fp16_with_the_reason():
    # One near-zero row in fp16 would underflow the other rows' pre-scaled dS (contrastive_tiles.TILED_FP16_REASON):
    # refused.
    img, txt = features(7, 64)
    with pytest.raises(ValueError, match="fp16 is not taken"):
        ops.contrastive_loss(img.half(), txt.half(), torch.tensor(2.0), backend="triton")
    assert ops.contrastive_loss(img.half(), txt.half(), torch.tensor(2.0)).isfinite()  # auto: the reference


@needs_triton
def test_triton_large_logits_stay_finite():
    # Unnormalised features with logits of a few hundred: exp overflows fp32 without the running max.
    img, txt = features(33, 40, scale=4.0)
    scale = torch.tensor(0.0, dtype=torch.float64)
    assert (img @ txt.T).abs().max() > 500
    want, want_grads = loss_and_grads(oracle, img, txt, scale, torch.float64, normalize=False)
    loss, grads = loss_and_grads(ops.contrastive_loss, img, txt, scale, torch.float32, normalize=False,
                                 backend="triton")
    assert torch.isfinite(loss)
    assert_rel(loss, want, 1e-5)
    for got, exp in zip(grads, want_grads):
        assert_rel(got, exp, 1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_triton_partial_kernels_match_oracle_across_panels(normalize, monkeypatch, tc):
    # 45 local rows against 161 columns with the positives at offset 77, dS in panels of 64 columns (3 panels; the
    # last one partial), non-uniform coefficients (ranks whose losses are scaled differently), one zero image row.
    m, n, e, offset = 45, 161, 70, 77
    monkeypatch.setattr(tc.TILES, "panel_bytes", m * 64 * 4)
    img, txt = torch.randn(m, e, dtype=torch.float64), torch.randn(n, e, dtype=torch.float64)
    if normalize:
        img[3] = 0.0
    scale = torch.tensor(1.7, dtype=torch.float64)
    row_coef, col_coef = _coefficients(m, n, offset)
    i, s = img.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    t_n = (F.normalize(txt, dim=-1) if normalize else txt).requires_grad_(True)
    value, pieces = partial_oracle(i, t_n, s, normalize, offset, row_coef, col_coef)
    want = torch.autograd.grad(value, (i, t_n, s))

    img32, txt32, scale32 = img.float(), txt.float(), scale.float()
    got = tc.KERNELS["contrastive_partial_forward"](img32, txt32, scale32, normalize, offset)
    assert [g.dtype for g in got] == [torch.float64, torch.float64, torch.float32]
    for g, w in zip(got, pieces):
        assert g.is_contiguous()
        assert_rel(g, w.detach(), 1e-5)
    grads = tc.KERNELS["contrastive_partial_backward"](img32, txt32, scale32, got[0], got[1], row_coef.float(),
                                                       col_coef.float(), normalize, offset)
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float32 and grads[2].shape == ()
    for g, w in zip(grads, want):
        assert_rel(g, w, 1e-5)


@pytest.mark.parametrize("target", [1, 4, 10**6])
def test_ds_panels_cut_into_parts_give_the_same_gradients(target, monkeypatch, tc):
    """Too few (row chunk, column chunk) pairs to fill the GPU (B_local = 32768 on 132 SMs: 32) are cut into parts
    (planning.ds_parts) whose dS * s partial sums are folded per chunk: the same gradients, and the logit-scale
    gradient within fp32 rounding of the uncut one, whatever the target."""
    m, n, e, offset = 45, 161, 70, 77
    monkeypatch.setattr(tc.TILES, "panel_bytes", m * 64 * 4)  # 3 panels of 64 columns
    img, txt = torch.randn(m, e), torch.randn(n, e)
    scale = torch.tensor(1.7)
    row_coef, col_coef = (c.float() for c in _coefficients(m, n, offset))
    lse_rows, lse_cols, _ = tc.KERNELS["contrastive_partial_forward"](img, txt, scale, True, offset)
    runs = {}
    for fill in (1, target):
        monkeypatch.setattr(tc, "fill_target", lambda device, fill=fill: fill)
        runs[fill] = tc.KERNELS["contrastive_partial_backward"](img, txt, scale, lse_rows, lse_cols, row_coef,
                                                                col_coef, True, offset)
    parts = tc.ds_parts(1, 1, tc.CHUNK_UNIT, tc.CHUNK_UNIT, tc.PART_UNIT, target)
    assert (parts != (1, 1)) == (target > 1)
    for cut, whole in zip(runs[target][:2], runs[1][:2]):
        assert torch.equal(cut, whole)
    torch.testing.assert_close(runs[target][2], runs[1][2], rtol=1e-6, atol=1e-7)


def test_gemm_autotune_key_tells_accumulation_apart(tc):
    """A tile tuned on a plain write is not reused for a read-modify-write (another code path, other spills)."""
    assert "ACCUMULATE" in tc._gemm_kernel.keys


def test_triton_primitives_write_every_output_element(poison, tc):
    m, n, e, offset = 70, 133, 37, 50
    img, txt = torch.randn(m, e), torch.randn(n, e)
    scale = torch.tensor(2.0)
    tiles = tc.TILES
    inv_i, norm_i = tiles.row_norms(img, True)
    inv_t, _ = tiles.row_norms(txt, True)
    assert torch.isfinite(inv_i).all() and torch.isfinite(norm_i).all()
    rc, cc = tiles.chunks(m, n)
    assert (rc, cc) == (tc.CHUNK_UNIT, tc.CHUNK_UNIT)  # several chunks both ways at this size
    nan = float("nan")
    row_max, row_sum = torch.full((-(-n // cc), m), nan), torch.full((-(-n // cc), m), nan)
    col_max, col_sum = torch.full((-(-m // rc), n), nan), torch.full((-(-m // rc), n), nan)
    diag = torch.full((m,), nan)
    tiles.forward_tiles(img, txt, inv_i, inv_t, scale, offset, rc, cc, row_max, row_sum, col_max, col_sum, diag)
    for t in (row_max, row_sum, col_max, col_sum, diag):
        assert torch.isfinite(t).all()
    lse_rows, lse_cols = contrastive_tiles.merge_lse(row_max, row_sum), contrastive_tiles.merge_lse(col_max, col_sum)
    ds = torch.full((m, 2 * cc + 10), nan)  # a panel view narrower than its buffer
    panel = ds[:, :2 * cc]
    ds_dot_s = torch.full((-(-m // rc), -(-n // cc)), nan)
    coef = torch.full((n,), 0.01)
    tiles.ds_tiles(img, txt, inv_i, inv_t, scale, lse_rows, lse_cols, coef[:m].contiguous(), coef, torch.ones(1),
                   offset, 0, 2 * cc, rc, cc, panel, ds_dot_s)
    assert torch.isfinite(panel).all() and ds[:, 2 * cc:].isnan().all()
    assert torch.isfinite(ds_dot_s[:, :2]).all() and ds_dot_s[:, 2:].isnan().all()
    c = torch.full((m, e), nan)
    tiles.gemm(panel, txt[:2 * cc], c, torch.ones(1), torch.ones(m), accumulate=False)
    torch.testing.assert_close(c, panel @ txt[:2 * cc], rtol=1e-5, atol=1e-5)
    c_t = torch.full((2 * cc, e), nan)
    tiles.gemm(panel.T, img, c_t, torch.full((1,), 0.5), norm_i.new_ones(2 * cc), accumulate=False)
    torch.testing.assert_close(c_t, 0.5 * panel.T @ img, rtol=1e-5, atol=1e-5)
    for normalize in (True, False):
        out = tiles.normalize_backward(c, img, normalize)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref_contrastive.contrastive_normalize_backward(c, img, normalize),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_backward_is_deterministic(backend):
    img, txt = features(77, 48)
    runs = []
    for _ in range(2):
        i, t = img.float().requires_grad_(True), txt.float().requires_grad_(True)
        s = torch.tensor(2.0, requires_grad=True)
        ops.contrastive_loss(i, t, s, backend=backend).backward()
        runs.append((i.grad, t.grad, s.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_triton
def test_triton_rejects_float64_clearly():
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        ops.contrastive_loss(x, x, torch.tensor(1.0, dtype=torch.float64), backend="triton")


_COMPILE_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dinotxt_fast.ops.triton.contrastive as tc

def build(kernel, types, constexprs, cap):
    while hasattr(kernel, "configs") or not hasattr(kernel, "arg_names"):
        kernel = kernel.fn  # through the autotuner
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                   target=GPUTarget("cuda", cap, 32), options={"num_warps": 4, "num_stages": 2})

for cap, dt, prec in ((90, "bf16", "tf32"), (80, "fp32", "ieee")):
    tiles = dict(INPUT_PRECISION=prec, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    f32 = "*fp32"
    build(tc._forward_kernel, dict(img_ptr="*" + dt, txt_ptr="*" + dt, inv_i_ptr=f32, inv_t_ptr=f32, scale_ptr=f32,
                                   row_max_ptr=f32, row_sum_ptr=f32, col_max_ptr=f32, col_sum_ptr=f32, diag_ptr=f32),
          tiles, cap)
    build(tc._ds_kernel, dict(img_ptr="*" + dt, txt_ptr="*" + dt, inv_i_ptr=f32, inv_t_ptr=f32, scale_ptr=f32,
                              lse_rows_ptr="*fp64", lse_cols_ptr="*fp64", row_coef_ptr=f32, col_coef_ptr=f32,
                              inv_kappa_ptr=f32, ds_ptr="*" + dt, ds_dot_s_ptr=f32), tiles, cap)
    build(tc._gemm_kernel, dict(a_ptr="*" + dt, b_ptr="*" + dt, c_ptr=f32, alpha_ptr=f32, row_scale_ptr=f32),
          dict(tiles, ACCUMULATE=True, GROUP_M=8), cap)
    build(tc._normalize_backward_kernel, dict(g_ptr=f32, x_ptr="*" + dt, out_ptr="*" + dt),
          dict(NORMALIZE=True, BLOCK_E=256), cap)
    build(tc._row_norms_kernel, dict(x_ptr="*" + dt, inv_ptr=f32, norm_ptr=f32), dict(BLOCK_R=16, BLOCK_E=256), cap)
print("compiled")
"""


@needs_triton
def test_triton_kernels_compile_for_real_gpus():
    """The interpreter accepts things the GPU compiler rejects (non-constexpr globals, dot shapes, dtypes): compile
    every kernel ahead of time for sm_90 (bf16) and sm_80 (fp32) with Triton's bundled ptxas; no GPU needed."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------ GPU
GPU_BACKENDS = ["triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("b,e,dtype", [proving(129, 130, torch.float32), (77, 64, torch.float32),
                                       proving(1, 64, torch.bfloat16)])
def test_gpu_odd_shapes(backend, b, e, dtype):
    require(backend, "contrastive_loss")
    img, txt = features(b, e, device="cuda")
    scale = torch.tensor(2.5, dtype=torch.float64, device="cuda")
    want, want_grads = loss_and_grads(oracle, img, txt, scale, torch.float64, normalize=True)
    base, base_grads = loss_and_grads(lambda i, t, s, normalize: oracle(i, t, s.to(i.dtype), normalize), img, txt,
                                      scale, dtype, normalize=True)
    loss, grads = loss_and_grads(ops.contrastive_loss, img, txt, scale, dtype, backend=backend)
    if dtype == torch.float32:
        assert_rel(loss, want, 1e-5)
        for got, exp in zip(grads, want_grads):
            assert_rel(got, exp, 1e-5)
    else:
        assert max_err(loss, want) <= 2 * max_err(base, want) + 1e-6
        for got, ref, exp in zip(grads, base_grads, want_grads):
            assert max_err(got, exp) <= 2 * max_err(ref, exp) + 1e-6


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bf16_real_batch(backend):
    require(backend, "contrastive_loss")
    b, e = 4099, 2048
    img, txt = features(b, e, device="cuda")
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, device="cuda")
    want, want_grads = loss_and_grads(oracle, img, txt, scale, torch.float64, normalize=True)
    base, base_grads = loss_and_grads(lambda i, t, s, normalize: oracle(i, t, s.bfloat16(), normalize), img, txt,
                                      scale, torch.bfloat16, normalize=True)
    loss, grads = loss_and_grads(ops.contrastive_loss, img, txt, scale, torch.bfloat16, backend=backend)
    assert max_err(loss, want) <= 2 * max_err(base, want)
    for got, ref, exp in zip(grads, base_grads, want_grads):
        assert max_err(got, exp) <= 2 * max_err(ref, exp)


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_partial_32k_columns_accuracy_and_memory(backend):
    """One rank of an 8-GPU global batch of 32768: 4096 local rows against 32768 columns, E = 2048, bf16."""
    require(backend, "contrastive_loss")
    m, n, e, offset = 4096, 32768, 2048, 3 * 4096
    kernels = dispatch.registered()[backend].kernels
    g = torch.Generator(device="cuda").manual_seed(0)
    img = torch.randn(m, e, device="cuda", generator=g, dtype=torch.bfloat16)
    txt = torch.randn(n, e, device="cuda", generator=g, dtype=torch.bfloat16)
    txt[offset:offset + m] += 0.6 * img
    scale = torch.tensor(math.log(1 / 0.07), device="cuda")
    row_coef = torch.full((m,), 0.5 / m, device="cuda")
    col_coef = torch.full((n,), 0.5 / m, device="cuda")

    def run():
        lse_r, lse_c, diag = kernels["contrastive_partial_forward"](img, txt, scale, True, offset)
        return (lse_r, lse_c, diag), kernels["contrastive_partial_backward"](img, txt, scale, lse_r, lse_c, row_coef,
                                                                          col_coef, True, offset)

    run()  # compile / autotune first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fwd, bwd = run()
    torch.cuda.synchronize()
    outputs = sum(t.numel() * t.element_size() for t in (*fwd, *bwd))
    extra = torch.cuda.max_memory_allocated() - before - outputs
    assert extra < 200 * 2 ** 20, f"{extra / 2 ** 20:.0f} MiB beyond inputs and outputs"

    # float64 truth and PyTorch's bf16 computation of the same quantities (plain autograd, [m, n] logits).
    def reference_run(dtype):
        i = img.to(dtype).requires_grad_(True)
        t_n = F.normalize(txt.to(dtype), dim=-1).detach().requires_grad_(True)
        s = scale.to(dtype).requires_grad_(True)
        value, pieces = partial_oracle(i, t_n, s, True, offset, row_coef.to(dtype), col_coef.to(dtype))
        return [p.detach() for p in pieces], torch.autograd.grad(value, (i, t_n, s))

    truth, truth_grads = reference_run(torch.float64)
    base, base_grads = reference_run(torch.bfloat16)
    for got, ref, exp in zip((*fwd, *bwd), (*base, *base_grads), (*truth, *truth_grads)):
        assert max_err(got, exp) <= 2 * max_err(ref, exp)

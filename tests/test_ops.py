"""The ops layer: reference kernels against float64 autograd oracles, torch.library registration, dispatch."""
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.library import opcheck

from dinotxt_fast import ops
from dinotxt_fast.ops import dispatch, reference


# ------------------------------------------------------------------------------------------------ oracles
def attention_oracle(q, k, v, causal, scale=None):
    """Plain-autograd float64 attention on [B,N,H,Dh]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def pool_oracle(tokens, r, w, b, eps, normalize):
    x = F.layer_norm(tokens, tokens.shape[-1:], w, b, eps) if w is not None else tokens
    out = torch.cat([x[:, 0], x[:, 1 + r:].mean(1)], -1)
    return F.normalize(out, dim=-1) if normalize else out


def contrastive_oracle(img, txt, logit_scale, normalize):
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    s = logit_scale.exp() * img @ txt.T
    target = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


# -------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("n_q,n_k,h,dh,causal", [
    (1, 1, 1, 8, False), (1, 1, 1, 8, True), (5, 5, 3, 16, False), (5, 5, 3, 16, True),
    (77, 77, 2, 8, False), (77, 77, 2, 8, True), (7, 13, 2, 4, False),
])
def test_attention_matches_float64_oracle(n_q, n_k, h, dh, causal):
    b = 2
    q = torch.randn(b, n_q, h, dh, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, n_k, h, dh, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, n_k, h, dh, dtype=torch.float64, requires_grad=True)
    out, want = ops.attention(q, k, v, causal=causal), attention_oracle(q, k, v, causal)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for got, exp in zip(_grads(out, (q, k, v)), _grads(want, (q, k, v))):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


def test_attention_on_strided_qkv_views_and_low_precision():
    b, n, h, dh = 2, 261, 2, 16
    qkv64 = torch.randn(b, n, 3, h, dh, dtype=torch.float64)
    want = attention_oracle(*qkv64.unbind(2), causal=False)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, None)):
        qkv = qkv64.to(dtype)
        q, k, v = qkv.unbind(2)  # non-contiguous views
        assert not q.is_contiguous()
        out = ops.attention(q, k, v, scale=dh ** -0.5)
        assert out.dtype == dtype and out.shape == (b, n, h, dh) and out.is_contiguous()
        if tol is not None:
            torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
        else:  # low precision: no worse than 2x PyTorch's own bf16 SDPA error (DESIGN.md section 5)
            sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
            assert (out.double() - want).abs().max() <= 2 * (sdpa.double() - want).abs().max() + 1e-3


def test_attention_chunked_path_equals_unchunked(monkeypatch):
    q, k, v = (torch.randn(1, 37, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    full = ops.attention(q, k, v, causal=True)
    g_full = _grads(full, (q, k, v))
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * 37 * 5)  # 5 query rows a chunk
    chunked = ops.attention(q, k, v, causal=True)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    for a, b in zip(_grads(chunked, (q, k, v)), g_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [None, [0, 3, 9, 40]])
def test_inference_on_the_torch_backend_uses_sdpa_with_the_same_result(causal, lengths, monkeypatch):
    """Gradient-free calls on the torch backend run PyTorch's SDPA (on CUDA; forced here on the CPU): same o as the
    float64 reference, lengths as a key mask, zero rows for sequences that see no key, o in q's dtype."""
    monkeypatch.setattr(reference, "sdpa_forward_applies", lambda q: True)
    calls = []
    sdpa = reference.attention_forward_sdpa
    monkeypatch.setattr(reference, "attention_forward_sdpa", lambda *a: calls.append(1) or sdpa(*a))
    b, n, h, dh = 4, 9, 2, 8
    lens = None if lengths is None else torch.tensor(lengths)
    q, k, v = (torch.randn(b, n, h, dh, dtype=torch.float64) for _ in range(3))
    want = reference.attention_forward(q, k, v, causal, dh ** -0.5, lens)[0]  # the chunked float64 reference
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
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_torch_backend_inference_runs_sdpa(causal):
    """On CUDA the gradient-free torch backend is PyTorch's SDPA: bf16 error within 2x of SDPA's own (it is SDPA),
    lengths masked, zero rows for empty sequences."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q64, k64, v64 = (torch.randn(3, 261, 4, 64, device="cuda", dtype=torch.float64, generator=g) for _ in range(3))
    lens = torch.tensor([0, 100, 261], device="cuda")
    want = reference.attention_forward(q64, k64, v64, causal, 0.125, lens)[0]
    with torch.no_grad():
        got = ops.attention(q64.bfloat16(), k64.bfloat16(), v64.bfloat16(), causal=causal, lengths=lens)
    assert got.dtype == torch.bfloat16 and got.is_contiguous() and bool(torch.isfinite(got).all())
    assert got[0].abs().max() == 0
    assert (got.double() - want).abs().max() < 2e-2


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


# ------------------------------------------------------------------------------------------------ pooling
@pytest.mark.parametrize("r", [0, 4])
@pytest.mark.parametrize("ln", [None, "weight", "weight+bias"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_patch_pool_matches_float64_oracle(r, ln, normalize, chunked, monkeypatch):
    b, p, d = 3, 7, 24
    if chunked:  # the reference splits big batches: 2 samples per chunk here (chunks of 2 and 1)
        monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * (1 + r + p) * d)
        assert len(reference._batch_chunks(torch.empty(b, 1 + r + p, d))) == 2
    tokens = torch.randn(b, 1 + r + p, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, dtype=torch.float64, requires_grad=True) if ln else None
    bias = torch.randn(d, dtype=torch.float64, requires_grad=True) if ln == "weight+bias" else None
    out = ops.patch_pool(tokens, num_registers=r, ln_weight=w, ln_bias=bias, eps=1e-5, normalize=normalize)
    want = pool_oracle(tokens, r, w, bias, 1e-5, normalize)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (tokens, w, bias) if t is not None]
    grads = _grads(out, inputs)
    for got, exp in zip(grads, _grads(want, inputs)):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-9)
    if r:
        assert grads[0][:, 1:1 + r].abs().max() == 0  # registers get exactly zero gradient


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


# ------------------------------------------------------------------------------------------- contrastive
@pytest.mark.parametrize("b,e", [(1, 64), (7, 130), (129, 64)])
@pytest.mark.parametrize("normalize", [True, False])
def test_contrastive_matches_float64_oracle(b, e, normalize):
    img = torch.randn(b, e, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(b, e, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.3 if normalize else -1.0, dtype=torch.float64, requires_grad=True)
    loss = ops.contrastive_loss(img, txt, scale, normalize=normalize)
    want = contrastive_oracle(img, txt, scale, normalize)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for got, exp in zip(torch.autograd.grad(loss, (img, txt, scale)), torch.autograd.grad(want, (img, txt, scale))):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)


def test_contrastive_fp32_and_bf16_inputs_accumulate_in_fp32():
    img, txt = torch.randn(33, 64, dtype=torch.float64), torch.randn(33, 64, dtype=torch.float64)
    scale = torch.tensor(4.0, dtype=torch.float64)
    want = contrastive_oracle(img, txt, scale, True)
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, img, txt, scale, queue, done):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = slice(rank * img.shape[0] // world, (rank + 1) * img.shape[0] // world)
        i = img[rows].clone().requires_grad_(True)
        t = txt[rows].clone().requires_grad_(True)
        s = scale.clone().requires_grad_(True)
        loss = ops.contrastive_loss(i, t, s, group=dist.group.WORLD)
        loss.backward()
        # DDP averages parameter gradients over ranks: do the same for the logit scale.
        d_scale = s.grad.clone()
        dist.all_reduce(d_scale)
        queue.put((rank, loss.item(), i.grad, t.grad, d_scale / world))
        done.wait(120)  # the parent fetches the shared tensors from this process: stay alive until it has them
    finally:
        dist.destroy_process_group()


def test_contrastive_distributed_gloo_equals_single_process():
    world, b, e = 2, 10, 16
    img, txt = torch.randn(b, e, dtype=torch.float64), torch.randn(b, e, dtype=torch.float64)
    scale = torch.tensor(1.5, dtype=torch.float64)
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    port = _free_port()
    procs = [ctx.Process(target=_distributed_worker, args=(r, world, port, img, txt, scale, queue, done))
             for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in range(world))
    done.set()
    for p in procs:
        p.join(timeout=60)
    i, t, s = (x.clone().requires_grad_(True) for x in (img, txt, scale))
    want = contrastive_oracle(i, t, s, True)
    want.backward()
    # the mean of the ranks' shares is the global loss; gradients land on the rows' owners
    assert abs(sum(r[1] for r in results) / world - want.item()) < 1e-10
    # DDP-style: each rank's input gradient is the global-loss gradient times world (its loss is averaged over ranks)
    torch.testing.assert_close(torch.cat([r[2] for r in results]) / world, i.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[3] for r in results]) / world, t.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(results[0][4], s.grad, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ dense decode
def test_patch_text_logits_is_cosine():
    patches, text = torch.randn(2, 3, 5, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    want = torch.einsum("bhwd,cd->bchw", F.normalize(patches, dim=-1), F.normalize(text, dim=-1))
    torch.testing.assert_close(ops.patch_text_logits(patches, text), want)
    with pytest.raises(ValueError, match="share D"):
        ops.patch_text_logits(patches, text[:, :5])


@pytest.mark.parametrize("c,h,w,size", [(1, 3, 4, (7, 9)), (3, 5, 7, (37, 50)), (150, 4, 6, (29, 31)),
                                        (3, 8, 8, (5, 6))])
@pytest.mark.parametrize("softmax", [False, True])
def test_upsample_argmax_matches_interpolate(c, h, w, size, softmax, monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * c * size[1] * 3)  # bands of 3 rows
    logits = torch.randn(2, c, h, w, dtype=torch.float64)
    full = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if softmax:
        full = full.softmax(1)
    labels, scores = ops.upsample_argmax(logits, size, softmax=softmax, return_scores=True)
    assert labels.shape == (2, *size) and labels.dtype == torch.int64
    torch.testing.assert_close(scores, full.max(1).values, rtol=1e-12, atol=1e-12)
    assert torch.equal(labels, full.argmax(1))


def _slide_oracle(window_logits, boxes, canvas, size, softmax):
    c = window_logits.shape[1]
    acc = torch.zeros(c, *canvas, dtype=torch.float64)
    count = torch.zeros(canvas, dtype=torch.float64)
    for logits, (y0, x0, y1, x1) in zip(window_logits, boxes):
        up = F.interpolate(logits[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        acc[:, y0:y1, x0:x1] += up.softmax(0) if softmax else up
        count[y0:y1, x0:x1] += 1
    full = F.interpolate((acc / count)[None], size=size, mode="bilinear", align_corners=False)[0]
    return full.argmax(0), full.max(0).values


@pytest.mark.parametrize("softmax", [True, False])
def test_slide_decode_matches_full_resolution_protocol(softmax, monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 4000)  # many bands
    canvas, c = (50, 71), 5
    boxes = [(0, 0, 30, 30), (0, 20, 30, 50), (0, 41, 30, 71), (20, 0, 50, 30), (20, 20, 50, 50), (20, 41, 50, 71)]
    window_logits = torch.randn(len(boxes), c, 4, 4, dtype=torch.float64)
    for size in ((50, 71), (77, 101), (33, 40)):
        labels, scores = ops.slide_decode(window_logits, boxes, canvas, size, softmax=softmax, return_scores=True)
        want_labels, want_scores = _slide_oracle(window_logits, boxes, canvas, size, softmax)
        torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)
        assert torch.equal(labels, want_labels)


def test_slide_decode_errors():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="cover"):
        ops.slide_decode(logits, [(0, 0, 10, 10)], (10, 12), (10, 12))
    with pytest.raises(ValueError, match="inside the canvas"):
        ops.slide_decode(logits, [(0, 0, 11, 10)], (10, 10), (10, 10))
    with pytest.raises(ValueError, match=r"boxes must be \[1, 4\]"):
        ops.slide_decode(logits, [(0, 0, 10, 10), (0, 0, 10, 10)], (10, 10), (10, 10))


# ----------------------------------------------------------------------------- registration and dispatch
def test_opcheck_all_ops():
    q = torch.randn(2, 5, 2, 8, requires_grad=True)
    k = torch.randn(2, 6, 2, 8, requires_grad=True)
    v = torch.randn(2, 6, 2, 8, requires_grad=True)
    opcheck(torch.ops.dinotxt_fast.attention_fwd.default, (q, k, v, False, 0.3, None, "torch"))
    qkv = torch.randn(2, 5, 3, 2, 8, requires_grad=True)
    opcheck(torch.ops.dinotxt_fast.attention_fwd.default, (*qkv.unbind(2), True, 0.3, None, "torch"))
    opcheck(torch.ops.dinotxt_fast.attention_fwd.default, (*qkv.unbind(2), True, 0.3, torch.tensor([3, 5]), "torch"))
    tokens = torch.randn(3, 11, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    opcheck(torch.ops.dinotxt_fast.patch_pool_fwd.default, (tokens, 4, w, b, 1e-5, True, "torch"))
    opcheck(torch.ops.dinotxt_fast.patch_pool_fwd.default, (tokens, 0, None, None, 1e-5, False, "torch"))
    img, txt = torch.randn(5, 12, requires_grad=True), torch.randn(5, 12, requires_grad=True)
    opcheck(torch.ops.dinotxt_fast.contrastive_fwd.default, (img, txt, torch.tensor(2.0, requires_grad=True), True,
                                                              "torch"))
    opcheck(torch.ops.dinotxt_fast.patch_text_logits.default, (torch.randn(2, 3, 4, 8), torch.randn(5, 8), "torch"))
    opcheck(torch.ops.dinotxt_fast.upsample_argmax.default, (torch.randn(2, 3, 4, 5), [9, 11], True, "torch"))
    boxes = torch.tensor([[0, 0, 6, 6], [0, 4, 6, 10]])
    opcheck(torch.ops.dinotxt_fast.slide_decode.default, (torch.randn(2, 3, 4, 4), boxes, [6, 10], [7, 9], True,
                                                          "torch"))


def test_torch_compile_fullgraph_traces_every_op():
    torch._dynamo.reset()
    qkv = torch.randn(2, 9, 3, 2, 8, requires_grad=True)
    tokens = torch.randn(2, 1 + 4 + 9, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    img, txt = torch.randn(4, 12, requires_grad=True), torch.randn(4, 12, requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)

    def step(qkv, tokens, img, txt, scale):
        q, k, v = qkv.unbind(2)
        o = ops.attention(q, k, v, causal=True)
        pooled = ops.patch_pool(tokens, num_registers=4, ln_weight=w, ln_bias=b, normalize=True)
        loss = ops.contrastive_loss(img, txt, scale)
        return o.square().sum() + pooled.sum() + loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (qkv, tokens, img, txt, scale)
    got = compiled(*args)
    grads = torch.autograd.grad(got, args)
    want = step(*args)
    torch.testing.assert_close(got, want)
    for a, e in zip(grads, torch.autograd.grad(want, args)):
        torch.testing.assert_close(a, e)


def test_dispatch_explicit_env_and_errors(monkeypatch):
    x = torch.randn(1, 3, 1, 4)
    assert dispatch.resolve("attention", None, x) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.attention(x, x, x, backend="nope")
    monkeypatch.setenv(ops.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.attention(x, x, x)
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.attention(x, x, x).shape == x.shape
    monkeypatch.delenv(ops.ENV_VAR)
    report = ops.backends()
    assert report["torch"]["available"] and "attention" in report["torch"]["ops"]
    assert set(report) >= {"torch", "triton", "cuda"}


def test_dispatch_kernel_backend_needs_cuda_or_the_interpreter(monkeypatch):
    calls = []

    def fwd(q, k, v, causal, scale, lengths):
        calls.append(q.device.type)
        return reference.attention_forward(q, k, v, causal, scale, lengths)

    saved = dispatch.registered().get("triton")
    ops.register_backend(ops.Backend("triton", {"attention_forward": fwd,
                                                "attention_backward": reference.attention_backward}))
    try:
        x = torch.randn(1, 3, 1, 4)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            ops.attention(x, x, x, backend="triton")
        with pytest.raises(ValueError, match="no patch_pool kernel"):
            ops.patch_pool(torch.randn(1, 3, 4), num_registers=0, backend="triton")
        assert dispatch.resolve("attention", None, x) == "torch"  # auto on CPU is always the reference
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        ops.attention(x, x, x, backend="triton")
        assert calls == ["cpu"]
        with pytest.raises(ValueError, match="registers"):
            ops.register_backend(ops.Backend("half", {"attention_forward": fwd}))
    finally:
        if saved is None:
            dispatch._REGISTRY.pop("triton", None)
        else:
            ops.register_backend(saved)


@pytest.mark.gpu
def test_reference_ops_on_cuda():
    q, k, v = (torch.randn(2, 261, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ops.attention(q, k, v, backend="torch")
    want = attention_oracle(q.double(), k.double(), v.double(), False)
    assert (out.double() - want).abs().max() < 2e-2


def test_ops_run_their_kernels_outside_autocast():
    """Inside an autocast region the kernels still compute in the dtypes they are given (and declare)."""
    img, txt = torch.randn(9, 16), torch.randn(9, 16)
    want = ops.contrastive_loss(img, txt, torch.tensor(2.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.contrastive_loss(img, txt, torch.tensor(2.0))
        logits = ops.patch_text_logits(torch.randn(1, 2, 3, 16), torch.randn(4, 16))
    torch.testing.assert_close(got, want)
    assert logits.dtype == torch.float32


def test_patch_pool_with_low_precision_tokens_and_fp32_layernorm():
    # what autocast training produces: bf16 tokens, fp32 LayerNorm parameters (gradients in their own dtype)
    tokens = torch.randn(3, 11, 16, dtype=torch.bfloat16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    opcheck(torch.ops.dinotxt_fast.patch_pool_fwd.default, (tokens, 4, w, b, 1e-5, True, "torch"))
    out = ops.patch_pool(tokens, num_registers=4, ln_weight=w, ln_bias=b)
    d_tokens, d_w, d_b = torch.autograd.grad(out.float().sum(), (tokens, w, b))
    assert (d_tokens.dtype, d_w.dtype, d_b.dtype) == (torch.bfloat16, torch.float32, torch.float32)

"""pytest-benchmark timings of the CPU-measurable paths: the reference ops, the tokenizer and the data pipeline.

    python -m pytest -q tests/benchmarks/test_cpu_timings.py                      # timings table in the output
    python -m pytest -q tests/benchmarks/test_cpu_timings.py --benchmark-disable  # each benchmark runs once, as a test
    python -m pytest -q tests/benchmarks/test_cpu_timings.py --benchmark-autosave # keep a run; compare with
                                                                                  # --benchmark-compare

Regressions show in CI output as timings, never as failures: no test asserts a time. Each benchmark asserts its
result (shape, finite, equal to an independent computation) so that a wrong path fails. Shapes are small but of the
real kind (the ViT-L/14 token count 261, caption batches of 256, 224 px crops) so that the whole file runs in well
under a minute on a 2-core machine; the "torch backend vs naive" groups time both sides of a benchmarks/reference.py
case at its real shape (its JSON, with peak memory in fresh processes, is the evidence; these are CI signals).
"""
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")  # the `benchmark` fixture (the test extra installs it)

from benchmarks import reference  # noqa: E402
from dinotxt_fast import ops  # noqa: E402
from dinotxt_fast.models.tokenizer import EOT, SOT, SimpleTokenizer, decode, tokenize  # noqa: E402
from dinotxt_fast.train import synthetic  # noqa: E402
from dinotxt_fast.train.data import make_loader  # noqa: E402
from dinotxt_fast.train.transforms import TrainTransform, sample_generator  # noqa: E402

TORCH = "torch"  # the reference backend, on CPU tensors


def bench(group: str):
    # Short calibration: these are regression signals, not precise measurements.
    return pytest.mark.benchmark(group=group, max_time=0.5, min_rounds=3)


def _sdpa(q, k, v, causal=False, lengths=None):
    """The attention oracle on [B, N, H, Dh] with torch's SDPA; `lengths` hides keys >= lengths[b]."""
    mask = None
    if lengths is not None:
        keys = torch.arange(k.shape[1])[None, :] < lengths[:, None]  # [B, Nk]
        mask = keys[:, None, None, :]
        if causal:
            mask = mask & torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
            causal = False
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=causal)
    return out.transpose(1, 2)


def _qkv(b, n, h, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=gen).requires_grad_(True)
    return qkv, qkv.unbind(2)


# ------------------------------------------------------------------------------------------------- attention
@bench("reference ops: attention")
def test_attention_forward_vit(benchmark):
    """ViT-L/14 at 224 px: 261 tokens (cls + 4 registers + 256 patches), heads of 64."""
    _, (q, k, v) = _qkv(2, 261, 4, 64)
    with torch.no_grad():
        out = benchmark(lambda: ops.attention(q, k, v, backend=TORCH))
        want = _sdpa(q, k, v)
    assert out.shape == (2, 261, 4, 64)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


@bench("reference ops: attention")
def test_attention_forward_backward_vit(benchmark):
    qkv, (q, k, v) = _qkv(2, 261, 4, 64)
    grad_out = torch.randn(2, 261, 4, 64)

    def step():
        return torch.autograd.grad(ops.attention(q, k, v, backend=TORCH), qkv, grad_out)[0]

    grad = benchmark(step)
    want = torch.autograd.grad(_sdpa(q, k, v), qkv, grad_out)[0]
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-4)


@bench("reference ops: attention")
def test_attention_forward_backward_text_with_lengths(benchmark):
    """The text tower's attention: causal, 77 positions, keys after each caption's EOT masked."""
    qkv, (q, k, v) = _qkv(16, 77, 4, 64, seed=1)
    lengths = torch.randint(8, 78, (16,), generator=torch.Generator().manual_seed(2))
    grad_out = torch.randn(16, 77, 4, 64)

    def step():
        out = ops.attention(q, k, v, causal=True, lengths=lengths, backend=TORCH)
        return out, torch.autograd.grad(out, qkv, grad_out)[0]

    out, grad = benchmark(step)
    want = _sdpa(q, k, v, causal=True, lengths=lengths)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, torch.autograd.grad(want, qkv, grad_out)[0], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- contrastive
def _naive_contrastive(img, txt, logit_scale):
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = logit_scale.exp() * img @ txt.T
    target = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@bench("reference ops: contrastive loss")
def test_contrastive_loss_forward_backward(benchmark):
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(512, 256, generator=gen).requires_grad_(True)
    txt = torch.randn(512, 256, generator=gen).requires_grad_(True)
    scale = torch.tensor(2.6592, requires_grad=True)

    def step():
        loss = ops.contrastive_loss(img, txt, scale, backend=TORCH)
        return (loss.detach(), *torch.autograd.grad(loss, (img, txt, scale)))

    loss, *grads = benchmark(step)
    want = _naive_contrastive(img, txt, scale)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, torch.autograd.grad(want, (img, txt, scale))):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- pooling
@bench("reference ops: patch pooling")
def test_patch_pool_layernorm_forward_backward(benchmark):
    """The vision head's fused ln_final + [cls ; mean(patches)] over ViT-L tokens, with gradients."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(8, 261, 1024, generator=gen).requires_grad_(True)
    weight = (1 + 0.1 * torch.randn(1024, generator=gen)).requires_grad_(True)
    bias = (0.1 * torch.randn(1024, generator=gen)).requires_grad_(True)
    grad_out = torch.randn(8, 2048, generator=gen)

    def pool(fn):
        out = fn()
        return (out.detach(), *torch.autograd.grad(out, (tokens, weight, bias), grad_out))

    got = benchmark(pool, lambda: ops.patch_pool(tokens, num_registers=4, ln_weight=weight, ln_bias=bias,
                                                  backend=TORCH))

    # The oracle in float64: the LayerNorm weight/bias gradients sum 8 x 261 terms, beyond fp32's 1e-5.
    tokens64, weight64, bias64 = (t.detach().double().requires_grad_(True) for t in (tokens, weight, bias))
    x = F.layer_norm(tokens64, (1024,), weight64, bias64, 1e-5)
    out = torch.cat([x[:, 0], x[:, 5:].mean(1)], dim=-1)
    want = (out.detach(), *torch.autograd.grad(out, (tokens64, weight64, bias64), grad_out.double()))
    assert got[0].shape == (8, 2048)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------- dense decoding
@bench("reference ops: dense decoding")
def test_patch_text_logits(benchmark):
    """Cosine logits of a 448 px ViT-L/14 patch grid (32 x 32) against 150 class embeddings (ADE20K)."""
    gen = torch.Generator().manual_seed(0)
    patches, text = torch.randn(2, 32, 32, 1024, generator=gen), torch.randn(150, 1024, generator=gen)
    logits = benchmark(ops.patch_text_logits, patches, text, backend=TORCH)
    assert logits.shape == (2, 150, 32, 32)
    want = torch.einsum("bhwd,cd->bchw", F.normalize(patches, dim=-1), F.normalize(text, dim=-1))
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)


@bench("reference ops: dense decoding")
def test_upsample_argmax(benchmark):
    logits = torch.randn(1, 150, 32, 32, generator=torch.Generator().manual_seed(0))
    labels, scores = benchmark.pedantic(ops.upsample_argmax, (logits, (448, 448)),
                                        {"softmax": True, "return_scores": True, "backend": TORCH}, rounds=3)
    full = F.interpolate(logits, size=(448, 448), mode="bilinear", align_corners=False).softmax(1)
    assert labels.shape == (1, 448, 448) and labels.dtype == torch.int64
    torch.testing.assert_close(scores, full.max(1).values, rtol=1e-4, atol=1e-6)
    assert (labels == full.argmax(1)).float().mean() > 0.999  # fp32 rounding may flip a near-tie


def _slide_oracle(window_logits, boxes, canvas, size):
    c = window_logits.shape[1]
    acc, count = torch.zeros(c, *canvas), torch.zeros(canvas)
    for logits, (y0, x0, y1, x1) in zip(window_logits, boxes):
        up = F.interpolate(logits[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        acc[:, y0:y1, x0:x1] += up.softmax(0)
        count[y0:y1, x0:x1] += 1
    full = F.interpolate((acc / count)[None], size=size, mode="bilinear", align_corners=False)[0]
    return full.argmax(0), full.max(0).values


@bench("reference ops: dense decoding")
def test_slide_decode(benchmark):
    """The official slide protocol on a 224 x 374 canvas: two 224 px windows (stride 150), 21 classes, decoded to
    a 300 x 500 image."""
    boxes = [(0, 0, 224, 224), (0, 150, 224, 374)]
    window_logits = torch.randn(2, 21, 16, 16, generator=torch.Generator().manual_seed(0))
    labels, scores = benchmark.pedantic(ops.slide_decode, (window_logits, boxes, (224, 374), (300, 500)),
                                        {"return_scores": True, "backend": TORCH}, rounds=5, warmup_rounds=1)
    want_labels, want_scores = _slide_oracle(window_logits, boxes, (224, 374), (300, 500))
    assert labels.shape == (300, 500)
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-6)
    assert (labels == want_labels).float().mean() > 0.999


# -------------------------------------------------------------------------- torch backend vs naive PyTorch
REFERENCE_CASES = [case for case in reference.CASES if case.name in (
    "upsample_argmax 150x37x49 -> 512x683 softmax", "slide_decode ADE20K grid 6x150x28x28 -> 512x683",
    "contrastive_loss fwd+bwd B=1024 E=2048", "attention fwd+bwd ViT-L/14 224px 8x261x16x64",
    "patch_pool +LN fwd+bwd 32x261x1024")]


@pytest.mark.parametrize("impl", [reference.OURS, reference.NAIVE])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda case: case.name)
def test_torch_backend_against_naive(benchmark, case, impl):
    """Both sides of a benchmarks/reference.py case, timed in one group; each checked against the other side."""
    benchmark.group = f"torch backend vs naive: {case.name}"
    torch.manual_seed(0)
    state = case.setup("cpu")
    timed, other = (case.ours, case.naive) if impl == reference.OURS else (case.naive, case.ours)
    got = benchmark.pedantic(timed, (state,), rounds=2, warmup_rounds=0)
    want = other(state)
    if case.compare == "labels":
        assert got[0].shape == want[0].shape and float((got[0] == want[0]).double().mean()) >= 0.9999
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    else:
        for a, b in zip(got, want):
            assert a.shape == b.shape and bool(torch.isfinite(a).all())
            assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-6


# ------------------------------------------------------------------------------------------------ tokenizer
_WORDS = ("photo picture image of a the an with on in at near two three small large big old young dog cat bird "
          "person people child street city beach forest mountain river boat car bicycle table chair window sunset "
          "night morning food plate coffee red blue green yellow black white wooden metal glass standing sitting "
          "running looking holding playing vintage close-up view aerial portrait").split()


def _captions(n: int = 256, seed: int = 0) -> list[str]:
    """Caption-like strings: random words, the synthetic set's object phrases, punctuation, numbers, a few
    non-ASCII characters and HTML entities (the cleaning path alt-text needs)."""
    rng = random.Random(seed)
    extras = ("café", "naïve", "&amp;", "Zürich", "2019", "#travel", "it's", "(3/4)", "—")
    out = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 18))]
        if i % 3 == 0:
            words.append(synthetic.with_article(f"{rng.choice(synthetic.COLOURS)} {rng.choice(synthetic.SHAPES)}"))
        if i % 5 == 0:
            words.insert(rng.randrange(len(words)), rng.choice(extras))
        out.append((" ".join(words) + rng.choice((".", "", "!", " ..."))).capitalize())
    return out


def _check_ids(ids, captions):
    assert ids.shape == (len(captions), 77) and ids.dtype == torch.int64
    assert (ids[:, 0] == SOT).all()
    eot = ids.argmax(-1)
    assert (ids.gather(1, eot[:, None]) == EOT).all() and ((ids == EOT).sum(-1) == 1).all()
    # decode puts spaces around punctuation: compare without whitespace (row 1 has no entity or accent to clean)
    assert "".join(decode(ids[1][1:eot[1]].tolist()).split()) == "".join(captions[1].lower().split())


@bench("tokenizer")
def test_tokenize_256_captions(benchmark):
    """The shared tokenizer, its BPE cache warm (as in training, where caption words repeat)."""
    captions = _captions()
    ids = benchmark(tokenize, captions)
    _check_ids(ids, captions)


@bench("tokenizer")
def test_tokenize_256_captions_cold_cache(benchmark):
    """A fresh tokenizer per round (vocabulary loading untimed): every word goes through BPE."""
    captions = _captions(seed=1)
    ids = benchmark.pedantic(lambda tokenizer: tokenizer.tokenize(captions), setup=lambda: ((SimpleTokenizer(),), {}),
                             rounds=5, warmup_rounds=0)
    _check_ids(ids, captions)
    assert torch.equal(ids, tokenize(captions))


# ----------------------------------------------------------------------------------------------------- data
@bench("data pipeline")
def test_synthetic_samples_with_train_transform(benchmark):
    """16 samples of the embedded captioned-shapes set at 224 px through the training augmentation."""
    dataset = synthetic.SyntheticShapes(64, image_size=224, seed=0)
    transform = TrainTransform(224, scale=(0.08, 1.0))

    def batch():
        images, captions = [], []
        for i in range(16):
            image, caption = dataset.load(i)
            images.append(transform(image, sample_generator(0, 0, i)))
            captions.append(caption)
        return torch.stack(images), captions

    images, captions = benchmark.pedantic(batch, rounds=3, warmup_rounds=1)
    assert images.shape == (16, 3, 224, 224) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert -3 < images.mean() < 3 and images.std() > 0.1  # ImageNet-normalised pixels, not a constant image
    again, same_captions = batch()  # every random choice is seeded per sample: the batch is reproducible
    assert torch.equal(images, again) and captions == same_captions and all(captions)


@bench("data pipeline")
def test_loader_first_batch_synthetic(benchmark):
    """make_loader on the embedded set (no workers): samples, augmentation, tokenization, collation."""
    def first_batch():
        loader = make_loader("synthetic:256", global_batch=16, image_size=224, crop_scale=(0.08, 1.0))
        return next(iter(loader))

    images, ids = benchmark.pedantic(first_batch, rounds=3, warmup_rounds=1)
    assert images.shape == (16, 3, 224, 224) and torch.isfinite(images).all()
    assert ids.shape == (16, 77) and (ids[:, 0] == SOT).all() and ((ids == EOT).sum(-1) == 1).all()
    images2, ids2 = first_batch()
    assert torch.equal(images, images2) and torch.equal(ids, ids2)


@bench("data pipeline")
def test_webdataset_shard_round_trip(benchmark, tmp_path):
    """32 JPEG samples written as an img2dataset-style shard, then read back as one batch by make_loader."""
    import io

    wds = pytest.importorskip("webdataset")
    dataset = synthetic.SyntheticShapes(32, image_size=128, seed=3)
    samples = []
    for i in range(32):
        image, caption = dataset.load(i)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        samples.append((f"{i:06d}", buffer.getvalue(), caption))
    shard = str(tmp_path / "shard-0000.tar")

    def round_trip():
        with wds.TarWriter(shard) as sink:
            for key, jpeg, caption in samples:
                sink.write({"__key__": key, "jpg": jpeg, "txt": caption})
        loader = make_loader(shard, global_batch=32, image_size=112, train=False)
        return next(iter(loader)), loader.skips.total

    (images, ids), skipped = benchmark.pedantic(round_trip, rounds=3, warmup_rounds=1)
    assert skipped == 0 and images.shape == (32, 3, 112, 112) and torch.isfinite(images).all()
    want = tokenize([caption for _, _, caption in samples])
    assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, want.tolist()))

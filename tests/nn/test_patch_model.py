"""dtf.patch_model on the transcribed official models (tests/official): DINOv2 / DINOv3 backbones, the DINO.txt
vision head and text tower. After patching, outputs and gradients match the unpatched model (fp32 tolerance),
state dicts are untouched, and calls the fused path can't reproduce go to the original module."""
import copy

import pytest
import torch
from torch import nn

import dinotxt_fast as dtf
from dinotxt_fast import ops
from dinotxt_fast.nn import FusedSelfAttention, is_attention_module, unpatch_model
from tests.official import dinotxt_ref, dinov2_ref, dinov3_ref

SOT, EOT = 49406, 49407
TEXT_SIZES = dict(embed_dim=128, context_length=77, vocab_size=49408, text_dim=64, text_heads=4, text_layers=2)
TOL = dict(rtol=1e-5, atol=2e-5)


def _randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") or (name.endswith("weight") and p.ndim == 1):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)


def _ids(lengths, width=77):
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, 1:n - 1], ids[row, n - 1] = SOT, torch.randint(1, SOT, (n - 2,)), EOT
    return ids


def _official(release):
    torch.manual_seed(1)
    if release == "v2":
        backbone = dinov2_ref.vit_large_reg(embed_dim=64, depth=2, num_heads=4, patch_size=14, img_size=56,
                                            num_register_tokens=4)
    else:
        backbone = dinov3_ref.vit_large(embed_dim=64, depth=2, num_heads=4, patch_size=16, n_storage_tokens=4)
    model = dinotxt_ref.build_dinotxt(backbone, release=release, **TEXT_SIZES)
    _randomize(model)
    return model


class _CountCalls:
    def __init__(self, monkeypatch):
        self.calls = []
        real = ops.attention

        def counted(*args, **kwargs):
            self.calls.append(kwargs.get("causal", False))
            return real(*args, **kwargs)

        monkeypatch.setattr(ops, "attention", counted)


@pytest.mark.parametrize("release,image_size", [("v2", 56), ("v3", 64)])
def test_patched_official_dinotxt_matches_and_keeps_its_state_dict(release, image_size, monkeypatch):
    model = _official(release)
    torch.manual_seed(2)
    images, ids = torch.randn(2, 3, image_size, image_size), _ids([5, 40])
    with torch.no_grad():
        want_img, want_txt = model.encode_image(images), model.encode_text(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    replaced = dtf.patch_model(model)
    # backbone blocks (2), vision head blocks (2), text blocks (2): every attention of the model
    backbone = "visual_model.backbone.model.blocks" if release == "v2" else "visual_model.backbone.blocks"
    head = "visual_model.head.block_list" if release == "v2" else "visual_model.head.blocks"
    assert sorted(replaced) == sorted([f"{backbone}.{i}.attn" for i in range(2)] + [f"{head}.{i}.attn" for i in range(2)]
                                      + [f"text_model.backbone.blocks.{i}.attention" for i in range(2)])
    for name in replaced:
        assert isinstance(model.get_submodule(name), FusedSelfAttention)
    assert replaced.left_alone == {}
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    counter = _CountCalls(monkeypatch)
    with torch.no_grad():
        got_img, got_txt = model.encode_image(images), model.encode_text(ids)
    assert counter.calls == [False] * 4 + [True] * 2  # the text tower's attention is causal
    torch.testing.assert_close(got_img, want_img, **TOL)
    torch.testing.assert_close(got_txt, want_txt, **TOL)

    unpatch_model(model, replaced)
    assert not any(isinstance(m, FusedSelfAttention) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), want_txt, rtol=0, atol=0)


def test_training_gradients_match_after_patching():
    """Vision head in training mode (batch-subset drop-path: same random draws) and text tower, fwd + bwd."""
    reference = _official("v2").train()
    patched = copy.deepcopy(reference)
    dtf.patch_model(patched)
    images, ids = torch.randn(4, 3, 56, 56), _ids([3, 9, 77, 20])

    def loss_and_grads(model):
        torch.manual_seed(5)
        loss = model.encode_image(images).square().mean() + model.encode_text(ids).square().mean()
        params = [p for p in model.parameters() if p.requires_grad]
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    want_loss, want_grads = loss_and_grads(reference)
    got_loss, got_grads = loss_and_grads(patched)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_rope_and_list_api_of_dinov3_attention():
    torch.manual_seed(3)
    attn = dinov3_ref.SelfAttention(64, num_heads=4, qkv_bias=True, mask_k_bias=True)
    with torch.no_grad():
        attn.qkv.bias.normal_()
        attn.qkv.bias_mask.fill_(1)
        attn.qkv.bias_mask[64:128] = 0
    fused = FusedSelfAttention(attn)
    x, x2 = torch.randn(2, 21, 64), torch.randn(3, 9, 64)
    sin, cos = torch.randn(16, 16), torch.randn(16, 16)  # RoPE on the last 16 tokens, prefix of 5
    torch.testing.assert_close(fused(x, rope=(sin, cos)), attn(x, rope=(sin, cos)), **TOL)
    torch.testing.assert_close(fused(x, None, (sin, cos)), attn(x, None, (sin, cos)), **TOL)  # positional
    got = fused.forward_list([x, x2], rope_list=[(sin, cos), None])
    want = attn.forward_list([x, x2], rope_list=[(sin, cos), None])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_calls_the_fused_path_cannot_reproduce_go_to_the_original():
    torch.manual_seed(4)
    attn = dinotxt_ref.Attention(32, num_heads=2, attn_drop=0.5)
    fused = FusedSelfAttention(attn)
    x = torch.randn(2, 7, 32)
    fused.train()
    torch.manual_seed(6)
    with_dropout = fused(x)
    attn.train()
    torch.manual_seed(6)
    torch.testing.assert_close(with_dropout, attn(x), rtol=0, atol=0)  # same dropout draws: the original ran
    fused.eval()
    torch.testing.assert_close(fused(x), attn.eval()(x), **TOL)

    mem_eff = dinov2_ref.MemEffAttention(32, num_heads=2)
    with pytest.raises(AssertionError, match="xFormers"):  # the original's own answer to an attention bias
        FusedSelfAttention(mem_eff)(x, attn_bias=object())


def test_only_attention_modules_are_replaced():
    class QKNorm(nn.Module):  # extra parameterised children: we would drop their effect, so not ours to replace
        def __init__(self):
            super().__init__()
            self.num_heads, self.qkv, self.proj = 2, nn.Linear(16, 48), nn.Linear(16, 16)
            self.q_norm = nn.LayerNorm(8)

        def forward(self, x):
            return x

    class Container(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = dinov2_ref.Attention(16, num_heads=2)
            self.b = QKNorm()
            self.c = nn.Sequential(dinotxt_ref.CausalSelfAttention(16, num_heads=2))
            self.d = nn.MultiheadAttention(16, 2, batch_first=True)

    model = Container()
    replaced = dtf.patch_model(model)
    assert sorted(replaced) == ["a", "c.0"] and isinstance(model.b, QKNorm)
    # what looks like attention but is not replaced is reported with the reason
    assert sorted(replaced.left_alone) == ["b", "d"]
    assert "'q_norm' (LayerNorm)" in replaced.left_alone["b"]
    assert "MultiheadAttention" in replaced.left_alone["d"]
    assert not is_attention_module(model.a) and not is_attention_module(model.b)
    assert dtf.patch_model(model) == {}  # idempotent
    assert dtf.patch_model(dtf.create_model("dinov2_vitl14_reg4_dinotxt", vision_dim=64, vision_depth=1,
                                            vision_heads=4, head_blocks=1, text_dim=64, text_layers=1,
                                            text_heads=4)) == {}  # our own model already runs the fused op
    with pytest.raises(ValueError, match="FusedSelfAttention"):
        dtf.patch_model(dinov2_ref.Attention(16, num_heads=2))
    with pytest.raises(TypeError, match="nn.Module"):
        dtf.patch_model("model")
    with pytest.raises(ValueError, match="not an attention module .*'q_norm'"):
        FusedSelfAttention(QKNorm())


def test_patched_head_on_the_triton_backend():
    """The official vision head patched with backend="triton" (under the interpreter without a GPU)."""
    model = _official("v2")
    head = model.visual_model.head
    tokens = torch.randn(2, 21, 64)
    with torch.no_grad():
        want = head.block_list[0](tokens)
        dtf.patch_model(head, backend="triton")
        got = head.block_list[0](tokens)
    assert head.block_list[0].attn.backend == "triton"
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.gpu
@pytest.mark.prove
def test_gpu_patched_official_model_bf16():
    """Under bf16 autocast, the patched model (Triton attention) is no further from the fp32 model than the
    unpatched one (SDPA / explicit softmax in bf16) is, up to 2x (docs/design.md, "Testing and evidence")."""
    model = _official("v3").cuda()
    images, ids = torch.randn(4, 3, 64, 64, device="cuda"), _ids([5, 40, 77, 12]).cuda()

    def embed():
        return model.encode_image(images, normalize=True).float(), model.encode_text(ids, normalize=True).float()

    with torch.no_grad():
        exact = embed()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            unpatched = embed()
            dtf.patch_model(model, backend="triton")
            patched = embed()
    for got, base, want in zip(patched, unpatched, exact):
        assert (got - want).abs().max() <= 2 * (base - want).abs().max() + 1e-3

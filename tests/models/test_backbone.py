"""DINOv2 / DINOv3 backbones against transcriptions of the official modules (tests/official)."""
import math

import pytest
import torch
import torch.nn.functional as F

import dinotxt_fast.ops
from dinotxt_fast.models._state import StateDictError, check_state_dict
from dinotxt_fast.models.config import DinoTxtConfig
from dinotxt_fast.models.layers import (Attention, LayerScale, Mlp, SwiGLUFFN, apply_rope,
                                        drop_add_residual_stochastic_depth)
from dinotxt_fast.models.vit import DinoV2Backbone, DinoV3Backbone, build_backbone
from tests.official import dinov2_ref, dinov3_ref

DIM, DEPTH, HEADS, GRID = 64, 2, 4, 4
V2_SIZES = [(56, 56), (56, 84), (84, 42), (28, 28), (14, 14)]  # native grid, non-square, up, down, 1x1
V3_SIZES = [(64, 64), (64, 96), (96, 32), (16, 16)]


def tiny_config(backbone: str, registers: int = 4, **overrides) -> DinoTxtConfig:
    patch = 14 if backbone == "dinov2" else 16
    fields = dict(backbone=backbone, vision_dim=DIM, vision_depth=DEPTH, vision_heads=HEADS, patch_size=patch,
                  num_register_tokens=registers, pos_embed_grid=GRID, embed_dim=2 * DIM)
    fields.update(overrides)
    return DinoTxtConfig(**fields)


def official(backbone: str, registers: int = 4):
    if backbone == "dinov2":
        model = dinov2_ref.vit_large_reg(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=14,
                                         img_size=14 * GRID, num_register_tokens=registers)
    else:
        model = dinov3_ref.vit_large(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, n_storage_tokens=registers)
    # Random values everywhere (the official init leaves biases, tokens and norms trivial).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def official_tokens(model, images):
    ref = dinov2_ref if isinstance(model, dinov2_ref.DinoVisionTransformer) else dinov3_ref
    return ref.tokens(model, images)


def pair(backbone: str, registers: int = 4):
    ref = official(backbone, registers)
    ours = build_backbone(tiny_config(backbone, registers)).eval()
    ours.load_official_state_dict(ref.state_dict())
    return ref, ours


def sizes(backbone):
    return V2_SIZES if backbone == "dinov2" else V3_SIZES


# ------------------------------------------------------------------------------------ numerics vs official
@pytest.mark.parametrize("registers", [4, 0])
@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
def test_tokens_match_official_fp32(backbone, registers):
    ref, ours = pair(backbone, registers)
    assert ours.num_prefix_tokens == 1 + registers and ours.embed_dim == DIM
    for h, w in sizes(backbone):
        images = torch.randn(2, 3, h, w)
        with torch.no_grad():
            expected = official_tokens(ref, images)
            got = ours(images)
        gh, gw = ours.grid_size(h, w)
        assert got.shape == (2, 1 + registers + gh * gw, DIM)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"image {h}x{w}")


@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
def test_tokens_match_official_float64(backbone):
    ref, ours = pair(backbone)
    ref.double()
    ours.double()
    for h, w in sizes(backbone)[:3]:
        images = torch.randn(2, 3, h, w, dtype=torch.float64)
        with torch.no_grad():
            expected = official_tokens(ref, images)
            got = ours(images)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10, msg=f"image {h}x{w}")


def test_v2_position_embedding_is_official_antialiased_bicubic():
    ref, ours = pair("dinov2")
    x = torch.zeros(1, 1 + 3 * 5, DIM)  # only its shape and dtype are read
    with torch.no_grad():
        expected = ref.interpolate_pos_encoding(x, 3 * 14, 5 * 14)
        got = ours.position_embedding(3, 5, torch.float32)
        assert torch.equal(got, expected)
        # Sensitivity: the non-antialiased resize is clearly different, so the comparison above means something.
        g = ours.pos_embed[:, 1:].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
        plain = F.interpolate(g, size=(3, 5), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 15, DIM)
        assert (plain - got[:, 1:]).abs().max() > 1e-2
    # Native grid: the stored parameter itself (official fast path).
    assert ours.position_embedding(GRID, GRID, torch.float32) is ours.pos_embed


def test_v3_rope_tables_match_official():
    ref, ours = pair("dinov3")
    for h, w in [(4, 6), (1, 1), (5, 3)]:
        sin, cos = ours.rope_embed(h, w)
        ref_sin, ref_cos = ref.rope_embed(H=h, W=w)
        assert sin.dtype == torch.float32 and torch.equal(sin, ref_sin) and torch.equal(cos, ref_cos)


def test_apply_rope_matches_official_layer():
    ref, _ = pair("dinov3")
    sin, cos = ref.rope_embed(H=3, W=4)
    attn = ref.blocks[0].attn
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 5 + 12, HEADS, DIM // HEADS).to(dtype)
        k = torch.randn_like(q)
        q_ours, k_ours = apply_rope(q, k, (sin, cos))
        q_ref, k_ref = attn.apply_rope(q.transpose(1, 2), k.transpose(1, 2), (sin, cos))
        assert q_ours.dtype == dtype
        assert torch.equal(q_ours, q_ref.transpose(1, 2)) and torch.equal(k_ours, k_ref.transpose(1, 2))
        assert torch.equal(q_ours[:, :5], q[:, :5])  # prefix tokens are not rotated


def test_rope_periods_stay_fp32_when_model_is_cast_to_bf16():
    ref, ours = pair("dinov3")
    ours.to(torch.bfloat16)
    assert ours.rope_embed.periods.dtype == torch.float32
    assert ours.rope_embed(2, 3)[0].dtype == torch.float32
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        got = ours(images)
        expected = official_tokens(ref, images)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.25  # bf16 weights and activations, fp32 reference


# ------------------------------------------------------------------------------------------------- caching
def test_v2_pos_embed_cache_never_stale():
    ref, ours = pair("dinov2")
    images = torch.randn(1, 3, 84, 56)
    with torch.no_grad():
        first = ours.position_embedding(6, 4, torch.float32)
        assert ours.position_embedding(6, 4, torch.float32) is first  # cached

        # load_official_state_dict with new weights
        ref2 = official("dinov2")
        ours.load_official_state_dict(ref2.state_dict())
        torch.testing.assert_close(ours(images), official_tokens(ref2, images), atol=1e-5, rtol=1e-5)

        # plain load_state_dict back to the first weights
        ours.load_state_dict(ref.state_dict())
        torch.testing.assert_close(ours(images), official_tokens(ref, images), atol=1e-5, rtol=1e-5)

        # in-place edit (optimizer-style) of the parameter
        ours.pos_embed.mul_(2)
        ref.pos_embed.mul_(2)
        torch.testing.assert_close(ours(images), official_tokens(ref, images), atol=1e-5, rtol=1e-5)

        # an edit through .data bypasses the version counter: clear_cache() is the documented remedy
        ours.position_embedding(6, 4, torch.float32)
        ours.pos_embed.data.mul_(0.5)
        ref.pos_embed.data.mul_(0.5)
        ours.clear_cache()
        torch.testing.assert_close(ours(images), official_tokens(ref, images), atol=1e-5, rtol=1e-5)

    ours.double()
    assert ours.position_embedding(6, 4, torch.float64).dtype == torch.float64


def test_v3_rope_cache_hits_and_follows_device_dtype():
    _, ours = pair("dinov3")
    tables = ours.rope_embed(3, 4)
    assert ours.rope_embed(3, 4) is tables
    assert ours.rope_embed(4, 3) is not tables
    ours.double()
    assert ours.rope_embed(3, 4)[0].dtype == torch.float64


@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
def test_inference_mode_then_autograd(backbone):
    ref, ours = pair(backbone)
    h, w = sizes(backbone)[1]
    images = torch.randn(2, 3, h, w)
    with torch.no_grad():
        expected = official_tokens(ref, images)
    with torch.inference_mode():
        got = ours(images)
        got_again = ours(images)  # cached tables made inside inference mode
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, got_again)
    # The same module afterwards in a grad-enabled forward: tables from inference mode must not leak into it.
    ours.requires_grad_(False)
    x = images.clone().requires_grad_(True)
    ours(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
def test_gradients_match_official(backbone):
    ref, ours = pair(backbone)
    ref.double()
    ours.double()
    h, w = sizes(backbone)[1]
    images = torch.randn(2, 3, h, w, dtype=torch.float64)
    weights = torch.randn(2, ours.num_prefix_tokens + math.prod(ours.grid_size(h, w)), DIM, dtype=torch.float64)
    (official_tokens(ref, images) * weights).sum().backward()
    (ours(images) * weights).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name == "mask_token":
            assert p.grad is None or not p.grad.any()
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-9, rtol=1e-7, msg=name)
    if backbone == "dinov3":
        bias_grad = ours.blocks[0].attn.qkv.bias.grad
        assert not bias_grad[DIM:2 * DIM].any() and bias_grad[:DIM].abs().sum() > 0


def test_drop_add_residual_matches_official():
    x = torch.randn(5, 7, 3)
    fn = lambda t: 2 * t + 1  # noqa: E731
    torch.manual_seed(3)
    expected = dinov2_ref.drop_add_residual_stochastic_depth(x, fn, sample_drop_ratio=0.3)
    torch.manual_seed(3)
    got = drop_add_residual_stochastic_depth(x, fn, sample_drop_ratio=0.3)
    assert torch.equal(got, expected)
    changed = (got != x).flatten(1).any(1)
    assert changed.sum() == 3  # max(int(5 * 0.7), 1) samples get the residual, rescaled by 5/3
    torch.testing.assert_close(got[changed], x[changed] + 5 / 3 * fn(x[changed]))


# ------------------------------------------------------------------------------------------ state dict I/O
def test_v2_round_trip_is_exact():
    ref, ours = pair("dinov2")
    sd = ref.state_dict()
    out = ours.official_state_dict()
    assert list(out) == list(sd)
    for key in sd:
        assert torch.equal(out[key], sd[key]), key
    fresh = dinov2_ref.vit_large_reg(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, img_size=14 * GRID)
    fresh.load_state_dict(out, strict=True)


def test_v3_round_trip_folds_the_key_bias_mask():
    ref = official("dinov3")
    with torch.no_grad():  # released checkpoints have a zero key bias: then the round trip is exact
        for blk in ref.blocks:
            blk.attn.qkv.bias[DIM:2 * DIM] = 0
    ours = build_backbone(tiny_config("dinov3")).eval()
    ours.load_official_state_dict(ref.state_dict())
    sd, out = ref.state_dict(), ours.official_state_dict()
    assert list(out) == list(sd)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    assert "blocks.0.attn.qkv.bias_mask" not in ours.state_dict()  # no mask is kept at runtime

    # A nonzero key bias is folded (the official runtime multiplies it by zero anyway): same tokens, and the
    # exported dict loads strictly into the official module and reproduces them.
    ref = official("dinov3")
    ours.load_official_state_dict(ref.state_dict())
    out = ours.official_state_dict()
    mask = ref.blocks[0].attn.qkv.bias_mask
    assert torch.equal(out["blocks.0.attn.qkv.bias"], ref.blocks[0].attn.qkv.bias.detach() * mask)
    reloaded = dinov3_ref.vit_large(embed_dim=DIM, depth=DEPTH, num_heads=HEADS).eval()
    reloaded.load_state_dict(out, strict=True)
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(official_tokens(reloaded, images), official_tokens(ref, images), atol=0, rtol=0)
        torch.testing.assert_close(ours(images), official_tokens(ref, images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
def test_strict_loading_lists_every_problem(backbone):
    ref = official(backbone)
    ours = build_backbone(tiny_config(backbone))
    sd = dict(ref.state_dict())
    del sd["norm.weight"]
    sd["head.weight"] = torch.zeros(3)
    sd["cls_token"] = torch.zeros(1, 2, DIM)
    with pytest.raises(StateDictError) as info:
        ours.load_official_state_dict(sd)
    message = str(info.value)
    assert "missing keys (1)" in message and "norm.weight" in message
    assert "unexpected keys (1)" in message and "head.weight" in message
    assert "cls_token: expected shape (1, 1, 64), got (1, 2, 64)" in message

    # Non-strict: missing/unexpected are reported, not raised; a wrong shape still raises.
    sd["cls_token"] = ref.cls_token.detach()
    check = ours.load_official_state_dict(sd, strict=False)
    assert check.missing_keys == ["norm.weight"] and check.unexpected_keys == ["head.weight"]
    assert torch.equal(ours.cls_token, ref.cls_token)
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(5, 5)
    with pytest.raises(StateDictError, match="blocks.1.mlp.fc1.weight: expected shape"):
        ours.load_official_state_dict(sd, strict=False)


def test_prefixed_checkpoint_gets_a_hint():
    ref = official("dinov2")
    ours = build_backbone(tiny_config("dinov2"))
    with pytest.raises(StateDictError, match="prefixed with 'backbone.'"):
        ours.load_official_state_dict({f"backbone.{k}": v for k, v in ref.state_dict().items()})


def test_check_state_dict_rejects_non_tensors():
    with pytest.raises(StateDictError, match="a: expected a tensor, got list"):
        check_state_dict({"a": (2,)}, {"a": [1, 2]})
    with pytest.raises(StateDictError, match="expected a mapping"):
        check_state_dict({"a": (2,)}, [("a", torch.zeros(2))])


def test_v3_rejects_foreign_mask_and_periods():
    ref = official("dinov3")
    ours = build_backbone(tiny_config("dinov3"))
    sd = dict(ref.state_dict())
    sd["blocks.1.attn.qkv.bias_mask"] = torch.ones(3 * DIM)
    with pytest.raises(StateDictError, match="blocks.1.attn.qkv.bias_mask is not the DINOv3 key-bias mask"):
        ours.load_official_state_dict(sd)
    other = build_backbone(tiny_config("dinov3", rope_base=10.0))
    with pytest.raises(StateDictError, match="rope_embed.periods .* does not match .*rope_base=10.0"):
        other.load_official_state_dict(ref.state_dict())


# ------------------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("images, error, match", [
    (torch.zeros(3, 56, 56), ValueError, r"shape \[B, 3, H, W\], got shape \(3, 56, 56\)"),
    (torch.zeros(1, 1, 56, 56), ValueError, "3 channels"),
    (torch.zeros(1, 3, 56, 56, dtype=torch.uint8), TypeError, "floating-point"),
    (torch.zeros(1, 3, 225, 56), ValueError, "image height 225 is not a multiple of the patch size 14"),
    (torch.zeros(1, 3, 56, 100), ValueError, "image width 100 is not a multiple of the patch size 14"),
    (torch.zeros(1, 3, 0, 56), ValueError, "image height 0 is smaller than the patch size 14"),
    (torch.zeros(1, 3, 56, 56, device="meta"), ValueError, "images are on meta but the backbone is on cpu"),
    ([[0.0]], TypeError, "must be a torch.Tensor"),
])
def test_bad_images_raise_clear_errors(images, error, match):
    ours = build_backbone(tiny_config("dinov2"))
    with pytest.raises(error, match=match):
        ours(images)


@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
def test_compiles_without_graph_breaks(backbone):
    _, ours = pair(backbone)
    images = torch.randn(1, 3, *sizes(backbone)[1])
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), ours(images), atol=1e-6, rtol=1e-6)


def test_grid_size_and_dtype_cast():
    ours = build_backbone(tiny_config("dinov2")).eval()
    assert ours.grid_size(56, 84) == (4, 6)
    with pytest.raises(ValueError, match="image height 15 is not a multiple of the patch size 14"):
        ours.grid_size(15, 14)
    images = torch.randn(1, 3, 28, 42, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), ours(images.float()))


def test_build_backbone_and_config_errors():
    assert type(build_backbone(tiny_config("dinov2"))) is DinoV2Backbone
    assert type(build_backbone(tiny_config("dinov3"))) is DinoV3Backbone
    with pytest.raises(ValueError, match="needs config.backbone='dinov3'"):
        DinoV3Backbone(tiny_config("dinov2"))
    with pytest.raises(ValueError, match="head dim to be a multiple of 4"):
        DinoV3Backbone(tiny_config("dinov3", vision_dim=24, embed_dim=48))


# ----------------------------------------------------------------------------------------- shared layers
def test_attention_passes_strided_views_to_ops_at_call_time(monkeypatch):
    seen = {}
    original = dinotxt_fast.ops.attention

    def spy(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v, kwargs=kwargs)
        return original(q, k, v, **kwargs)

    attn = Attention(32, 4, causal=True)
    monkeypatch.setattr(dinotxt_fast.ops, "attention", spy)
    attn(torch.randn(2, 5, 32))
    q, k, v = seen["q"], seen["k"], seen["v"]
    assert q.shape == (2, 5, 4, 8) and seen["kwargs"] == {"causal": True}
    storage = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    assert len(storage) == 1 and not any(t.is_contiguous() for t in (q, k, v))  # views of one qkv tensor


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_manual_float64(causal):
    attn = Attention(24, 3, qkv_bias=False, causal=causal).double()
    assert attn.qkv.bias is None and attn.proj.bias is not None
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    q, k, v = (attn.qkv(x).view(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    if causal:
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 24))
    torch.testing.assert_close(attn(x), expected, atol=1e-12, rtol=1e-12)


def test_masked_key_bias_stays_zero():
    attn = Attention(16, 2, mask_k_bias=True)
    with torch.no_grad():
        attn.qkv.bias.normal_()
        attn.qkv.bias[16:32] = 0
    attn(torch.randn(1, 3, 16)).sum().backward()
    assert not attn.qkv.bias.grad[16:32].any() and attn.qkv.bias.grad[32:].any()
    with pytest.raises(ValueError, match="mask_k_bias=True needs qkv_bias=True"):
        Attention(16, 2, qkv_bias=False, mask_k_bias=True)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        Attention(10, 3)


def test_ffn_layers_and_layerscale():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    mlp = Mlp(8, 12).double()
    h = mlp.fc1(x)
    torch.testing.assert_close(mlp(x), mlp.fc2(0.5 * h * (1 + torch.erf(h / math.sqrt(2)))))  # exact-erf GELU
    swiglu = SwiGLUFFN(8, 12).double()
    a, b = swiglu.w1(x), swiglu.w2(x)
    torch.testing.assert_close(swiglu(x), swiglu.w3(a * torch.sigmoid(a) * b))
    assert SwiGLUFFN(8, 12, bias=False).w3.bias is None
    ls = LayerScale(8, 1e-5)
    assert torch.equal(ls.gamma.detach(), torch.full((8,), 1e-5))
    torch.testing.assert_close(ls(x.float()), x.float() * 1e-5)

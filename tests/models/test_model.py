"""DinoTxt against the transcribed official DINO.txt (tests/official/dinotxt_ref.py + the backbone oracles).

Tiny models: vision dim 64, depth 2, 4 heads, head blocks 2, text dim 64, 2 layers, 4 heads, context 77,
vocab 49408, embed 128. Official-layout state dicts come from randomised oracle models (every parameter
perturbed, LayerScale included, so no block is close to the identity).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dinotxt_fast.models._state import StateDictError
from dinotxt_fast.models.checkpoint import CheckpointError
from dinotxt_fast.models.config import make_config
from dinotxt_fast.models.dinotxt import DinoTxt, create_model
from tests.official import dinotxt_ref, dinov2_ref, dinov3_ref

SOT, EOT = 49406, 49407
TINY = dict(vision_dim=64, vision_depth=2, vision_heads=4, head_blocks=2, text_dim=64, text_layers=2,
            text_heads=4, context_length=77, vocab_size=49408)
TEXT_SIZES = dict(embed_dim=128, context_length=77, vocab_size=49408, text_dim=64, text_heads=4, text_layers=2)
TOL = dict(rtol=1e-5, atol=2e-5)  # fp32 rounding: SDPA vs explicit softmax, fused vs separate LayerNorm


def _randomize(module: torch.nn.Module) -> None:
    """Move every parameter well away from its init: LayerNorm weights and LayerScale gammas around 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") or (name.endswith("weight") and p.ndim == 1):
                p.uniform_(0.5, 1.5)
            elif name.endswith("logit_scale"):
                p.fill_(3.0)
            else:
                p.normal_(0.0, 0.15)


def _ids(lengths, width=77):
    """[SOT, random words, EOT, 0 padding] rows; `lengths` counts SOT and EOT."""
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = SOT
        ids[row, 1:n - 1] = torch.randint(1, SOT, (n - 2,))
        ids[row, n - 1] = EOT
    return ids


def _v2_oracle():
    torch.manual_seed(1)
    backbone = dinov2_ref.vit_large_reg(embed_dim=64, depth=2, num_heads=4, patch_size=14, img_size=56,
                                        num_register_tokens=4)
    ref = dinotxt_ref.build_dinotxt(backbone, release="v2", **TEXT_SIZES)
    _randomize(ref)
    return ref


def _v3_oracle():
    torch.manual_seed(7)
    backbone = dinov3_ref.vit_large(embed_dim=64, depth=2, num_heads=4, patch_size=16, n_storage_tokens=4)
    ref = dinotxt_ref.build_dinotxt(backbone, release="v3", **TEXT_SIZES)
    _randomize(ref)
    return ref


@pytest.fixture(scope="module")
def v3():
    """(oracle, our model loaded from the oracle's backbone file and single weights file)."""
    ref = _v3_oracle()
    ours = create_model("dinov3_vitl16_dinotxt", **TINY).eval()
    ours.load_official(**dinotxt_ref.official_files(ref))
    return ref, ours


@pytest.fixture(scope="module")
def v2():
    """(oracle, our model loaded from the oracle's three release files)."""
    ref = _v2_oracle()
    ours = create_model("dinov2_vitl14_reg4_dinotxt", pos_embed_grid=4, **TINY).eval()
    ours.load_official(**dinotxt_ref.official_files(ref))
    return ref, ours


def _assert_embeddings_match(ours, ref, images, ids):
    """encode_image / encode_text of our model equal the official one's, raw and normalised."""
    for normalize in (False, True):
        torch.testing.assert_close(ours.encode_image(images, normalize=normalize),
                                   ref.encode_image(images, normalize=normalize), **TOL)
        torch.testing.assert_close(ours.encode_text(ids, normalize=normalize),
                                   ref.encode_text(ids, normalize=normalize), **TOL)


@pytest.mark.parametrize("size", [(56, 56), (42, 70)])  # the stored 4x4 grid, and a resized 3x5 one
def test_v2_matches_official(v2, size):
    ref, ours = v2
    torch.manual_seed(2)
    images = torch.randn(2, 3, *size)
    ids = _ids([5, 12, 77])[:2]
    with torch.no_grad():
        _assert_embeddings_match(ours, ref, images, ids)
        cls, head_patches, backbone_patches = ours.image_tokens(images)
        ref_cls, ref_patches = ref.get_visual_class_and_patch_tokens(images)
        ref_backbone = ref.visual_model.backbone.get_intermediate_layers(images, n=1)[0]
    torch.testing.assert_close(cls, ref_cls, **TOL)
    torch.testing.assert_close(head_patches, ref_patches, **TOL)
    torch.testing.assert_close(backbone_patches, ref_backbone, **TOL)
    assert head_patches.shape == (2, size[0] // 14 * size[1] // 14, 64)


def test_text_truncation_is_exact(v2):
    ref, ours = v2
    torch.manual_seed(3)
    ids = _ids([3, 9, 30, 77, 2])
    ids[4, 5] = 17  # junk after the EOT must not matter either (causal attention, pooled at the first EOT)
    lengths = []
    hook = ours.text.backbone.blocks[0].register_forward_hook(lambda m, args, out: lengths.append(out.shape[1]))
    try:
        with torch.no_grad():
            truncated = ours.text(ids)
            full = ours.text(ids, truncate=False)
            official = ref.encode_text(ids)
            short = ours.text(ids[:3, :40])  # the longest of these texts ends at position 29
    finally:
        hook.remove()
    assert lengths == [77, 77, 30]  # the blocks ran on max(argmax(ids)) + 1 positions only
    torch.testing.assert_close(truncated, full, **TOL)
    torch.testing.assert_close(truncated, official, **TOL)
    torch.testing.assert_close(short, official[:3], **TOL)


def test_round_trip_v2(v2, tmp_path):
    _, ours = v2
    exported = ours.export_official(tmp_path)
    assert sorted(exported) == ["backbone", "text_encoder", "vision_head"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pth", "text_encoder.pth", "vision_head.pth"]
    assert all(k.startswith(("block_list.", "ln_final.")) for k in exported["vision_head"])
    fresh = create_model("dinov2_vitl14_reg4_dinotxt", pos_embed_grid=4, **TINY)
    fresh.load_official(backbone=tmp_path / "backbone.pth", vision_head=str(tmp_path / "vision_head.pth"),
                        text_encoder=tmp_path / "text_encoder.pth")
    again = fresh.export_official()
    for name, sd in exported.items():
        assert list(again[name]) == list(sd)
        for key, value in sd.items():
            assert torch.equal(again[name][key], value), (name, key)
    # The v2 release has no logit scale: loading keeps the model's own value.
    assert fresh.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_official_oracle_loads_our_export(v2):
    # The other direction: the official modules load our export strictly and compute the same embeddings.
    _, ours = v2
    files = ours.export_official()
    torch.manual_seed(4)
    ref = dinotxt_ref.build_dinotxt(dinov2_ref.vit_large_reg(embed_dim=64, depth=2, num_heads=4, patch_size=14,
                                                              img_size=56, num_register_tokens=4),
                                    release="v2", **TEXT_SIZES)
    ref.visual_model.backbone.model.load_state_dict(files["backbone"], strict=True)
    ref.visual_model.head.load_state_dict(files["vision_head"], strict=True)
    ref.text_model.load_state_dict(files["text_encoder"], strict=True)
    images, ids = torch.randn(1, 3, 56, 42), _ids([7])
    with torch.no_grad():
        torch.testing.assert_close(ref.encode_image(images), ours.encode_image(images), **TOL)
        torch.testing.assert_close(ref.encode_text(ids), ours.encode_text(ids), **TOL)


def test_strict_loading_errors_list_keys_and_leave_the_model_unchanged(v2, tmp_path):
    ref, _ = v2
    files = dinotxt_ref.official_files(ref)
    model = create_model("dinov2_vitl14_reg4_dinotxt", pos_embed_grid=4, **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    head = dict(files["vision_head"])
    del head["block_list.1.mlp.w2.bias"]
    head["block_list.0.extra"] = torch.zeros(1)
    head["ln_final.weight"] = torch.ones(3)
    with pytest.raises(StateDictError) as info:
        model.load_official(backbone=files["backbone"], vision_head=head, text_encoder=files["text_encoder"])
    message = str(info.value)
    for expected in ("vision_head", "block_list.1.mlp.w2.bias", "block_list.0.extra", "ln_final.weight",
                     "(64,)", "(3,)"):
        assert expected in message
    text = {k: v for k, v in files["text_encoder"].items() if k != "head.linear_projection.weight"}
    with pytest.raises(StateDictError, match="(?s)text_encoder.*head.linear_projection.weight"):
        model.load_official(text_encoder=text)
    backbone = {k: v for k, v in files["backbone"].items() if k != "norm.bias"}
    with pytest.raises(StateDictError, match=r"(?s)backbone \(the given state dict\).*norm.bias"):
        model.load_official(backbone=backbone, vision_head=files["vision_head"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed load"

    # strict=False: missing and unexpected keys pass (missing ones keep their values), shapes never do.
    lenient = {k: v for k, v in files["vision_head"].items() if k != "ln_final.bias"}
    lenient["something_else"] = torch.zeros(2)
    model.load_official(vision_head=lenient, strict=False)
    assert torch.equal(model.head.blocks[1].mlp.w3.weight, files["vision_head"]["block_list.1.mlp.w3.weight"])
    assert torch.equal(model.head.ln_final.bias, before["head.ln_final.bias"])
    with pytest.raises(StateDictError, match="ln_final.weight"):
        model.load_official(vision_head={"ln_final.weight": torch.ones(3)}, strict=False)


def test_wrong_files_and_wrong_release_are_clear_errors(v2, tmp_path):
    ref, _ = v2
    files = dinotxt_ref.official_files(ref)
    model = create_model("dinov2_vitl14_reg4_dinotxt", pos_embed_grid=4, **TINY)
    with pytest.raises(ValueError, match="at least one file"):
        model.load_official()
    with pytest.raises(ValueError, match="weights= belong to the dinov3 release"):
        model.load_official(weights=files["vision_head"])
    with pytest.raises(StateDictError, match="looks like the DINOv2 DINO.txt vision head file"):
        model.load_official(text_encoder=files["vision_head"])
    with pytest.raises(ValueError, match="does not look like a dinov2 backbone.*text encoder"):
        model.load_official(backbone=files["text_encoder"])
    v3_model = create_model("dinov3_vitl16_dinotxt", **TINY)
    with pytest.raises(ValueError, match="is a dinov2 backbone but this model's backbone is dinov3"):
        v3_model.load_official(backbone=files["backbone"])
    with pytest.raises(ValueError, match="vision_head=, text_encoder= belong to the dinov2 release"):
        v3_model.load_official(vision_head=files["vision_head"], text_encoder=files["text_encoder"])
    with pytest.raises(FileNotFoundError, match="missing_head.pth"):
        model.load_official(vision_head=tmp_path / "missing_head.pth")
    corrupt = tmp_path / "text.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="text_encoder checkpoint .*text.pth"):
        model.load_official(text_encoder=corrupt)
    # A head saved under our / the v3 block-list name loads too.
    model.load_official(vision_head=model.head.state_dict())
    # Training-checkpoint wrappers are unwrapped.
    model.load_official(text_encoder={"model": files["text_encoder"], "epoch": 3})
    assert torch.equal(model.text.backbone.positional_embedding, files["text_encoder"]["backbone.positional_embedding"])


def test_bad_inputs_raise_clear_errors():
    model = create_model("dinov2_vitl14_reg4_dinotxt", pos_embed_grid=4, **TINY)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model.encode_image(torch.randn(1, 3, 56, 50))
    with pytest.raises(TypeError, match="floating"):
        model.encode_image(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        model.image_tokens(torch.randn(1, 1, 56, 56))
    ok = _ids([4])
    with pytest.raises(ValueError, match="length 78, longer than the context length 77"):
        model.encode_text(torch.cat([ok, ok[:, :1]], dim=1))
    with pytest.raises(TypeError, match="int64"):
        model.encode_text(ok.int())
    with pytest.raises(ValueError, match="2-D"):
        model.encode_text(ok[0])
    with pytest.raises(ValueError, match=r"\[0, 49408\).*49408"):
        model.encode_text(torch.full((1, 5), 49408))
    with pytest.raises(ValueError, match="non-empty"):
        model.encode_text(ok[:0])
    with pytest.raises(TypeError, match="unknown DinoTxtConfig field"):
        create_model(vision_width=3)


def test_backbone_is_frozen_and_builds_no_graph():
    model = create_model("dinov2_vitl14_reg4_dinotxt", pos_embed_grid=4, **TINY).train()
    assert model.backbone_frozen and not model.backbone.training  # frozen: stays in eval mode
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert model.logit_scale.shape == () and model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    images, ids = torch.randn(4, 3, 56, 56), _ids([4, 6, 8, 10])
    tokens = model.backbone_tokens(images)
    assert tokens.grad_fn is None and not tokens.requires_grad
    img, txt, scale = model(images, ids)
    assert scale is model.logit_scale
    assert not torch.allclose(img.norm(dim=-1), torch.ones(4))  # forward returns unnormalised embeddings
    loss = (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T * scale.exp()).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.blocks[0].attn.qkv.weight.grad is not None
    assert model.head.ln_final.weight.grad is not None  # through the fused LayerNorm of ops.patch_pool
    assert model.text.backbone.token_embedding.weight.grad is not None and model.logit_scale.grad is not None
    # Unfreezing gives the backbone a graph again.
    model.backbone.requires_grad_(True)
    assert model.backbone_tokens(images).grad_fn is not None
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))


@pytest.mark.parametrize("release", ["v2", "v3"])
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.3])
def test_drop_path_style_per_release_matches_official(release, rate, v2, v3):
    """DINOv2's block draws per-sample DropPath for rates <= 0.1 and batch subsets above; DINOv3's always uses the
    batch subset: same draws as the official blocks at each rate."""
    ref, ours = v2 if release == "v2" else v3
    ref_head = ref.visual_model.head
    ref_blocks = ref_head.block_list if release == "v2" else ref_head.blocks
    saved = [(b.drop_path, r.sample_drop_ratio) for b, r in zip(ours.head.blocks, ref_blocks)]
    tokens = torch.randn(8, 17 if release == "v2" else 21, 64, generator=torch.Generator().manual_seed(3))
    try:
        for block, ref_block in zip(ours.head.blocks, ref_blocks):
            block.drop_path = ref_block.sample_drop_ratio = rate
            if release == "v2":
                ref_block.drop_path1.drop_prob = rate
        ours.head.train()
        ref_head.train()
        torch.manual_seed(6)
        mine = ours.head(tokens)
        torch.manual_seed(6)
        official = ref_head(tokens)
    finally:
        for (ours_rate, ref_rate), block, ref_block in zip(saved, ours.head.blocks, ref_blocks):
            block.drop_path, ref_block.sample_drop_ratio = ours_rate, ref_rate
            if release == "v2":
                ref_block.drop_path1.drop_prob = ref_rate
        ours.head.eval()
        ref_head.eval()
    torch.testing.assert_close(mine, official, **TOL)
    assert not torch.allclose(mine, ours.head(tokens))


def test_drop_path_only_in_training_and_matches_official(v2):
    ref, ours = v2
    torch.manual_seed(5)
    tokens = torch.randn(8, 1 + 4 + 12, 64)
    try:
        ours.head.train()
        ref.visual_model.head.train()
        torch.manual_seed(6)
        train_a = ours.head(tokens)
        train_b = ours.head(tokens)
        torch.manual_seed(6)  # same random subsets: the official batch-subset drop-path, draw for draw
        official = ref.visual_model.head(tokens)
    finally:
        ours.head.eval()
        ref.visual_model.head.eval()
    eval_a, eval_b = ours.head(tokens), ours.head(tokens)
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(train_a, train_b)
    assert not torch.allclose(train_a, eval_a)
    torch.testing.assert_close(train_a, official, **TOL)
    torch.testing.assert_close(eval_a, ref.visual_model.head(tokens), **TOL)
    # With drop-path 0, training and eval agree.
    no_drop = create_model("dinov2_vitl14_reg4_dinotxt", pos_embed_grid=4, head_drop_path=0.0, **TINY)
    assert torch.equal(no_drop.head.train()(tokens), no_drop.head.eval()(tokens))


def test_encode_image_normalises_one_vector():
    model = create_model("dinov2_vitl14_reg4_dinotxt", pos_embed_grid=4, **TINY).eval()
    _randomize(model.head)
    images = torch.randn(3, 3, 28, 42)
    raw = model.encode_image(images)
    assert isinstance(model, DinoTxt) and raw.shape == (3, 128)
    torch.testing.assert_close(model.encode_image(images, normalize=True), F.normalize(raw, dim=-1))
    cls, head_patches, _ = model.image_tokens(images)
    torch.testing.assert_close(raw, torch.cat([cls, head_patches.mean(1)], dim=-1), **TOL)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_v3_matches_official(v3, size):
    ref, ours = v3
    torch.manual_seed(8)
    images = torch.randn(2, 3, *size)
    ids = _ids([6, 77])
    with torch.no_grad():
        _assert_embeddings_match(ours, ref, images, ids)
        cls, head_patches, backbone_patches = ours.image_tokens(images)
        ref_cls, ref_patches, ref_backbone = ref.get_visual_class_and_patch_tokens(images)
    torch.testing.assert_close(cls, ref_cls, **TOL)
    torch.testing.assert_close(head_patches, ref_patches, **TOL)
    torch.testing.assert_close(backbone_patches, ref_backbone, **TOL)
    assert ours.logit_scale.shape == () and ours.logit_scale.item() == ref.logit_scale.item() == 3.0


def test_round_trip_v3_and_official_load(v3, tmp_path):
    ref, ours = v3
    exported = ours.export_official(tmp_path)
    assert sorted(exported) == ["backbone", "weights"]
    weights = exported["weights"]
    assert weights["logit_scale"].shape == (1,)
    assert all(k.startswith(("visual_model.head.blocks.", "visual_model.head.ln_final.", "text_model.backbone.",
                              "text_model.head.linear_projection.")) or k == "logit_scale" for k in weights)
    # The official model loads the export strictly (backbone keys under visual_model.backbone).
    full = {**weights, **{"visual_model.backbone." + k: v for k, v in exported["backbone"].items()}}
    ref_sd = ref.state_dict()
    assert sorted(full) == sorted(ref_sd)
    for key, value in ref_sd.items():
        if key.endswith("attn.qkv.bias"):
            # The backbone folds the official key-bias mask into the bias (what the official forward computes).
            value = value * ref_sd[key + "_mask"]
        assert torch.equal(full[key], value), key
    fresh = create_model("dinov3_vitl16_dinotxt", **TINY)
    fresh.load_official(backbone=tmp_path / "backbone.pth", weights=tmp_path / "weights.pth")
    again = fresh.export_official()
    for name, sd in exported.items():
        assert list(again[name]) == list(sd)
        assert all(torch.equal(again[name][k], v) for k, v in sd.items()), name
    # A full official model state dict (backbone included) also loads as `weights`.
    whole = create_model("dinov3_vitl16_dinotxt", **TINY)
    whole.load_official(weights=ref_sd)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ValueError, match="pass one of them"):
        whole.load_official(backbone=exported["backbone"], weights=ref_sd)


def test_v3_strict_errors_name_the_keys_in_the_file(v3):
    ref, _ = v3
    files = dinotxt_ref.official_files(ref)
    weights = dict(files["weights"])
    del weights["text_model.backbone.ln_final.bias"]
    weights["visual_model.head.extra"] = torch.zeros(1)
    weights["logit_scale"] = torch.zeros(2)
    model = create_model("dinov3_vitl16_dinotxt", **TINY)
    with pytest.raises(CheckpointError, match="logit_scale must hold one value"):
        model.load_official(weights=weights)
    weights["logit_scale"] = torch.tensor(1.0)  # a 0-d value is accepted as well as the official [1]
    with pytest.raises(StateDictError) as info:
        model.load_official(weights=weights)
    assert "text_model.backbone.ln_final.bias" in str(info.value)
    assert "visual_model.head.extra" in str(info.value)
    model.load_official(weights=weights, strict=False)
    assert model.logit_scale.item() == 1.0
    with pytest.raises(ValueError, match="is a dinov3 backbone but this model's backbone is dinov2"):
        create_model("dinov2_vitl14_reg4_dinotxt", pos_embed_grid=4, **TINY).load_official(backbone=files["backbone"])


def test_layer_norm_eps_and_sizes_match_official(v2, v3):
    for ref, ours in (v2, v3):
        for ref_part, our_part in ((ref.visual_model.head, ours.head), (ref.text_model, ours.text)):
            ref_eps = [m.eps for m in ref_part.modules() if isinstance(m, torch.nn.LayerNorm)]
            our_eps = [m.eps for m in our_part.modules() if isinstance(m, torch.nn.LayerNorm)]
            assert ref_eps == our_eps and set(our_eps) == {1e-5}
    # The official head's SwiGLU width (2/3 of 4 * dim, aligned to 64) at the full size: 2752.
    full = dinotxt_ref.SwiGLUFFNAligned(1024, 4096, align_to=64)
    assert full.w1.out_features == make_config("dinov2_vitl14_reg4_dinotxt").head_mlp_hidden == 2752

"""Backbones in the Hugging Face transformers and timm layouts (dinotxt_fast/models/layouts.py, foreign.py).

transformers installs here: its own Dinov2Model / Dinov2WithRegistersModel / DINOv3ViTModel classes build the tiny
random models, and our converted backbones must compute their outputs. timm needs torchvision, which does not import
beside the CPU torch wheel, so its layouts come from transcriptions of timm's own converters (vision_transformer.py
`_convert_dinov2`, eva.py `checkpoint_filter_fn`) applied to official-layout weights of the transcribed official
models (tests/official).
"""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from dinotxt_fast.models._state import StateDictError
from dinotxt_fast.models.checkpoint import CheckpointError
from dinotxt_fast.models.config import DinoTxtConfig
from dinotxt_fast.models.dinotxt import create_model
from dinotxt_fast.models.foreign import infer_backbone_fields, load_backbone
from dinotxt_fast.models.layouts import detect_layout
from dinotxt_fast.models.vit import build_backbone
from tests.official import dinov2_ref, dinov3_ref

transformers = pytest.importorskip("transformers")

DIM, DEPTH, HEADS = 32, 2, 4
TOL = dict(rtol=1e-5, atol=2e-5)  # fp32 rounding: attention kernels, RoPE tables computed in another order
TINY_TEXT = dict(head_blocks=1, text_dim=32, text_layers=1, text_heads=2)


def _randomize(module: torch.nn.Module) -> None:
    """Every parameter away from its init (norm weights and layer scales around 1), so no block is an identity."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "lambda" in name or "gamma" in name or "ls" in name):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)


def hf_dinov2(registers: bool, swiglu: bool = False):
    kind = "Dinov2WithRegisters" if registers else "Dinov2"
    extra = {"num_register_tokens": 4} if registers else {}
    config = getattr(transformers, kind + "Config")(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                                  image_size=28, patch_size=7, use_swiglu_ffn=swiglu, **extra)
    model = getattr(transformers, kind + "Model")(config)
    _randomize(model)
    return model.eval()


def hf_dinov3(gated: bool = False):
    config = transformers.DINOv3ViTConfig(hidden_size=DIM, intermediate_size=48 if gated else 64,
                                          num_hidden_layers=DEPTH, num_attention_heads=HEADS, num_register_tokens=4,
                                          patch_size=8, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu")
    model = transformers.DINOv3ViTModel(config)
    _randomize(model)
    return model.eval()


HF_CASES = {
    "Dinov2Model": (lambda: hf_dinov2(False), [(28, 28), (35, 21)]),
    "Dinov2WithRegistersModel": (lambda: hf_dinov2(True), [(28, 28), (21, 49)]),
    "Dinov2WithRegistersModel-swiglu": (lambda: hf_dinov2(True, swiglu=True), [(28, 28), (42, 14)]),
    "DINOv3ViTModel": (lambda: hf_dinov3(), [(32, 32), (24, 40)]),
    "DINOv3ViTModel-gated": (lambda: hf_dinov3(gated=True), [(32, 48)]),
}


def _hf_tokens(model, images):
    with torch.no_grad():
        return model(pixel_values=images).last_hidden_state


def _sources(model, tmp_path):
    """The same weights as a transformers-5 module state dict, a saved folder, and the folder's weights file."""
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return {"state dict": dict(model.state_dict()), "folder": folder, "file": folder / "model.safetensors"}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_transformers_backbones_load_and_compute_the_same_tokens(case, tmp_path):
    build, sizes = HF_CASES[case]
    hf = build()
    for kind, source in _sources(hf, tmp_path).items():
        # A bare state dict does not say how many heads (a folder's config.json does; releases use 64-wide ones).
        ours, report = load_backbone(source, **({"vision_heads": HEADS} if kind == "state dict" else {}))
        assert report.layout == "Hugging Face transformers " + case.split("-")[0], kind
        assert not report.missing_keys and not report.unexpected_keys, kind
        in_file = source if kind == "state dict" else load_file(tmp_path / "hf" / "model.safetensors")
        assert sorted(report.loaded_keys) == sorted(in_file), kind
        for h, w in sizes:
            images = torch.randn(2, 3, h, w)
            with torch.no_grad():
                torch.testing.assert_close(ours(images), _hf_tokens(hf, images), **TOL,
                                           msg=lambda text, where=f"{kind} {h}x{w}": f"{where}: {text}")


def test_transformers_folder_loads_into_a_dinotxt_model_and_reports_the_layout(tmp_path):
    hf = hf_dinov2(True)
    folder = _sources(hf, tmp_path)["folder"]
    model = create_model("dinov2_vitl14_reg4_dinotxt", vision_dim=DIM, vision_depth=DEPTH, vision_heads=HEADS,
                         patch_size=7, pos_embed_grid=4, **TINY_TEXT)
    model.load_official(backbone=folder)
    report = model.load_report["backbone"]
    assert report.layout == "Hugging Face transformers Dinov2WithRegistersModel"
    assert report.filled_keys == [] and "tensors loaded" in report.summary()
    images = torch.randn(1, 3, 35, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone_tokens(images), _hf_tokens(hf, images), **TOL)
    # A sharded save (index + shards) is the same checkpoint.
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours, _ = load_backbone(tmp_path / "sharded")
    with torch.no_grad():
        torch.testing.assert_close(ours(images), _hf_tokens(hf, images), **TOL)


def test_dinov2_without_registers_keeps_transformers_resize_and_notes_the_difference(tmp_path):
    hf = hf_dinov2(False)
    ours, report = load_backbone(_sources(hf, tmp_path)["folder"])
    assert ours.config.pos_embed_antialias is False and report.notes == []
    model = create_model("dinov2_vitl14_reg4_dinotxt", vision_dim=DIM, vision_depth=DEPTH, vision_heads=HEADS,
                         patch_size=7, pos_embed_grid=4, num_register_tokens=0, **TINY_TEXT)
    model.load_official(backbone=tmp_path / "hf")
    assert "without antialiasing" in model.load_report["backbone"].notes[0]


def test_transformers_errors_name_the_keys_in_the_file(tmp_path):
    hf = hf_dinov2(True)
    sd = dict(hf.state_dict())
    del sd["encoder.layer.1.attention.k_proj.weight"]
    sd["classifier.weight"] = torch.zeros(3, DIM)
    model = create_model("dinov2_vitl14_reg4_dinotxt", vision_dim=DIM, vision_depth=DEPTH, vision_heads=HEADS,
                         patch_size=7, pos_embed_grid=4, **TINY_TEXT)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with pytest.raises(StateDictError) as info:
        model.load_official(backbone=sd)
    message = str(info.value)
    assert "Hugging Face transformers Dinov2WithRegistersModel layout" in message
    assert "missing keys (1)" in message and "encoder.layer.1.attention.k_proj.weight" in message
    assert "unexpected keys (1)" in message and "classifier.weight" in message
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    # strict=False: the rest loads, and the report names what was missing and left over.
    model.load_official(backbone=sd, strict=False)
    report = model.load_report["backbone"]
    assert report.missing_keys == ["encoder.layer.1.attention.k_proj.weight"]
    assert report.unexpected_keys == ["classifier.weight"]
    assert torch.equal(model.backbone.cls_token, hf.embeddings.cls_token)
    # Nothing matching is an error even when not strict (it used to "load" 0 of 36 tensors silently).
    with pytest.raises(StateDictError, match="none of its 2 keys matches"):
        model.load_official(backbone={"foo.weight": torch.zeros(2), "bar": torch.zeros(1)}, strict=False)


def test_a_different_size_names_what_the_file_holds():
    big = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=48, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=28, patch_size=7,
        num_register_tokens=4))
    model = create_model("dinov2_vitl14_reg4_dinotxt", vision_dim=DIM, vision_depth=DEPTH, vision_heads=HEADS,
                         patch_size=7, pos_embed_grid=4, **TINY_TEXT)
    with pytest.raises(StateDictError, match=r"(?s)embeddings.cls_token: expected shape \(1, 1, 32\), got "
                                             r"\(1, 1, 48\).*the file holds a dinov2 backbone with vision_dim=48"):
        model.load_official(backbone=dict(big.state_dict()))
    v3 = create_model("dinov3_vitl16_dinotxt", vision_dim=DIM, vision_depth=DEPTH, vision_heads=HEADS, **TINY_TEXT)
    with pytest.raises(ValueError, match="is a dinov2 backbone but this model's backbone is dinov3 .*"
                                         "Dinov2WithRegistersModel"):
        v3.load_official(backbone=dict(big.state_dict()))


def test_a_config_json_that_contradicts_the_model_is_refused(tmp_path):
    folder = _sources(hf_dinov3(), tmp_path)["folder"]
    model = create_model("dinov3_vitl16_dinotxt", vision_dim=DIM, vision_depth=DEPTH, vision_heads=2,
                         vision_mlp_hidden=64, **TINY_TEXT)
    with pytest.raises(CheckpointError, match=r"config.json.*num_attention_heads=4 \(this model has vision_heads=2\)"):
        model.load_official(backbone=folder)
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layer_norm_eps=1e-06"):
        load_backbone(folder)


# ------------------------------------------------------------------------------------------------------ timm
def timm_convert_dinov2(sd):
    """timm vision_transformer.py `_convert_dinov2`, transcribed: timm's form of an official DINOv2 file."""
    sd, out = dict(sd), {}
    sd.pop("mask_token", None)
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + sd["pos_embed"][:, 0]
        out["pos_embed"] = sd.pop("pos_embed")[:, 1:]
    for k, v in sd.items():
        if re.match(r"blocks\.(\d+)\.mlp\.w12\.(?:weight|bias)", k):
            out[k.replace("w12", "fc1")] = v
            continue
        elif re.match(r"blocks\.(\d+)\.mlp\.w3\.(?:weight|bias)", k):
            out[k.replace("w3", "fc2")] = v
            continue
        out[k] = v
    return out


def timm_convert_dinov3(sd, qkv_bias: bool):
    """timm eva.py `checkpoint_filter_fn`, DINOv3 branch, transcribed (`qkv_bias`: the *_qkvb model variants)."""
    out = {}
    for k, v in sd.items():
        if "rope" in k and not k == "rope.freqs":
            continue
        if any(k.endswith(f) for f in [".periods", ".bias_mask", "mask_token"]) or k.startswith("local_cls_norm"):
            continue
        if k.endswith("qkv.bias"):
            if not qkv_bias:
                continue  # the target model has no bias parameter
            qv, kv, vv = v.chunk(3, dim=-1)
            out[k.replace("qkv.bias", "q_bias")] = qv
            out[k.replace("qkv.bias", "v_bias")] = vv
            continue
        k = k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2").replace("storage_tokens", "reg_token")
        k = k.replace("mlp.w12", "mlp.fc1").replace("mlp.w1", "mlp.fc1_g").replace("mlp.w2", "mlp.fc1_x")
        out[k.replace("mlp.w3", "mlp.fc2")] = v
    return out


@pytest.mark.parametrize("registers", [4, 0])
def test_timm_dinov2_layouts_compute_the_official_tokens(registers):
    ref = dinov2_ref.vit_large_reg(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=14, img_size=56,
                                   num_register_tokens=registers)
    _randomize(ref)
    ref.eval()
    ours, report = load_backbone(timm_convert_dinov2(ref.state_dict()), vision_heads=HEADS)  # no config in timm files
    assert report.layout == ("timm vit_*_reg4_dinov2" if registers else "timm vit_*_dinov2")
    assert report.filled_keys == ["mask_token"] and not report.missing_keys
    for h, w in [(56, 56), (42, 70)]:
        images = torch.randn(2, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(ours(images), dinov2_ref.tokens(ref, images), **TOL)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_timm_dinov3_layouts_compute_the_official_tokens(qkv_bias):
    ref = dinov3_ref.vit_large(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, n_storage_tokens=4)
    _randomize(ref)
    if not qkv_bias:  # timm's plain models drop the qkv bias: exact for the released (zero) biases only
        with torch.no_grad():
            for block in ref.blocks:
                block.attn.qkv.bias.zero_()
    ref.eval()
    ours, report = load_backbone(timm_convert_dinov3(ref.state_dict(), qkv_bias), vision_heads=HEADS)
    assert report.layout == "timm vit_*_dinov3 (Eva)"
    assert "rope_embed.periods" in report.filled_keys and "mask_token" in report.filled_keys
    images = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), dinov3_ref.tokens(ref, images), **TOL)


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_timm_swiglu_backbones_round_trip_exactly(family):
    """ViT-g/14 (timm packs w12 into mlp.fc1) and the DINOv3 "plus" models (fc1_g, fc1_x, fc2)."""
    config = DinoTxtConfig(backbone=family, vision_dim=DIM, vision_depth=DEPTH, vision_heads=HEADS,
                           vision_ffn="swiglu", vision_mlp_ratio=6.0, patch_size=14 if family == "dinov2" else 16,
                           pos_embed_grid=4, embed_dim=2 * DIM)
    source = build_backbone(config)
    _randomize(source)
    if family == "dinov3":  # what the official loader makes of a release: the key third of the qkv bias masked
        source.load_official_state_dict(source.official_state_dict())
    official = source.official_state_dict()
    timm_sd = (timm_convert_dinov2(official) if family == "dinov2" else timm_convert_dinov3(official, True))
    fields = infer_backbone_fields(timm_sd)
    assert fields["vision_ffn"] == "swiglu" and fields["vision_mlp_hidden"] == config.vision_mlp_hidden
    ours, _ = load_backbone(timm_sd, vision_heads=HEADS)
    images = torch.randn(1, 3, 3 * config.patch_size, 5 * config.patch_size)
    with torch.no_grad():
        assert torch.equal(ours(images), source.eval()(images))


def test_layout_detection():
    official2 = build_backbone(DinoTxtConfig(vision_dim=DIM, vision_depth=1, vision_heads=HEADS, pos_embed_grid=2,
                                             embed_dim=2 * DIM)).official_state_dict()
    assert detect_layout(official2).title == "official DINOv2 backbone"
    assert detect_layout(timm_convert_dinov2(official2)).source == "timm"
    assert detect_layout({"blocks.0.norm1.weight": torch.zeros(1)}) is None

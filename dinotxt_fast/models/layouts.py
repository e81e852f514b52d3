"""Backbone checkpoints in the layouts users keep them in: timm and Hugging Face transformers, beside the official one.

A layout is a list of rules, each relating some keys of the official release layout to some keys of the file, both
ways: `to_official` builds the official tensors from the file's, `to_foreign` the file's from the official ones (used
to know which keys and shapes the file must hold, so that errors name the keys as they are in the file). A rule with
no file keys fills an official tensor that the layout does not carry with its defined value (the unused mask token,
the DINOv3 RoPE periods and key-bias masks). Key names follow:
- timm `vision_transformer.py` `_convert_dinov2` (DINOv2: `reg_token`, the cls position folded into `cls_token`,
  ViT-g's `mlp.fc1`/`mlp.fc2`, no mask token) and `eva.py` `checkpoint_filter_fn` (DINOv3: `gamma_1`/`gamma_2`,
  `attn.q_bias`/`attn.v_bias` or no qkv bias, `mlp.fc1_g`/`fc1_x`/`fc2`, `reg_token`);
- transformers `Dinov2Model`, `Dinov2WithRegistersModel`, `DINOv3ViTModel`, both as saved (`attention.attention.query`,
  `mlp.weights_in`; DINOv3 `layer.{i}`) and as module state dicts of transformers 5 (`attention.q_proj`,
  `mlp.gate_proj`; DINOv3 `model.layer.{i}`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

Convert = Callable[[list], list]


def _same(tensors: list) -> list:
    return list(tensors)


def _cat(tensors: list) -> list:
    return [torch.cat(tensors, dim=0)]


def _chunks(n: int) -> Convert:
    return lambda tensors: list(tensors[0].chunk(n, dim=0))


@dataclass(frozen=True)
class Rule:
    official: tuple
    foreign: tuple
    to_official: Convert = _same
    to_foreign: Convert = _same


@dataclass(frozen=True)
class Layout:
    """A detected checkpoint layout. `source` is "official", "timm" or "hf"; `options` its variant flags:
    "module_names" (transformers 5 module state dicts), "no_mask_token", "register_param" (transformers' register
    parameter, possibly [1, 0, D]), "registers" (timm reg4 models), "qv_bias" (timm *_qkvb models)."""

    source: str
    family: str  # "dinov2" | "dinov3"
    title: str
    options: frozenset = frozenset()

    @property
    def foreign(self) -> bool:
        return self.source != "official"


def _rename(official: str, foreign: str, suffixes=(".weight", ".bias")) -> list:
    return [Rule((official + s,), (foreign + s,)) for s in suffixes]


def _fill(key: str, value: Callable[[], Tensor]) -> Rule:
    return Rule((key,), (), to_official=lambda _: [value()], to_foreign=lambda _: [])


# --------------------------------------------------------------------------------------------------- detection
def official_layout(family: str) -> Layout:
    return Layout("official", family, f"official {'DINOv2' if family == 'dinov2' else 'DINOv3'} backbone")


def detect_layout(sd: Mapping[str, Tensor]) -> Optional[Layout]:
    """The layout of a backbone state dict, or None when it is no DINOv2/DINOv3 backbone layout we know."""
    keys = set(sd)
    if "embeddings.position_embeddings" in keys:
        registers = "embeddings.register_tokens" in keys
        title = "Hugging Face transformers " + ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
        options = {"module_names"} if any(".attention.q_proj." in k for k in keys) else set()
        if "embeddings.mask_token" not in keys:
            options.add("no_mask_token")
        if registers:
            options.add("register_param")
        return Layout("hf", "dinov2", title, frozenset(options))
    if "embeddings.patch_embeddings.weight" in keys or any(k.startswith("model.layer.") for k in keys):
        options = {"module_names"} if any(k.startswith("model.layer.") for k in keys) else set()
        return Layout("hf", "dinov3", "Hugging Face transformers DINOv3ViTModel", frozenset(options))
    if "storage_tokens" in keys or "rope_embed.periods" in keys or any(k.endswith("bias_mask") for k in keys):
        return official_layout("dinov3")
    if "blocks.0.gamma_1" in keys or ("reg_token" in keys and "pos_embed" not in keys):
        options = {"qv_bias"} if "blocks.0.attn.q_bias" in keys else set()
        return Layout("timm", "dinov3", "timm vit_*_dinov3 (Eva)", frozenset(options))
    if "pos_embed" in keys:
        if "reg_token" in keys:
            return Layout("timm", "dinov2", "timm vit_*_reg4_dinov2", frozenset({"registers"}))
        if "mask_token" not in keys:
            return Layout("timm", "dinov2", "timm vit_*_dinov2")
        return official_layout("dinov2")
    if "register_tokens" in keys:
        return official_layout("dinov2")
    return None


# ------------------------------------------------------------------------------------------------------- rules
def layout_rules(layout: Layout, backbone) -> list:
    """Every rule of `layout` for `backbone` (a DinoV2Backbone / DinoV3Backbone, whose config fixes depth, registers
    and FFN). The official layout is the identity on the backbone's official keys."""
    official = backbone.official_state_dict()
    if not layout.foreign:
        return [Rule((k,), (k,)) for k in official]
    build = {("hf", "dinov2"): _hf_dinov2, ("hf", "dinov3"): _hf_dinov3,
             ("timm", "dinov2"): _timm_dinov2, ("timm", "dinov3"): _timm_dinov3}[(layout.source, layout.family)]
    rules = build(layout, backbone, official)
    for i in range(backbone.depth):
        rules += _BLOCKS[(layout.source, layout.family)](layout, backbone, f"blocks.{i}.", i)
    covered = {k for rule in rules for k in rule.official}
    if covered != set(official):  # a rule table out of step with the model is a bug here, not in the file
        raise AssertionError(f"{layout.title} rules miss {sorted(set(official) - covered)[:5]} "
                             f"and invent {sorted(covered - set(official))[:5]}")
    return rules


def _hf_registers(backbone, official_key: str) -> Rule:
    """transformers keeps a [1, 0, D] register parameter in models without registers: read it, load nothing."""
    if backbone.num_register_tokens:
        return Rule((official_key,), ("embeddings.register_tokens",))

    def empty(_):
        return [torch.zeros(1, 0, backbone.embed_dim)]

    return Rule((), ("embeddings.register_tokens",), to_official=lambda _: [], to_foreign=empty)


def _zeros_like(official: dict, key: str) -> Callable[[], Tensor]:
    return lambda: torch.zeros_like(official[key])


def _v3_fills(backbone, official: dict, mask_token: bool) -> list:
    rules = [_fill("rope_embed.periods", lambda: backbone.rope_embed.compute_periods().to(
        official["rope_embed.periods"].dtype))]
    if mask_token:
        rules.append(_fill("mask_token", _zeros_like(official, "mask_token")))
    return rules


def _hf_dinov2(layout: Layout, backbone, official: dict) -> list:
    rules = [Rule(("cls_token",), ("embeddings.cls_token",)),
             Rule(("pos_embed",), ("embeddings.position_embeddings",)),
             *_rename("patch_embed.proj", "embeddings.patch_embeddings.projection"), *_rename("norm", "layernorm")]
    if backbone.num_register_tokens or "register_param" in layout.options:
        rules.append(_hf_registers(backbone, "register_tokens"))
    if "no_mask_token" in layout.options:
        rules.append(_fill("mask_token", _zeros_like(official, "mask_token")))
    else:
        rules.append(Rule(("mask_token",), ("embeddings.mask_token",)))
    return rules


def _hf_dinov2_block(layout: Layout, backbone, o: str, i: int) -> list:
    f = f"encoder.layer.{i}."
    modern = "module_names" in layout.options
    rules = [*_rename(o + "norm1", f + "norm1"), *_rename(o + "norm2", f + "norm2"),
             Rule((o + "ls1.gamma",), (f + "layer_scale1.lambda1",)),
             Rule((o + "ls2.gamma",), (f + "layer_scale2.lambda1",)),
             *_rename(o + "attn.proj", f + ("attention.o_proj" if modern else "attention.output.dense"))]
    qkv = ("q_proj", "k_proj", "v_proj") if modern else ("attention.query", "attention.key", "attention.value")
    for s in (".weight", ".bias"):
        rules.append(Rule((o + "attn.qkv" + s,), tuple(f"{f}attention.{n}{s}" for n in qkv), _cat, _chunks(3)))
    if backbone.config.vision_ffn == "mlp":
        return rules + _rename(o + "mlp.fc1", f + "mlp.fc1") + _rename(o + "mlp.fc2", f + "mlp.fc2")
    if not modern:
        return rules + _rename(o + "mlp.w12", f + "mlp.weights_in") + _rename(o + "mlp.w3", f + "mlp.weights_out")
    for s in (".weight", ".bias"):  # transformers 5 splits weights_in into gate (the silu half) and up
        rules.append(Rule((o + "mlp.w12" + s,), (f + "mlp.gate_proj" + s, f + "mlp.up_proj" + s), _cat, _chunks(2)))
    return rules + _rename(o + "mlp.w3", f + "mlp.down_proj")


def _hf_dinov3(layout: Layout, backbone, official: dict) -> list:
    rules = [Rule(("cls_token",), ("embeddings.cls_token",)),
             Rule(("mask_token",), ("embeddings.mask_token",),  # transformers keeps it [1, 1, D]
                  lambda t: [t[0].reshape(1, -1)], lambda t: [t[0].reshape(1, 1, -1)]),
             *_rename("patch_embed.proj", "embeddings.patch_embeddings"), *_rename("norm", "norm"),
             *_v3_fills(backbone, official, mask_token=False)]
    return rules + [_hf_registers(backbone, "storage_tokens")]


def _bias_mask(backbone, o: str, i: int) -> Rule:
    return _fill(o + "attn.qkv.bias_mask", lambda: backbone.standard_bias_mask(backbone.blocks[i].attn.qkv.bias))


def _v3_qkv_bias(o: str, foreign: tuple) -> Rule:
    """The official qkv bias from separate query and value biases; the key third is zero (DINOv3 masks it)."""
    def to_official(t):
        return [torch.cat((t[0], torch.zeros_like(t[0]), t[1]))]

    def to_foreign(t):
        q, _, v = t[0].chunk(3)
        return [q, v]

    return Rule((o + "attn.qkv.bias",), foreign, to_official, to_foreign)


def _v3_swiglu(o: str, f: str, names: tuple) -> list:
    pairs = zip(("w1", "w2", "w3"), names)
    return [rule for ours, theirs in pairs for rule in _rename(o + "mlp." + ours, f + "mlp." + theirs)]


def _hf_dinov3_block(layout: Layout, backbone, o: str, i: int) -> list:
    f = f"model.layer.{i}." if "module_names" in layout.options else f"layer.{i}."
    a = f + "attention."
    rules = [*_rename(o + "norm1", f + "norm1"), *_rename(o + "norm2", f + "norm2"),
             Rule((o + "ls1.gamma",), (f + "layer_scale1.lambda1",)),
             Rule((o + "ls2.gamma",), (f + "layer_scale2.lambda1",)),
             *_rename(o + "attn.proj", a + "o_proj"),
             Rule((o + "attn.qkv.weight",), (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                  _cat, _chunks(3)),
             _v3_qkv_bias(o, (a + "q_proj.bias", a + "v_proj.bias")),
             _bias_mask(backbone, o, i)]
    if backbone.config.vision_ffn == "mlp":
        return rules + _rename(o + "mlp.fc1", f + "mlp.up_proj") + _rename(o + "mlp.fc2", f + "mlp.down_proj")
    return rules + _v3_swiglu(o, f, ("gate_proj", "up_proj", "down_proj"))


def _timm_dinov2(layout: Layout, backbone, official: dict) -> list:
    rules = [_fill("mask_token", _zeros_like(official, "mask_token")), *_rename("patch_embed.proj", "patch_embed.proj"),
             *_rename("norm", "norm")]
    if "registers" not in layout.options:
        return rules + [Rule(("cls_token",), ("cls_token",)), Rule(("pos_embed",), ("pos_embed",))]

    # timm's no_embed_class models hold the cls position inside cls_token and no cls row in pos_embed. Loading puts a
    # zero row back: cls_token + 0 is exact, and the resize never reads that row.
    def to_official(t):
        cls, pos = t
        return [cls, torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1)]

    def to_foreign(t):
        cls, pos = t
        return [cls + pos[:, :1], pos[:, 1:]]

    return rules + [Rule(("cls_token", "pos_embed"), ("cls_token", "pos_embed"), to_official, to_foreign),
                    Rule(("register_tokens",), ("reg_token",))]


def _timm_dinov2_block(layout: Layout, backbone, o: str, i: int) -> list:
    same = ["norm1", "norm2", "attn.qkv", "attn.proj"]
    rules = [r for name in same for r in _rename(o + name, o + name)]
    rules += [Rule((o + "ls1.gamma",), (o + "ls1.gamma",)), Rule((o + "ls2.gamma",), (o + "ls2.gamma",))]
    if backbone.config.vision_ffn == "mlp":
        return rules + _rename(o + "mlp.fc1", o + "mlp.fc1") + _rename(o + "mlp.fc2", o + "mlp.fc2")
    return rules + _rename(o + "mlp.w12", o + "mlp.fc1") + _rename(o + "mlp.w3", o + "mlp.fc2")


def _timm_dinov3(layout: Layout, backbone, official: dict) -> list:
    rules = [Rule(("cls_token",), ("cls_token",)), *_rename("patch_embed.proj", "patch_embed.proj"),
             *_rename("norm", "norm"), *_v3_fills(backbone, official, mask_token=True)]
    if backbone.num_register_tokens:
        rules.append(Rule(("storage_tokens",), ("reg_token",)))
    return rules


def _timm_dinov3_block(layout: Layout, backbone, o: str, i: int) -> list:
    rules = [*_rename(o + "norm1", o + "norm1"), *_rename(o + "norm2", o + "norm2"),
             *_rename(o + "attn.proj", o + "attn.proj"), Rule((o + "attn.qkv.weight",), (o + "attn.qkv.weight",)),
             Rule((o + "ls1.gamma",), (o + "gamma_1",)), Rule((o + "ls2.gamma",), (o + "gamma_2",)),
             _bias_mask(backbone, o, i)]
    if "qv_bias" in layout.options:
        rules.append(_v3_qkv_bias(o, (o + "attn.q_bias", o + "attn.v_bias")))
    else:  # timm's DINOv3 models without qkv bias (the released biases are zero): a zero bias is exact
        rules.append(_fill(o + "attn.qkv.bias", lambda: torch.zeros_like(backbone.blocks[i].attn.qkv.bias)))
    if backbone.config.vision_ffn == "mlp":
        return rules + _rename(o + "mlp.fc1", o + "mlp.fc1") + _rename(o + "mlp.fc2", o + "mlp.fc2")
    return rules + _v3_swiglu(o, o, ("fc1_g", "fc1_x", "fc2"))


_BLOCKS = {("hf", "dinov2"): _hf_dinov2_block, ("hf", "dinov3"): _hf_dinov3_block,
           ("timm", "dinov2"): _timm_dinov2_block, ("timm", "dinov3"): _timm_dinov3_block}


# -------------------------------------------------------------------------------------------------- conversion
def expected_keys(rules: list, official: Mapping[str, Tensor]) -> dict:
    """The file's keys and shapes this backbone needs, in the layout's own names."""
    out = {}
    for rule in rules:
        if rule.foreign:
            for key, value in zip(rule.foreign, rule.to_foreign([official[k] for k in rule.official])):
                out[key] = tuple(value.shape)
    return out


def to_official(rules: list, sd: Mapping[str, Tensor]) -> tuple:
    """(official state dict, filled official keys): every rule whose file keys are all present, plus the fills.
    Rules with a missing file key are left out (a strict check has already refused those)."""
    out, filled = {}, []
    for rule in rules:
        if not all(k in sd for k in rule.foreign):
            continue
        with torch.no_grad():
            values = rule.to_official([sd[k] for k in rule.foreign])
        out.update(zip(rule.official, values))
        if not rule.foreign:
            filled += rule.official
    return out, filled

"""dinotxt-fast's attention inside Hugging Face transformers models (dinotxt_fast/nn/hf_attention.py).

Tiny random models from transformers' own classes: after patch_hf their outputs and gradients equal the sdpa ones
(fp32 rounding), every attention call of theirs goes to ops.attention, and nothing else changes (classes, parameters,
state-dict keys). Calls the fused kernel does not compute go to sdpa untouched. dtf.patch_model takes the same path
for transformers models (alone or inside another module) and reports what it left alone.
"""
import pytest
import torch
from torch import nn

import dinotxt_fast as dtf
import dinotxt_fast.ops as ops
from dinotxt_fast.nn import FusedSelfAttention, hf_attention, unpatch_model
from dinotxt_fast.nn.hf_attention import ATTENTION_NAME, patch_hf, unpatch_hf

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=2e-5)


def _randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "lambda" in name):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model


def dinov2(**extra):
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                                       patch_size=7, **extra)
    return _randomize(transformers.Dinov2Model(config)), {"pixel_values": torch.randn(2, 3, 28, 35)}


def dinov2_registers():
    config = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    image_size=28, patch_size=7, num_register_tokens=4)
    return _randomize(transformers.Dinov2WithRegistersModel(config)), {"pixel_values": torch.randn(2, 3, 21, 28)}


def dinov3():
    # No RoPE coordinate augmentation: in training mode it draws random rescales, which two runs cannot share.
    config = transformers.DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_register_tokens=4, patch_size=8,
                                          pos_embed_rescale=None)
    return _randomize(transformers.DINOv3ViTModel(config)), {"pixel_values": torch.randn(2, 3, 32, 40)}


def clip_text():
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=100, max_position_embeddings=16,
                                         bos_token_id=98, eos_token_id=99, pad_token_id=0)
    ids = torch.randint(1, 98, (3, 11))
    ids[:, -1] = 99
    return _randomize(transformers.CLIPTextModel(config)), {"input_ids": ids}


def clip_vision():
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    return _randomize(transformers.CLIPVisionModel(config)), {"pixel_values": torch.randn(2, 3, 32, 32)}


MODELS = {"Dinov2Model": dinov2, "Dinov2WithRegistersModel": dinov2_registers, "DINOv3ViTModel": dinov3,
          "CLIPTextModel": clip_text, "CLIPVisionModel": clip_vision}


@pytest.fixture
def calls(monkeypatch):
    """Every ops.attention call the patched models make: (causal, backend)."""
    seen = []
    real = ops.attention

    def spy(q, k, v, **kwargs):
        seen.append((kwargs.get("causal"), kwargs.get("backend")))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(ops, "attention", spy)
    return seen


def _out(model, inputs):
    return model(**inputs).last_hidden_state


@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs_equal_sdpa_and_every_call_is_fused(name, calls):
    model, inputs = MODELS[name]()
    model.eval()
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        reference = _out(model, inputs)
    patch = patch_hf(model, backend="torch")
    assert model.config._attn_implementation == ATTENTION_NAME and patch.previous == "sdpa"
    assert len(patch.patched) == 2 and patch.left_alone == {}
    with torch.no_grad():
        torch.testing.assert_close(_out(model, inputs), reference, **TOL)
    assert calls == [(name == "CLIPTextModel", "torch")] * 2  # one per layer; the text model is causal
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    assert {n: type(m) for n, m in model.named_modules()} == classes
    unpatch_hf(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_dinotxt_fast_backend") for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(_out(model, inputs), reference, atol=0, rtol=0)
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["DINOv3ViTModel", "CLIPTextModel"])
def test_gradients_equal_sdpa(name, calls):
    model, inputs = MODELS[name]()
    model.train()  # no dropout configured: training only switches autograd on
    _out(model, inputs).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    patch_hf(model)
    _out(model, inputs).square().sum().backward()
    assert calls
    for n, p in model.named_parameters():
        if n in expected:  # fp32 rounding of the backward, relative to each gradient's own scale
            scale = float(expected[n].abs().max())
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                       msg=lambda text, name=n: f"{name}: {text}")


def test_padding_masks_and_attention_dropout_go_to_sdpa(calls):
    model, inputs = clip_text()
    model.eval()
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, 7:] = 0
    with torch.no_grad():
        reference = model(**inputs, attention_mask=mask).last_hidden_state
    patch_hf(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, attention_mask=mask).last_hidden_state, reference, **TOL)
    assert calls == []  # the padding mask: sdpa computed every call
    dropped, pixels = dinov2(attention_probs_dropout_prob=0.5)
    patch_hf(dropped)
    dropped.train()
    _out(dropped, pixels)
    assert calls == []  # attention dropout while training: sdpa
    dropped.eval()
    with torch.no_grad():
        _out(dropped, pixels)
    assert len(calls) == 2  # in eval mode dropout is off: fused again


class LegacyConfig(transformers.PretrainedConfig):
    model_type = "dinotxt_fast_test_legacy"


class LegacyAttention(nn.Module):
    """An attention module that computes its softmax itself (no transformers attention function)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class LegacyModel(transformers.PreTrainedModel):
    config_class = LegacyConfig

    def __init__(self, config):
        super().__init__(config)
        self.attn = LegacyAttention(config)
        self.post_init()


def test_modules_that_do_not_dispatch_are_left_alone_with_the_reason():
    model = LegacyModel(LegacyConfig())
    before = model.config._attn_implementation
    patch = patch_hf(model)
    assert patch.patched == {} and list(patch.left_alone) == ["attn"]
    assert "LegacyAttention computes attention itself" in patch.left_alone["attn"]
    assert model.config._attn_implementation == before  # nothing to route: the model is not switched


def test_only_transformers_models_are_taken():
    assert not hf_attention.is_hf_model(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="takes a transformers PreTrainedModel"):
        patch_hf(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- through dtf.patch_model
ATTENTION_NAMES = {
    "Dinov2Model": "encoder.layer.{}.attention", "Dinov2WithRegistersModel": "encoder.layer.{}.attention",
    "DINOv3ViTModel": "model.layer.{}.attention", "CLIPTextModel": "encoder.layers.{}.self_attn",
    "CLIPVisionModel": "encoder.layers.{}.self_attn",
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patch_model_routes_transformers_models(name, calls):
    """dtf.patch_model on a transformers model: the adapter, the attention modules' names returned, outputs within
    fp32 rounding, state-dict keys and tensors unchanged; unpatch_model restores the sdpa model exactly."""
    model, inputs = MODELS[name]()
    model.eval()
    state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = _out(model, inputs)
    patched = dtf.patch_model(model)
    assert sorted(patched) == [ATTENTION_NAMES[name].format(i) for i in range(2)]
    assert all(model.get_submodule(n) is m for n, m in patched.items())  # the modules stay in place
    assert patched.left_alone == {}
    with torch.no_grad():
        torch.testing.assert_close(_out(model, inputs), reference, **TOL)
    assert len(calls) == 2
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state
    assert dtf.patch_model(model) == {}  # already routed: left as it is
    unpatch_model(model, patched)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(_out(model, inputs), reference, atol=0, rtol=0)
    assert len(calls) == 2


def test_patch_model_on_a_tree_holding_a_transformers_model(calls):
    """A module holding a transformers backbone and an official-style attention: both patched, names prefixed."""
    from tests.official import dinov2_ref

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = dinov2()[0]
            self.pool = dinov2_ref.Attention(32, num_heads=4)

        def forward(self, pixel_values):
            return self.pool(self.backbone(pixel_values=pixel_values).last_hidden_state)

    torch.manual_seed(0)
    model = Wrapper().eval()
    pixels = torch.randn(2, 3, 28, 35)
    with torch.no_grad():
        reference = model(pixels)
    patched = dtf.patch_model(model, backend="torch")
    assert sorted(patched) == ["backbone.encoder.layer.0.attention", "backbone.encoder.layer.1.attention", "pool"]
    assert isinstance(model.pool, FusedSelfAttention)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), reference, **TOL)
    assert len(calls) == 3
    unpatch_model(model, patched)
    assert model.pool is patched["pool"] and model.backbone.config._attn_implementation == "sdpa"
    assert not any(hf_attention.is_routed(m) for m in model.modules())


def test_patch_model_reports_what_it_left_alone(caplog):
    model = LegacyModel(LegacyConfig())
    with caplog.at_level("WARNING", logger="dinotxt_fast.nn.patch"):
        patched = dtf.patch_model(model)
    assert patched == {} and list(patched.left_alone) == ["attn"]
    assert "LegacyAttention computes attention itself" in patched.left_alone["attn"]
    assert "left 1 attention module(s) alone" in caplog.text and "attn: LegacyAttention" in caplog.text

"""The model folder: save_pretrained / from_pretrained (dinotxt_fast/models/pretrained.py)."""
import json
import time

import pytest
import torch

import dinotxt_fast as dtf
from dinotxt_fast.models import pretrained
from dinotxt_fast.models._state import StateDictError
from dinotxt_fast.models.checkpoint import CheckpointError
from dinotxt_fast.models.config import make_config
from dinotxt_fast.models.dinotxt import DinoTxt, create_model

TINY = dict(vision_dim=32, vision_depth=2, vision_heads=2, pos_embed_grid=4, head_blocks=1, text_dim=32,
            text_layers=1, text_heads=2, context_length=77)


def _model(preset="dinov2_vitl14_reg4_dinotxt", **overrides):
    model = create_model(preset, **{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # every tensor away from its init, so a mixed-up key shows
        model.logit_scale.fill_(2.5)
    return model


def _assert_identical(a: DinoTxt, b: DinoTxt):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert a.config == b.config and a.preset == b.preset


@pytest.mark.parametrize("preset", ["dinov2_vitl14_reg4_dinotxt", "dinov3_vith16plus_dinotxt"])
def test_round_trip_is_exact(preset, tmp_path):
    model = _model(preset)
    folder = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "dinotxt-fast" and config["preset"] == preset
    assert config["config"] == model.config.to_dict() and config["logit_scale"] == 2.5
    loaded = dtf.from_pretrained(folder)
    _assert_identical(model, loaded)
    assert not loaded.training and loaded.backbone_frozen
    p = model.config.patch_size
    images = torch.randn(2, 3, 3 * p, 5 * p)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, 0], ids[0, 3], ids[1, 9] = 49406, 49407, 49407
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(ids), loaded.encode_text(ids))
    # The folder's own files name it too.
    _assert_identical(model, dtf.from_pretrained(folder / "config.json"))


def test_dtype_and_device_are_kept_or_chosen(tmp_path):
    model = _model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_identical(model, dtf.from_pretrained(tmp_path / "bf16"))
    as_fp32 = dtf.from_pretrained(tmp_path / "bf16", dtype=torch.float32, device="cpu")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}


def test_loading_builds_nothing_of_full_size_first(tmp_path, monkeypatch):
    """The model is made on the meta device from config.json; a wrong file fails before any weight exists."""
    built_on = []

    class Recording(DinoTxt):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built_on.append(self.logit_scale.device.type)

    _model().save_pretrained(tmp_path / "tiny")
    monkeypatch.setattr(pretrained, "DinoTxt", Recording)
    dtf.from_pretrained(tmp_path / "tiny")
    assert built_on == ["meta"]
    # The official ViT-L config with the tiny weights: refused quickly, naming the file and the keys.
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    config["config"] = make_config("dinov2_vitl14_reg4_dinotxt").to_dict()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(StateDictError, match=r"(?s)model weights .*model.safetensors.*backbone.cls_token: "
                                             r"expected shape \(1, 1, 1024\), got \(1, 1, 32\)"):
        dtf.from_pretrained(tmp_path / "tiny")
    assert time.perf_counter() - start < 5.0


def test_folder_errors_are_one_line_and_name_the_file(tmp_path):
    folder = _model().save_pretrained(tmp_path / "m")
    good_config = (folder / "config.json").read_text()

    def fails(exc, pattern):
        with pytest.raises(exc, match=pattern) as info:
            dtf.from_pretrained(folder)
        assert "\n" not in str(info.value)

    with pytest.raises(FileNotFoundError, match="model folder not found"):
        dtf.from_pretrained(tmp_path / "nowhere")
    (folder / "model.safetensors").rename(tmp_path / "w.safetensors")
    fails(FileNotFoundError, "has no model.safetensors")
    (tmp_path / "w.safetensors").rename(folder / "model.safetensors")
    (folder / "config.json").write_text("{ not json")
    fails(CheckpointError, r"cannot read model config .*config.json.* \(corrupt or not JSON\)")
    data = json.loads(good_config)
    data["config"]["vision_width"] = 3
    (folder / "config.json").write_text(json.dumps(data))
    fails(CheckpointError, r"config.json.*unknown DinoTxtConfig field\(s\) \['vision_width'\]")
    data = json.loads(good_config)
    data["config"]["vision_heads"] = 5
    (folder / "config.json").write_text(json.dumps(data))
    fails(CheckpointError, "invalid config: vision_dim 32 is not divisible by vision_heads 5")
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 32}))
    fails(CheckpointError, "is a Hugging Face transformers config .*load_backbone")
    (folder / "config.json").write_text(json.dumps({**json.loads(good_config), "format_version": 99}))
    fails(CheckpointError, "format_version 99")
    (folder / "config.json").write_text(json.dumps({**json.loads(good_config), "logit_scale": 1.0}))
    fails(CheckpointError, "logit_scale=1.0 but model.safetensors holds 2.5")
    (folder / "config.json").write_text(good_config)
    (folder / "model.safetensors").write_bytes(b"\x00\x01 not safetensors" * 8)
    fails(CheckpointError, r"cannot read model weights checkpoint .*model.safetensors")
    (folder / "config.json").unlink()
    fails(FileNotFoundError, "has no config.json")


def test_missing_and_extra_tensors_are_listed(tmp_path):
    model = _model()
    folder = model.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    del weights["head.ln_final.bias"]
    weights["head.extra"] = torch.zeros(2)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(StateDictError) as info:
        dtf.from_pretrained(folder)
    message = str(info.value)
    assert "model.safetensors" in message and "head.ln_final.bias" in message and "head.extra" in message


def test_saving_again_replaces_the_files(tmp_path):
    first, second = _model(), _model()
    first.save_pretrained(tmp_path / "m")
    second.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    _assert_identical(second, dtf.from_pretrained(tmp_path / "m"))
    with pytest.raises(NotADirectoryError):
        first.save_pretrained(tmp_path / "m" / "config.json")


def test_check_folder_reads_headers_only(tmp_path, monkeypatch):
    """check_folder (what the CLI runs before building anything): config.json and the safetensors header against
    the config's shapes, without reading a tensor."""
    folder = _model().save_pretrained(tmp_path / "model")
    monkeypatch.setattr(pretrained.ckpt, "load_state_dict", lambda *a, **k: pytest.fail("read the tensors"))
    assert pretrained.check_folder(folder) == folder
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-64])
    with pytest.raises(CheckpointError, match="model.safetensors' \\(corrupt, truncated"):
        pretrained.check_folder(folder)
    (folder / "model.safetensors").write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    config["config"]["text_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(StateDictError, match=r"missing keys \(\d+\):\n    text\.backbone\.blocks\.1\."):
        pretrained.check_folder(folder)


def test_save_pretrained_of_a_given_state_dict(tmp_path):
    """state_dict= (the trainer's tensors gathered from FSDP shards) is written in place of the model's own."""
    model, other = _model(), _model()
    pretrained.save_pretrained(model, tmp_path / "a", state_dict=other.state_dict())
    loaded = dtf.from_pretrained(tmp_path / "a")
    _assert_identical(loaded, other)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["logit_scale"] == 2.5
    with pytest.raises(ValueError, match="does not have the model's keys.*'logit_scale'"):
        pretrained.save_pretrained(model, tmp_path / "b", state_dict={k: v for k, v in other.state_dict().items()
                                                                       if k != "logit_scale"})

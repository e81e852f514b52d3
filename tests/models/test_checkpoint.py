"""Checkpoint file reading/writing and the official key layouts (dinotxt_fast/models/checkpoint.py)."""
import os

import pytest
import torch

from dinotxt_fast.models import checkpoint as ckpt


def _sd():
    return {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3), "n": torch.tensor(5)}


def _assert_same(a, b):
    assert sorted(a) == sorted(b)  # safetensors stores keys sorted
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["x.pth", "x.pt", "x.safetensors"])
def test_save_load_round_trip(tmp_path, name):
    sd = _sd()
    path = ckpt.save_state_dict(sd, tmp_path / "sub" / name)
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temporary file left behind
    _assert_same(ckpt.load_state_dict(path), sd)
    _assert_same(ckpt.load_state_dict(str(path)), sd)


def test_save_overwrites_atomically_and_failure_keeps_old_file(tmp_path):
    path = tmp_path / "w.pth"
    ckpt.save_state_dict(_sd(), path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        ckpt.save_state_dict({"bad": lambda: 0}, path)  # unpicklable: torch.save fails midway
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]


def test_wrappers_and_prefixes_are_removed(tmp_path):
    sd = _sd()
    for wrapped in ({"model": sd, "step": 3}, {"state_dict": sd}, {"checkpoint": 1, "model": {"module": sd}},
                    {"module." + k: v for k, v in sd.items()}, {"_orig_mod." + k: v for k, v in sd.items()}):
        _assert_same(ckpt.load_state_dict(wrapped), sd)
    torch.save({"model": sd, "optimizer": {"lr": 0.1}}, tmp_path / "train.pt")
    _assert_same(ckpt.load_state_dict(tmp_path / "train.pt"), sd)


def test_missing_corrupt_and_wrong_content_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ckpt.load_state_dict(missing, name="vision_head")
    with pytest.raises(ckpt.CheckpointError, match="not a file"):
        ckpt.load_state_dict(tmp_path)
    for name in ("garbage.pth", "garbage.safetensors"):
        bad = tmp_path / name
        bad.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
        with pytest.raises(ckpt.CheckpointError, match=name):
            ckpt.load_state_dict(bad, name="text_encoder")
    # A truncated real checkpoint is corrupt too.
    good = ckpt.save_state_dict(_sd(), tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="cut.pth"):
        ckpt.load_state_dict(tmp_path / "cut.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ckpt.CheckpointError, match="holds a list"):
        ckpt.load_state_dict(tmp_path / "list.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"\[meta\] are not tensors"):
        ckpt.load_state_dict({"w": torch.zeros(1), "meta": "v1"})
    with pytest.raises(ckpt.CheckpointError, match="empty"):
        ckpt.load_state_dict({})
    with pytest.raises(TypeError, match="path or a state dict"):
        ckpt.load_state_dict(123)


def test_pickled_code_is_refused(tmp_path):
    # torch.load(weights_only=True): a checkpoint that would run code on load is an error, not executed.
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "fn": os.getcwd}, path)
    with pytest.raises(ckpt.CheckpointError, match="evil.pth"):
        ckpt.load_state_dict(path)


def test_v2_head_keys_map_both_ways():
    ours = {"blocks.0.attn.qkv.weight": torch.zeros(1), "blocks.1.ls2.gamma": torch.ones(1),
            "ln_final.weight": torch.ones(2)}
    official = ckpt.head_to_v2(ours)
    assert sorted(official) == ["block_list.0.attn.qkv.weight", "block_list.1.ls2.gamma", "ln_final.weight"]
    assert ckpt.head_from_v2(official).keys() == ours.keys()
    assert all(ckpt.head_from_v2(official)[k] is v for k, v in ours.items())  # no copies


def test_v3_weights_split_and_join():
    head = {"blocks.0.norm1.weight": torch.randn(4)}
    text = {"backbone.ln_final.bias": torch.randn(4), "head.linear_projection.weight": torch.randn(8, 4)}
    joined = ckpt.join_v3_weights(head, text, torch.tensor(2.5))
    assert sorted(joined) == ["logit_scale", "text_model.backbone.ln_final.bias",
                              "text_model.head.linear_projection.weight", "visual_model.head.blocks.0.norm1.weight"]
    assert joined["logit_scale"].shape == (1,)  # the official nn.Parameter(torch.ones(1) * value)
    parts = ckpt.split_v3_weights({**joined, "visual_model.backbone.cls_token": torch.zeros(1, 1, 4),
                                   "stray": torch.zeros(1)})
    _assert_same(parts["head"], head)
    _assert_same(parts["text"], text)
    assert parts["logit_scale"].shape == () and parts["logit_scale"].item() == 2.5
    assert list(parts["backbone"]) == ["cls_token"]
    assert parts["unexpected"] == ["stray"]
    with pytest.raises(ckpt.CheckpointError, match="logit_scale"):
        ckpt.split_v3_weights({"logit_scale": torch.zeros(2)})


def test_guess_part_and_backbone_kind():
    assert ckpt.backbone_kind({"pos_embed": 0, "register_tokens": 0}) == "dinov2"
    assert ckpt.backbone_kind({"storage_tokens": 0, "rope_embed.periods": 0}) == "dinov3"
    assert ckpt.backbone_kind({"blocks.0.norm1.weight": 0}) is None
    assert ckpt.guess_part({"block_list.0.norm1.weight": 0})[0] == "vision_head"
    assert ckpt.guess_part({"backbone.token_embedding.weight": 0})[0] == "text_encoder"
    assert ckpt.guess_part({"visual_model.head.ln_final.weight": 0})[0] == "weights"
    assert ckpt.guess_part({"cls_token": 0, "pos_embed": 0}) == ("backbone", "a DINOv2 backbone")
    assert ckpt.guess_part({"foo": 0}) is None

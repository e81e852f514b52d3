"""Issue #13, pixel-level alignment in the main job: the embedded self-supervised backbone in the tiny config, the
segmentation evaluation's protocol and baselines, the curves' baseline lines and the run's summary line."""
import math
from pathlib import Path

import pytest
import torch

from dinotxt_fast import cli
from dinotxt_fast.train import ConfigError, load_config
from dinotxt_fast.train.data.eval_sets import segmentation_baselines
from dinotxt_fast.train.evaluate import Evaluator
from dinotxt_fast.train.loop import build_model
from dinotxt_fast.train.metrics import baseline_lines, curves_figure, read_metrics, results_line
from tests.train.test_loop import SMALL


# ------------------------------------------------------------------------------------------------ config
def test_tiny_config_names_the_embedded_backbone():
    cfg = load_config("tiny")
    assert cfg.backbone_weights == "embedded:tiny" and cfg.head_attention is False
    path = Path(cfg.backbone_path())
    assert path.is_file() and path.parent.name == "weights" and path.parent.parent.name == "train"
    assert cfg.seg_eval_images >= 64 and cfg.segmentation_short_side() == 2 * cfg.image_size
    assert load_config("tiny", ["backbone_weights=/x/y.pth"]).backbone_path() == "/x/y.pth"
    assert load_config("tiny", ["backbone_weights=null"]).backbone_path() is None
    with pytest.raises(ConfigError, match="no embedded backbone 'small'; embedded ones: embedded:tiny"):
        load_config("tiny", ["backbone_weights=embedded:small"])
    with pytest.raises(ConfigError, match="head_attention: expected true or false"):
        load_config("tiny", ["head_attention=maybe"])
    for bad in ("0", "-4", "1.5", "true"):
        with pytest.raises(ConfigError, match="seg_short_side"):
            load_config("tiny", [f"seg_short_side={bad}"])
    assert load_config("official").head_attention is True  # the paper's recipe trains the whole head


def test_the_embedded_backbone_on_another_shape_says_what_to_do():
    cfg = load_config("tiny", ["model.vision_dim=32"])
    with pytest.raises(ConfigError, match=r"does not fit this model \(shape/type mismatches .*cls_token: expected shape "
                                          r"\(1, 1, 32\), got \(1, 1, 64\)\).* set backbone_weights=null") as error:
        build_model(cfg, torch.device("cpu"), "fp32")
    assert "\n" not in str(error.value)  # one line


# ------------------------------------------------------------------------------------------- evaluation
def test_segmentation_baselines_by_hand():
    background_majority = torch.tensor([[[0, 0, 0, 1]], [[2, 2, 2, 0]]])  # 4 background, 1 of class 1, 3 of 2
    assert segmentation_baselines(background_majority, 3) == pytest.approx(
        {"miou_baseline_background": (4 / 8) / 3, "miou_baseline_majority": (4 / 8) / 3})
    object_majority = torch.tensor([[[2, 2, 2, 1]], [[2, 2, 0, 0]]])  # 2 background, 1 of class 1, 5 of 2
    assert segmentation_baselines(object_majority, 3) == pytest.approx(
        {"miou_baseline_background": (2 / 8) / 3, "miou_baseline_majority": (5 / 8) / 3})


@pytest.mark.parametrize("short_side, mode", [(None, "slide"), (32, "whole")])
def test_evaluator_protocol_and_baselines(short_side, mode):
    """Twice the training size by default, in training-size windows (slide); at the training size, whole."""
    cfg = load_config("tiny", SMALL + ["seg_eval_images=64", f"seg_short_side={short_side or 'null'}"])
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"), "fp32")
    evaluator = Evaluator(model, cfg, torch.device("cpu"), "fp32")
    assert evaluator.seg_protocol == dict(short_side=short_side or 64, mode=mode, window=32, stride=16)
    assert len(evaluator.segmentation.images) == 64
    assert evaluator.baselines == segmentation_baselines(evaluator.segmentation.masks, 9)
    again = Evaluator(model, cfg, torch.device("cpu"), "fp32")  # a fixed set: the same images every time
    assert torch.equal(again.segmentation.images, evaluator.segmentation.images)


# --------------------------------------------------------------------------------------- plot and summary
RECORDS = [{"step": 1, "loss": 2.0, "logit_scale": 2.6}, {"step": 2, "loss": 1.5, "logit_scale": 2.7},
           {"step": 2, "zero_shot_top1": 0.5, "num_classes": 8, "zero_shot_chance": 0.125, "miou": 0.4,
            "miou_baseline_background": 0.1, "miou_baseline_majority": 0.2}]


def test_baseline_lines():
    assert baseline_lines(RECORDS, "zero_shot_top1") == [("chance", 0.125)]
    assert baseline_lines(RECORDS, "miou") == [("all-background", 0.1), ("majority class", 0.2)]
    same = RECORDS[:2] + [{**RECORDS[2], "miou_baseline_majority": 0.1}]
    assert baseline_lines(same, "miou") == [("all-background = majority class", 0.1)]
    assert baseline_lines(RECORDS, "loss") == [] and baseline_lines(RECORDS[:2], "miou") == []


def test_curves_draw_the_baselines_dashed_with_legend_entries():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = curves_figure(RECORDS)
    try:
        panels = {ax.get_title(): ax for ax in fig.axes}
        for title, expected in (("zero-shot top-1", {"chance": 0.125}),
                                ("segmentation mIoU", {"all-background": 0.1, "majority class": 0.2})):
            dashed = {line.get_label(): line.get_ydata()[0] for line in panels[title].get_lines()
                      if line.get_linestyle() == "--"}
            assert dashed == pytest.approx(expected)
            legend = [t.get_text() for t in panels[title].get_legend().get_texts()]
            assert set(expected) <= set(legend)
        assert not [line for line in panels["training loss"].get_lines() if line.get_linestyle() == "--"]
    finally:
        plt.close(fig)


def test_results_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert results_line(path) is None
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert results_line(path) == ("zero-shot top-1 50.0% (chance 12.5%) · mIoU 40.0% (all-background 10.0%, "
                                  "majority class 20.0%)")
    path.write_text(json.dumps(RECORDS[0]) + "\n")
    assert results_line(path) is None


def test_train_cli_ends_with_the_results_line_also_when_nothing_is_left(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress", *SMALL, "steps=1"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    (ev,) = [r for r in read_metrics(out / "metrics.jsonl") if "miou" in r]
    expected = (f"zero-shot top-1 {100 * ev['zero_shot_top1']:.1f}% (chance 12.5%) · mIoU {100 * ev['miou']:.1f}% "
                f"(all-background {100 * ev['miou_baseline_background']:.1f}%, majority class "
                f"{100 * ev['miou_baseline_majority']:.1f}%)")
    assert math.isfinite(ev["miou"]) and printed[-1] == expected
    assert cli.main(args[:3] + ["--resume", *args[3:]]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("nothing to do") and printed[-1] == expected

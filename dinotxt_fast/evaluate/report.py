"""Writing a result: the JSON file (fractions in [0, 1]), a Markdown table and a console summary (percentages)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _pct_sign(value) -> str:
    """A percentage printed on its own (the console): with its % sign; table cells say "(%)" in their header."""
    text = _pct(value)
    return text if text == "-" else f"{text}%"


def _json_safe(value):
    """NaN (a metric with nothing to average) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(result: dict, path) -> Path:
    from .._files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(result), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def _speed(result: dict) -> str:
    ips = result.get("images_per_s")
    return f"{ips:.2f}" if ips else "-"


def markdown(result: dict) -> str:
    """A Markdown summary table (and, for segmentation / zero-shot, the per-class table)."""
    task, name = result["task"], result["dataset"]
    if task == "segmentation":
        lines = ["| dataset | images | mIoU (%) | pixel acc. (%) | mean acc. (%) | images/s | peak MB |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                 f"| {name} {result['split']} | {result['num_images']} | {_pct(result['miou'])} | "
                 f"{_pct(result['pixel_accuracy'])} | {_pct(result['mean_accuracy'])} | {_speed(result)} | "
                 f"{result['peak_memory_mb']} |",
                 "", "| class | IoU (%) |", "| --- | ---: |"]
        lines += [f"| {c} | {_pct(v)} |" for c, v in result["per_class_iou"].items()]
    elif task == "zeroshot":
        lines = ["| dataset | images | classes | top-1 (%) | top-5 (%) | mean per-class (%) | images/s |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                 f"| {name} | {result['num_images']} | {result['num_classes']} | {_pct(result['top1'])} | "
                 f"{_pct(result['top5'])} | {_pct(result['mean_per_class_accuracy'])} | {_speed(result)} |",
                 "", "| class | accuracy (%) |", "| --- | ---: |"]
        lines += [f"| {c} | {_pct(v)} |" for c, v in result["per_class_accuracy"].items()]
    elif task == "retrieval":
        i2t, t2i = result["image_to_text"], result["text_to_image"]
        recalls = " | ".join(f"{d} R@{k} (%)" for d in ("I→T", "T→I") for k in (1, 5, 10))
        lines = [f"| dataset | images | texts | {recalls} |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                 f"| {name} | {result['num_images']} | {result['num_texts']} | "
                 + " | ".join(_pct(d[k]) for d in (i2t, t2i) for k in ("R@1", "R@5", "R@10")) + " |"]
    else:
        raise ValueError(f"unknown task {task!r} in the result")
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    """A few console lines: the headline metrics, the run's speed and memory."""
    task, name, n = result["task"], result["dataset"], result["num_images"]
    pct = _pct_sign
    if task == "segmentation":
        head = (f"{name} {result['split']}: mIoU {pct(result['miou'])}  pixel acc. {pct(result['pixel_accuracy'])}"
                f"  ({n} images, {result['num_classes']} classes, mode {result['protocol']['mode']})")
    elif task == "zeroshot":
        head = (f"{name}: top-1 {pct(result['top1'])}  top-5 {pct(result['top5'])}  ({n} images, "
                f"{result['num_classes']} classes)")
    else:
        i2t, t2i = result["image_to_text"], result["text_to_image"]
        head = (f"{name}: image->text R@1/5/10 {pct(i2t['R@1'])}/{pct(i2t['R@5'])}/{pct(i2t['R@10'])}  "
                f"text->image {pct(t2i['R@1'])}/{pct(t2i['R@5'])}/{pct(t2i['R@10'])}  ({n} images, "
                f"{result['num_texts']} texts)")
    speed = (f"{_speed(result)} images/s, {result['seconds']:.1f} s, peak memory {result['peak_memory_mb']} MB "
             f"({result['peak_memory_kind']}) on {result['device']}")
    return f"{head}\n{speed}"


def write_report(result: dict, out, markdown_path: Optional[str] = None) -> tuple[Path, Path]:
    """The JSON at `out` and the Markdown table beside it (`<out>.md` unless `markdown_path`)."""
    json_path = write_json(result, out)
    md_path = Path(markdown_path) if markdown_path else json_path.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(result), encoding="utf-8")
    return json_path, md_path


__all__ = ["write_json", "markdown", "summary", "write_report"]

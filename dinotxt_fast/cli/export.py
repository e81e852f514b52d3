"""`dinotxt-fast export`: the model of a training checkpoint as official release files."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("export", help="write a training checkpoint as official release files",
                       description="Write the model of a training checkpoint in the official file layout (DINOv2 "
                                   "release: backbone, vision_head, text_encoder; DINOv3: backbone, weights), "
                                   "loadable by the official hub code and by `load_official`.")
    p.add_argument("checkpoint", help="a training checkpoint (e.g. runs/tiny/checkpoints/last.pt)")
    p.add_argument("--out", required=True, help="output directory")
    return p


def run(args) -> int:
    from ..train.loop import load_trained_model

    model = load_trained_model(args.checkpoint)
    files = model.export_official(args.out)
    for name in files:
        print(f"wrote {Path(args.out) / (name + '.pth')}")
    return 0

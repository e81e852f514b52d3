"""Self-supervised pretraining of the tiny config's backbone, shipped as dinotxt_fast/train/weights/tiny_backbone.

No captions, labels or masks: only the embedded synthetic train images. The objective is patch-level
self-distillation with an EMA teacher (the DINO/iBOT family) on a *tile mosaic*:
  - the teacher sees one augmented view of each image and gives every patch a distribution over K prototypes
    (centred and sharpened, as in DINO);
  - the student sees a mosaic of that view: every tile x tile square is replaced by the same square of another
    image of the batch (same position, whole patches), with fresh photometric noise;
  - each student patch must predict the teacher's distribution for that patch *in its own image*.
The mosaic scrambles every patch's context, so only tokens that describe their own patch can satisfy it: local
tokens, which is what dense (per-patch) text alignment needs. Why this and not plain DINO: issue #13 measured that
image-level objectives make every patch carry its image's content, and the segmentation then follows the caption.

The teacher backbone is written as fp16 safetensors in the DinoV2Backbone state-dict layout, with metadata: the
arguments (`args`, JSON), the sha256 of this file (`script_sha256`), the torch version and the losses of steps
1..5 (`first_losses`, JSON). Everything is seeded: the same arguments give the same file on the same torch build.

    python tools/pretrain_tiny_backbone.py                  # 5 min on a shared 2-core x86 CPU; writes the package file
    python tools/pretrain_tiny_backbone.py --stop-after 5   # same schedule, stop after 5 steps, print, write nothing
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import dinotxt_fast as dtf
from dinotxt_fast.inference.images import IMAGENET_MEAN, IMAGENET_STD
from dinotxt_fast.train.config import load_config
from dinotxt_fast.train.synthetic import SyntheticShapes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "dinotxt_fast" / "train" / "weights" / "tiny_backbone.safetensors"
FIRST_LOSSES = 5  # steps whose loss goes into the metadata (the regeneration test replays them)
MEAN = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
STD = torch.tensor(IMAGENET_STD)[None, :, None, None]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .safetensors (default: the package file)")
    ap.add_argument("--stop-after", type=int, default=None, metavar="K",
                    help="run the same schedule but stop after K steps, print the losses and write nothing")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=8192, help="distinct train-split images drawn from")
    ap.add_argument("--size", type=int, default=64, help="view side in pixels (the tiny config's image_size)")
    ap.add_argument("--crop-min", type=float, default=0.35, help="smallest RandomResizedCrop area of the view")
    ap.add_argument("--jitter", type=float, default=0.2, help="brightness/contrast jitter strength")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.04, help="weight decay at step 0 (cosine to --wd-end)")
    ap.add_argument("--wd-end", type=float, default=0.2)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.99, help="teacher momentum at step 0 (cosine to 1)")
    ap.add_argument("--t-student", type=float, default=0.1)
    ap.add_argument("--t-teacher", type=float, default=0.04, help="teacher temperature at step 0")
    ap.add_argument("--t-teacher-end", type=float, default=0.07, help="reached linearly at 30%% of the steps")
    ap.add_argument("--hidden", type=int, default=256, help="projection head MLP width")
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--prototypes", type=int, default=128)
    ap.add_argument("--tile", type=int, default=16, help="mosaic tile side in pixels (a multiple of the patch)")
    ap.add_argument("--freeze-last", type=int, default=100, help="steps the prototype layer stays fixed (DINO)")
    ap.add_argument("--clip", type=float, default=3.0, help="gradient-norm clip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)
    if args.size % args.tile:
        ap.error(f"--size {args.size} is not a multiple of --tile {args.tile}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        ap.error(f"--stop-after must be in 1..--steps ({args.steps}), got {args.stop_after}")
    return args


def recipe(args: argparse.Namespace) -> dict:
    """The arguments that determine the weights (not where they go or whether the run stops early)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "stop_after")}


def script_sha256() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ data
class TrainImages:
    """The first `n` train-split images, uint8 [3, S, S], rendered on first use (a short run renders few).
    The generator's captions and masks are never read; the object-free share is off (every image has objects)."""

    def __init__(self, n: int, size: int, seed: int):
        self.dataset = SyntheticShapes(n, size, seed, "train", background_share=0.0)
        self.rendered: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        for i in indices.tolist():
            if i not in self.rendered:
                self.rendered[i] = torch.from_numpy(np.array(self.dataset[i]["image"])).permute(2, 0, 1)
        return torch.stack([self.rendered[i] for i in indices.tolist()])


def augmented_view(batch_u8: torch.Tensor, args, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (area in [crop_min, 1], aspect 3/4..4/3) + horizontal flip + mild brightness/contrast
    jitter and pixel noise, batched with affine grids, ImageNet-normalised. Hue and saturation are left alone:
    colour is what the images are about, a hue jitter would teach the backbone to ignore it."""
    x = batch_u8.float() / 255
    b = x.shape[0]
    area = torch.empty(b).uniform_(args.crop_min, 1.0, generator=gen)
    ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen).exp()
    w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)  # fractions of the side
    cx = (torch.rand(b, generator=gen) * (1 - w) + w / 2) * 2 - 1
    cy = (torch.rand(b, generator=gen) * (1 - h) + h / 2) * 2 - 1
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, (b, 3, args.size, args.size), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    bright = 1 + args.jitter * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    contrast = 1 + args.jitter * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean * bright + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return (x - MEAN) / STD


def to_tiles(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, C, n*t, n*t] -> [B, n*n, C, t, t] (tiles row-major)."""
    b, c, s, _ = x.shape
    t = s // n
    return x.reshape(b, c, n, t, n, t).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, t, t)


def from_tiles(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `to_tiles`."""
    b, _, c, t, _ = tiles.shape
    return tiles.reshape(b, n, n, c, t, t).permute(0, 3, 1, 4, 2, 5).reshape(b, c, n * t, n * t)


def mosaic(view: torch.Tensor, teacher_probs: torch.Tensor, args, gen: torch.Generator):
    """Tile k of mosaic b is tile k of image source[b, k] (a per-tile permutation of the batch), with fresh
    photometric noise in normalised units (scale, shift, pixel noise). -> (mosaic [B, 3, S, S], the teacher's
    patch distributions in mosaic order [B, P, K]); teacher_probs is [B, K, g, g]."""
    b, n = view.shape[0], args.size // args.tile
    source = torch.stack([torch.randperm(b, generator=gen) for _ in range(n * n)], 1)  # [B, n*n]
    tile_index = torch.arange(n * n)[None]
    mixed = from_tiles(to_tiles(view, n)[source, tile_index], n)
    mixed = (mixed * (1 + args.jitter * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1))
             + args.jitter * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
             + 0.1 * torch.randn(mixed.shape, generator=gen))
    targets = from_tiles(to_tiles(teacher_probs, n)[source, tile_index], n)  # [B, K, g, g]
    return mixed, targets.flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------------------------ model
class ProjectionHead(nn.Module):
    """DINO head: 3-layer MLP -> L2-normalised bottleneck -> weight-normalised prototypes (logits [.., K])."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, k: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, k, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


class Network(nn.Module):
    """Backbone + patch projection head: [B, 3, S, S] -> prototype logits of the patch tokens [B, P, K]."""

    def __init__(self, backbone: nn.Module, args):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(backbone.embed_dim, args.hidden, args.bottleneck, args.prototypes)

    def forward(self, images):
        return self.head(self.backbone(images)[:, self.backbone.num_prefix_tokens:])


def schedules(step: int, args) -> dict:
    """lr: linear warm-up then cosine to 0; weight decay: cosine wd -> wd_end; teacher temperature: linear
    t_teacher -> t_teacher_end over the first 30% of the steps; EMA momentum: cosine ema -> 1."""
    frac = step / max(1, args.steps - 1)
    cos = 0.5 * (1 + math.cos(math.pi * frac))
    lr = args.lr * ((step + 1) / args.warmup if step < args.warmup else cos)
    return {"lr": lr, "wd": args.wd_end + (args.wd - args.wd_end) * cos,
            "t_teacher": args.t_teacher + (args.t_teacher_end - args.t_teacher) * min(1.0, step / (0.3 * args.steps)),
            "momentum": 1 - (1 - args.ema) * cos}


def train(args, log=print) -> tuple[nn.Module, list[float]]:
    """Runs the schedule (to --stop-after if set); -> (teacher backbone, loss of every step run)."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    cfg = load_config("tiny")
    student = Network(dtf.create_model(cfg.preset, **cfg.model_config().to_dict()).backbone, args)
    student.requires_grad_(True).train()  # create_model freezes the backbone (LiT); here it is what is trained
    teacher = copy.deepcopy(student).requires_grad_(False)
    grid = args.size // student.backbone.patch_size
    if args.tile % student.backbone.patch_size:
        raise ValueError(f"--tile {args.tile} is not a multiple of the patch size {student.backbone.patch_size}")
    center = torch.zeros(1, args.prototypes)
    images = TrainImages(args.images, args.size, args.seed)

    # no decay on tokens, position embedding, biases, norms and the weight-norm gain
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2 and "token" not in n and "pos_embed" not in n
             and "original0" not in n]
    no_decay = [p for p in student.parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    prototype_layer = list(student.head.last.parameters())
    losses = []
    for step in range(args.stop_after or args.steps):
        s = schedules(step, args)
        for group in opt.param_groups:
            group["lr"] = s["lr"]
        opt.param_groups[0]["weight_decay"] = s["wd"]

        view = augmented_view(images.batch(torch.randint(len(images), (args.batch,), generator=gen)), args, gen)
        with torch.no_grad():
            teacher_logits = teacher(view)  # [B, P, K]
            probs = F.softmax((teacher_logits - center) / s["t_teacher"], -1)
            probs = probs.transpose(1, 2).reshape(args.batch, -1, grid, grid)
        mixed, targets = mosaic(view, probs, args, gen)
        loss = -(targets * F.log_softmax(student(mixed) / args.t_student, -1)).sum(-1).mean()

        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < args.freeze_last:
            for p in prototype_layer:
                p.grad = None
        nn.utils.clip_grad_norm_(student.parameters(), args.clip)
        opt.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(s["momentum"]).add_(ps, alpha=1 - s["momentum"])
            center.mul_(0.9).add_(teacher_logits.reshape(-1, args.prototypes).mean(0, keepdim=True), alpha=0.1)
        losses.append(float(loss.detach()))
        if step < FIRST_LOSSES or (step + 1) % args.log_every == 0:
            entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(1).mean())  # collapse shows as ~0
            log(json.dumps({"step": step + 1, "loss": losses[-1], "teacher_entropy": round(entropy, 4),
                            "lr": s["lr"], "elapsed_s": round(time.perf_counter() - t0, 1)}))
    return teacher.backbone, losses


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the shipped file was made with 2 threads
    t0 = time.perf_counter()
    backbone, losses = train(args, log=lambda line: print(line, flush=True))
    if args.stop_after is not None:
        print(json.dumps({"first_losses": losses}), flush=True)
        return 0
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in backbone.state_dict().items()}
    metadata = {"args": json.dumps(recipe(args), sort_keys=True), "script_sha256": script_sha256(),
                "torch": torch.__version__, "first_losses": json.dumps(losses[:FIRST_LOSSES]),
                "objective": "tile-mosaic patch self-distillation, EMA teacher; no captions, labels or masks"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f}s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

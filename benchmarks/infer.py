"""End-to-end inference: open-vocabulary segmentation (the official slide protocol) and zero-shot classification,
one DINO.txt model with dinotxt-fast's kernels against the same model on the reference path.

    python benchmarks/infer.py                        # CUDA, the official ViT-L config (random weights) in bf16
    python benchmarks/infer.py --quick                # CUDA, fewer images and prompts (about a minute on an H100)
    python benchmarks/infer.py --device cpu --quick   # smoke run: a tiny fp32 model, Triton through the interpreter
    python benchmarks/infer.py --list                 # print the cases and exit

Parts (--parts, comma-separated):
  segment   dtf.segment(model, images, class_embeddings, mode="slide") with the official protocol (short side 512,
            384 windows at stride 192, head patch tokens; docs/design.md, "Dense use") on ADE20K-like batches (150
            classes, 512x683 images): images/s and peak memory. Target: ours >= 3x the reference's images/s.
  zeroshot  images/s of ZeroShotClassifier (encode_image + the cosine classifier matmul) on a batch of 224 px
            images, and prompts/s of build_text_classifier (tokenize + encode_text + template averaging of N classes
            x the 80 ImageNet templates).

Implementations: the same model object and weights every time; they differ only in the kernels its ops run on.
  reference             every op on the "torch" backend (the package's PyTorch reference: chunked fp32 attention,
                        fp32 pooling); segmentation decodes as public codebases do (mmseg slide_inference: per-window
                        F.interpolate + softmax summed on a full-resolution [B, C, H', W'] canvas, F.interpolate to the
                        image, argmax), from the same encoder outputs and cosine logits.
  reference + SDPA      the reference with every attention call through torch's scaled_dot_product_attention (the
                        strongest stock-PyTorch model), same decode.
  dtf.segment, torch    segment() itself on the torch backend (its banded decode never builds [C, H, W]).
  ours (triton|cuda)    every op the model calls, dispatched to that backend (families the CUDA backend lacks fall
                        back to Triton, then torch); segment() decodes with the fused kernels.
  ours (auto)           the package's default dispatch, timed only when dispatch.AUTO_ORDER prefers a kernel backend.
DinoTxt's attention already calls ops.attention, so dtf.patch_model (for foreign, e.g. official, modules) has nothing
to replace in it; the backend choice is what separates ours from the reference. Timing, ceilings, rotation of inputs
and the JSON record come from benchmarks/harness.py; results go to benchmarks/results/infer-<machine>-<time>.json.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.harness import (  # noqa: E402
    Benchmark, Rotation, Run, add_ratios_against, attention_through_sdpa, backend_problem, error_text, free_cache,
    max_abs_diff, peak_memory_mib, print_row, recording_backends, result, time_ms)

PARTS = ("segment", "zeroshot")
PRESET = "dinov2_vitl14_reg4_dinotxt"
# What a smoke run can afford under the Triton interpreter (as tests/test_inference.py makes tiny models).
TINY_MODEL = dict(vision_dim=64, vision_depth=2, vision_heads=4, pos_embed_grid=4, text_dim=64, text_layers=2,
                  text_heads=4)
REFERENCE = "reference (torch backend)"
SDPA = "reference + SDPA attention"
SEGMENT_TORCH = "dtf.segment, torch backend"
TARGET = "ours >= 3x the reference's images/s with the official slide protocol (speedup_vs_reference; H100, bf16)"
# Synthetic class names of two words: prompt lengths like real ones, every name distinct.
_ADJECTIVES = ("red", "small", "wooden", "striped", "old", "wild", "golden", "spotted", "tall", "plastic", "frozen",
               "electric", "ancient", "tiny", "glass", "woolly", "silver", "rusty", "giant", "paper")
_NOUNS = ("dog", "car", "lamp", "tree", "bridge", "kettle", "parrot", "guitar", "tractor", "vase", "fox", "boat",
          "chair", "castle", "tiger", "bicycle", "mushroom", "violin", "lighthouse", "shark", "cabinet", "owl", "train",
          "umbrella", "pumpkin", "robot", "whale", "helmet", "ladder", "teapot", "zebra", "canoe", "sofa", "rocket",
          "lemon", "turtle", "piano", "tent", "crab", "clock", "goat", "kite", "mirror", "penguin", "drum", "barn",
          "snail", "anchor", "camera", "lizard")


def class_names(n: int) -> list[str]:
    if n > len(_ADJECTIVES) * len(_NOUNS):
        raise ValueError(f"at most {len(_ADJECTIVES) * len(_NOUNS)} synthetic class names, asked for {n}")
    return [f"{_ADJECTIVES[i // len(_NOUNS)]} {_NOUNS[i % len(_NOUNS)]}" for i in range(n)]


# ---------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class SegmentCase:
    name: str
    images: int  # per call, one batched tensor
    image: tuple[int, int]
    classes: int
    short_side: Optional[int]
    window: int
    stride: int
    batch_size: int = 16  # windows per encoder call (segment's default)


@dataclass(frozen=True)
class ZeroShotCase:
    name: str
    images: int
    image_size: Optional[int]  # None: two patches a side (smoke runs)
    classes: int  # classifier width of the image part (one template: its weights do not change the speed)
    prompt_classes: int  # classes of the prompt part, each with `templates` prompts
    templates: int = 80  # the first `templates` of the 80 ImageNet templates


def segment_cases(device: str, quick: bool) -> list[SegmentCase]:
    if device == "cpu":
        return [SegmentCase("tiny slide C=5 28x42", 1, (28, 42), 5, None, 28, 14)]
    return [SegmentCase("ade20k-like slide C=150 512x683", 2 if quick else 8, (512, 683), 150, 512, 384, 192)]


def zeroshot_cases(device: str, quick: bool) -> list[ZeroShotCase]:
    if device == "cpu":  # the interpreter runs one program at a time: 8 prompts, 2 images
        return [ZeroShotCase("tiny zero-shot", 2, None, 10, 1, templates=8)]
    # --quick: a batch that still fills the GPU, and 8 x 80 prompts (build_text_classifier is tokenizer-bound: its
    # calls take a few hundred ms each, and the harness makes ~15 of them per implementation).
    return [ZeroShotCase("imagenet-like zero-shot 224px", 128 if quick else 256, 224, 1000, 8 if quick else 200)]


# ------------------------------------------------------------------------------------------------ routing
@contextlib.contextmanager
def routed(order: tuple[str, ...], device: torch.device, sdpa: bool = False) -> Iterator[None]:
    """Every op the model calls with backend=None runs on the first backend of `order` (then torch) that can run it.

    CPU tensors, and the torch-only order of the reference rows: `ops.use_backend(order[0])` (auto always gives CPU
    tensors "torch"; the smoke run's Triton, under the interpreter, has every family). CUDA tensors with kernel
    backends: per family the first backend of the chain that supports the call, falling back per call, which only
    the auto dispatch does, so for the block its AUTO_ORDER is the chain and its measured per-shape table is set
    aside (`auto_order`). `sdpa`: attention through torch's SDPA instead of the ops dispatch. All restored on exit."""
    from dinotxt_fast import ops

    chain = tuple(dict.fromkeys(order + ("torch",)))
    with contextlib.ExitStack() as stack:
        if device.type == "cuda" and chain != ("torch",):
            stack.enter_context(auto_order(chain))
        else:
            stack.enter_context(ops.use_backend(chain[0]))
        if sdpa:
            stack.enter_context(attention_through_sdpa())
        yield


@contextlib.contextmanager
def auto_order(chain: tuple[str, ...]) -> Iterator[None]:
    """The auto dispatch tries `chain` for every family inside the block (a scoped `use_backend(None)` keeps an
    enclosing backend choice out); DINOTXT_FAST_BACKEND would override it, so it is refused here."""
    from dinotxt_fast import ops
    from dinotxt_fast.ops import dispatch

    if os.environ.get(dispatch.ENV_VAR):
        raise RuntimeError(f"{dispatch.ENV_VAR}={os.environ[dispatch.ENV_VAR]} overrides the routing of this "
                           "benchmark's kernel rows: unset it")
    saved_order, saved_measured = dict(dispatch.AUTO_ORDER), dispatch.measured_choice
    try:
        dispatch.measured_choice = lambda *args, **kwargs: None
        for family in dispatch.AUTO_ORDER:
            dispatch.AUTO_ORDER[family] = chain
        with ops.use_backend(None):
            yield
    finally:
        dispatch.measured_choice = saved_measured
        dispatch.AUTO_ORDER.update(saved_order)


def kernel_problem(name: str, device: torch.device) -> Optional[str]:
    """Why "ours (name)" cannot run here, or None."""
    from dinotxt_fast import ops

    if device.type == "cuda":
        return backend_problem(name, (), device)
    if name != "triton":
        return f"backend {name!r} needs a CUDA device"
    # On CPU the backend is named for every family, so it must have them all (the torch backend has every one).
    return backend_problem(name, ops.backends()["torch"]["ops"], device)


def auto_problem(device: torch.device) -> Optional[str]:
    from dinotxt_fast.ops import dispatch

    if device.type != "cuda":
        return "auto dispatch runs CPU tensors on the torch backend: the reference"
    gpu = torch.cuda.get_device_name(device)
    measured = any(e["gpu"] == gpu for e in dispatch._measured_entries())
    if not measured and all(order[:1] == ("torch",) for order in dispatch.AUTO_ORDER.values()):
        return (f"no measured dispatch entry for {gpu} and dispatch.AUTO_ORDER prefers torch for every family: "
                "auto is the reference")
    return None


@dataclass
class Impl:
    name: str
    order: tuple[str, ...] = ("torch",)
    sdpa: bool = False
    fused_segment: bool = True  # dtf.segment, or the eager full-resolution decode
    auto: bool = False  # no routing: the package's own dispatch
    skipped: Optional[str] = None

    def context(self, device: torch.device):
        return contextlib.nullcontext() if self.auto else routed(self.order, device, self.sdpa)

    @property
    def routing(self) -> str:
        if self.auto:
            return "auto"
        return " > ".join(dict.fromkeys(self.order + ("torch",))) + (", SDPA attention" if self.sdpa else "")


def implementations(device: torch.device, part: str) -> list[Impl]:
    """The reference first: every other row is checked against it."""
    impls = [Impl(REFERENCE, fused_segment=False), Impl(SDPA, sdpa=True, fused_segment=False)]
    if part == "segment":
        impls.append(Impl(SEGMENT_TORCH))
    impls += [Impl("ours (triton)", ("triton",), skipped=kernel_problem("triton", device)),
              Impl("ours (cuda)", ("cuda", "triton"), skipped=kernel_problem("cuda", device)),
              Impl("ours (auto)", auto=True, skipped=auto_problem(device))]
    return impls


# ------------------------------------------------------------------------------------------------ model work
def build_model(preset: str, overrides: dict, device: torch.device, dtype: torch.dtype):
    import dinotxt_fast as dtf

    torch.manual_seed(0)
    with device:  # initialise on the device: the official model has 0.8 B parameters
        model = dtf.create_model(preset, **overrides)
    return model.to(dtype).eval()


def vision_flops(cfg, height: int, width: int) -> float:
    """Matmul FLOPs of one image through backbone + vision head (attention counted in full)."""
    p, d = cfg.patch_size, cfg.vision_dim
    patches = (height // p) * (width // p)
    t = 1 + cfg.num_register_tokens + patches
    attention = 2 * t * d * 4 * d + 4 * t * t * d  # qkv + proj, scores + weighted sum
    backbone = cfg.vision_depth * (attention + 4 * t * d * cfg.vision_mlp_hidden)
    head = cfg.head_blocks * (attention + 6 * t * d * cfg.head_mlp_hidden)  # SwiGLU: three projections
    return 2 * patches * 3 * p * p * d + backbone + head


def text_flops(cfg, batch: int, length: int) -> float:
    """Matmul FLOPs of a batch of `length`-token texts (causal attention: half the scores)."""
    d = cfg.text_dim
    per_layer = 2 * batch * length * (4 * d * d + 2 * 4 * d * d) + 2 * batch * length * length * d
    return cfg.text_layers * per_layer + 2 * batch * d * cfg.embed_dim


def reference_segment(model, images: torch.Tensor, classes: torch.Tensor, case: SegmentCase,
                      return_scores: bool = False):
    """segment(mode="slide") the way public codebases decode (mmseg slide_inference): the same resize, windows,
    encoder and cosine logits as dtf.segment, then full-resolution maps: each window's logits F.interpolate'd to its
    box and softmaxed, summed on a [B, C, H', W'] canvas, divided by the window count, F.interpolate'd to the image
    size, argmax. Windows are encoded `case.batch_size` at a time in segment's order."""
    from dinotxt_fast.inference.segmentation import dense_text_embeddings, short_side_size, sliding_window_boxes
    from dinotxt_fast.inference.zeroshot import inference_mode, model_dtype

    patch = model.config.patch_size
    with inference_mode(model):
        text = dense_text_embeddings(model, classes)
        x = images.float()
        b, _, height, width = x.shape
        size = short_side_size(height, width, case.short_side)
        canvas = x if size == (height, width) else F.interpolate(x, size=size, mode="bicubic", align_corners=False,
                                                                 antialias=True)
        boxes = sliding_window_boxes(*size, case.window, case.stride).tolist()
        box_h, box_w = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
        stretched = (-(-box_h // patch) * patch, -(-box_w // patch) * patch)
        grid = (stretched[0] // patch, stretched[1] // patch)
        preds = torch.zeros(b, len(text), *size, device=x.device)
        count = torch.zeros(size, device=x.device)
        for y0, x0, y1, x1 in boxes:
            count[y0:y1, x0:x1] += 1
        jobs = [(i, k) for i in range(b) for k in range(len(boxes))]
        for start in range(0, len(jobs), case.batch_size):
            chunk = jobs[start:start + case.batch_size]
            crops = torch.stack([canvas[i, :, boxes[k][0]:boxes[k][2], boxes[k][1]:boxes[k][3]] for i, k in chunk])
            if stretched != (box_h, box_w):
                crops = F.interpolate(crops, size=stretched, mode="bicubic", align_corners=False)
            patches = model.image_tokens(crops.to(model_dtype(model)))[1]
            logits = (F.normalize(patches.float(), dim=-1) @ text.T).transpose(1, 2).reshape(len(chunk), -1, *grid)
            up = F.interpolate(logits, size=(box_h, box_w), mode="bilinear", align_corners=False).softmax(1)
            for (i, k), window in zip(chunk, up):
                y0, x0, y1, x1 = boxes[k]
                preds[i, :, y0:y1, x0:x1] += window
        full = F.interpolate(preds / count, size=(height, width), mode="bilinear", align_corners=False)
        scores, labels = full.max(1)
    return (labels, scores) if return_scores else labels


# ------------------------------------------------------------------------------------------------ measuring
def measure(run: Run, case_name: str, pass_: str, impls: list[Impl], shape: dict, work: dict,
            make_call: Callable[[Impl], tuple], compare: Callable[[object, object], dict]) -> list[dict]:
    """One row per implementation. make_call(impl) -> (timed fn of no arguments, checked fn of no arguments); the
    checked output of the first implementation that runs is what `compare(out, reference)` measures against.
    `run.budget()` gives a reason once the time budget is used up."""
    device, rows, reference = run.device, [], None
    for impl in impls:
        skip = impl.skipped or run.budget()
        if skip:
            rows.append(result(case_name, impl.name, pass_=pass_, shape=shape, skipped=skip))
            print_row(rows[-1])
            continue
        try:
            timed, checked = make_call(impl)
            with impl.context(device):
                start = time.perf_counter()
                with recording_backends() as used:
                    out = checked()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first_s = round(time.perf_counter() - start, 3)  # mostly JIT compiles and autotuning
                timing = time_ms(timed, device, run.quick)
                peak = peak_memory_mib(checked, device)
            if reference is None:
                reference = out
            rows.append(result(case_name, impl.name, timing, pass_=pass_, shape=shape, peak_memory=peak,
                               ceilings=run.ceilings, routing=impl.routing, backends_used=used, first_call_s=first_s,
                               **work, **compare(out, reference)))
        except Exception as exc:  # noqa: BLE001 - one failing implementation must not abort the run
            rows.append(result(case_name, impl.name, pass_=pass_, shape=shape, skipped=error_text(exc)))
        print_row(rows[-1])
        free_cache(device)
    return rows


def run_segment(run: Run, case: SegmentCase) -> list[dict]:
    import dinotxt_fast as dtf
    from dinotxt_fast.inference.segmentation import short_side_size, sliding_window_boxes

    model, device = run.state, run.device
    cfg = model.config
    size = short_side_size(*case.image, case.short_side)
    boxes = sliding_window_boxes(*size, case.window, case.stride)
    box_h, box_w = int(boxes[0, 2] - boxes[0, 0]), int(boxes[0, 3] - boxes[0, 1])
    stretched = (-(-box_h // cfg.patch_size) * cfg.patch_size, -(-box_w // cfg.patch_size) * cfg.patch_size)
    patches = (stretched[0] // cfg.patch_size) * (stretched[1] // cfg.patch_size)
    windows = case.images * len(boxes)
    flops = windows * (vision_flops(cfg, *stretched) + 2 * patches * case.classes * cfg.vision_dim)
    shape = {"images": case.images, "image": list(case.image), "canvas": list(size), "windows_per_image": len(boxes),
             "window_pixels": list(stretched), "classes": case.classes, "window_batch": case.batch_size}
    gen = torch.Generator().manual_seed(1)
    classes = torch.randn(case.classes, cfg.embed_dim, generator=gen).to(device)  # full text embeddings
    rot = Rotation(lambda: (torch.randn(case.images, 3, *case.image, device=device),), device)
    check_images = rot.sets[0][0]
    kw = dict(mode="slide", short_side=case.short_side, window=case.window, stride=case.stride,
              batch_size=case.batch_size)

    def make_call(impl: Impl):
        if impl.fused_segment:
            return (lambda: dtf.segment(model, rot.next()[0], classes, **kw),
                    lambda: dtf.segment(model, check_images, classes, return_scores=True, **kw))
        return (lambda: reference_segment(model, rot.next()[0], classes, case),
                lambda: reference_segment(model, check_images, classes, case, return_scores=True))

    def compare(out, ref):
        return {"pixel_agreement": float((out[0] == ref[0]).double().mean()),
                "max_abs_diff": max_abs_diff(out[1], ref[1])}

    return measure(run, case.name, "slide", implementations(device, "segment"), shape,
                   {"flops": flops, "items": case.images, "item_name": "images"}, make_call, compare)


def run_zeroshot(run: Run, case: ZeroShotCase) -> list[dict]:
    from dinotxt_fast.inference.templates import IMAGENET_TEMPLATES, format_prompt
    from dinotxt_fast.inference.zeroshot import ZeroShotClassifier, build_text_classifier
    from dinotxt_fast.models.tokenizer import tokenize

    model, device = run.state, run.device
    cfg = model.config
    side = case.image_size or 2 * cfg.patch_size
    with routed(("torch",), device):  # the classifier weights only set the matmul's width, not its speed
        clf = ZeroShotClassifier(model, class_names(case.classes), templates=["a photo of a {}."], progress=False)
    rot = Rotation(lambda: (torch.randn(case.images, 3, side, side, device=device),), device)
    check_images = rot.sets[0][0]

    def classify(images):
        with torch.no_grad():
            return clf(images)

    shape = {"images": case.images, "image_size": side, "classes": case.classes}
    flops = case.images * (vision_flops(cfg, side, side) + 2 * cfg.embed_dim * case.classes)
    rows = measure(run, case.name, "images", implementations(device, "zeroshot"), shape,
                   {"flops": flops, "items": case.images, "item_name": "images"},
                   lambda impl: (lambda: classify(rot.next()[0]), lambda: classify(check_images)),
                   lambda out, ref: {"top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).double().mean()),
                                     "max_abs_diff": max_abs_diff(out, ref)})

    # Prompts: class names are host strings, so there is nothing to rotate; the text tower's weights are re-read
    # from memory by every batch anyway.
    names = class_names(case.prompt_classes)
    templates = IMAGENET_TEMPLATES[:case.templates]
    batch_size = 256  # build_text_classifier's default
    prompts = [format_prompt(t, n) for n in names for t in templates]
    eot = tokenize(prompts, context_length=cfg.context_length).argmax(-1)
    flops = sum(text_flops(cfg, len(chunk), int(chunk.max()) + 1) for chunk in eot.split(batch_size))
    shape = {"classes": case.prompt_classes, "templates": len(templates), "prompts": len(prompts),
             "batch_size": batch_size}

    def build():
        return build_text_classifier(model, names, templates, batch_size=batch_size, progress=False)

    return rows + measure(run, case.name, "prompts", implementations(device, "zeroshot"), shape,
                          {"flops": flops, "items": len(prompts), "item_name": "prompts"},
                          lambda impl: (build, build), lambda out, ref: {"max_abs_diff": max_abs_diff(out, ref)})


# ------------------------------------------------------------------------------------------------------- main
def add_arguments(parser) -> None:
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--preset", default=PRESET, help="a dinotxt_fast.PRESETS name (random weights: speed does "
                        "not depend on them); a tiny version of it on --device cpu")


def check_arguments(parser, args) -> None:
    from dinotxt_fast.models.config import PRESETS  # after the driver set TRITON_INTERPRET for a CPU run

    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    if args.preset not in PRESETS:
        parser.error(f"unknown --preset {args.preset!r}; choose from {sorted(PRESETS)}")


def cases(args) -> list:
    return ((segment_cases(args.device, args.quick) if "segment" in args.parts else [])
            + (zeroshot_cases(args.device, args.quick) if "zeroshot" in args.parts else []))


def part(case) -> str:
    return "segment" if isinstance(case, SegmentCase) else "zeroshot"


def run_case(run: Run, case) -> list[dict]:
    return (run_segment if isinstance(case, SegmentCase) else run_zeroshot)(run, case)


def setup(run: Run):
    """The model every implementation runs: the preset at full size on CUDA, a tiny version of it on CPU."""
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32  # the interpreter cannot do bf16 dots
    return build_model(run.args.preset, overrides(run.device), run.device, dtype)


def overrides(device: torch.device) -> dict:
    return {} if device.type == "cuda" else TINY_MODEL


def settings(run: Run, case_list: list) -> dict:
    return {"parts": run.args.parts, "preset": run.args.preset, "model_overrides": overrides(run.device),
            "dtype": str(next(run.state.parameters()).dtype).replace("torch.", ""),
            "weights": "random (create_model); speed does not depend on them",
            "cases": {name: [asdict(c) for c in case_list if part(c) == name] for name in run.args.parts}}


NOTES = {
    "target": TARGET,
    "implementations": {
        REFERENCE: "every op on the torch backend; segmentation decoded with the full-resolution eager path (mmseg "
                   "slide_inference) built in this script from the same encoder outputs",
        SDPA: "the reference with attention through F.scaled_dot_product_attention",
        SEGMENT_TORCH: "dtf.segment on the torch backend (banded decode, no [C, H, W] map)",
        "ours (triton|cuda)": "every op routed to that backend (CUDA: families without a CUDA kernel run on Triton, "
                              "then torch; row field `routing`; `backends_used`: what each op family really ran in "
                              "the checked call); dtf.segment's fused decode",
        "ours (auto)": "the default dispatch; skipped while dispatch.AUTO_ORDER prefers torch everywhere (then it is "
                       "the reference)",
        "dtf.patch_model": "not applied: DinoTxt's attention already calls ops.attention (patch_model swaps foreign "
                           "attention modules), so routing is what selects kernels",
    },
    "items": "segment: images per call (one batched tensor, windows batched across images); zero-shot images: images "
             "per call; prompts: classes x templates per call",
    "flops": "matmul FLOPs of the encoders (backbone + head per window / image, attention in full; text: 24*T*D^2 + "
             "2*B*L^2*D per layer on the truncated length of each batch of 256 prompts) plus the cosine logits; "
             "decoding, resizing and tokenizing not counted",
    "checks": "against the reference row: pixel_agreement of labels and max_abs_diff of the winning score (segment), "
              "top1_agreement and max_abs_diff of logits (images), max_abs_diff of the normalised classifier "
              "(prompts). Random weights in bf16: disagreements come from kernel rounding at near-ties, not a "
              "quality measure",
    "inputs": "images rotate through copies bigger than 2x L2 (harness.Rotation); class embeddings for segmentation "
              "are random [C, embed_dim] tensors (text encoding is the prompts part); prompts are synthetic two-word "
              "class names",
    "ratios": "speedup_vs_best_baseline (add_ratios) and speedup_vs_reference (the target's baseline), with the peak "
              "memory ratios beside them",
    "first_call_s": "wall time of each row's checked call, its first, synchronised: mostly JIT compilation and "
                    "autotuning; never part of a timing",
    "budget": "with --budget-s (the GPU suite's time limit), implementations not started in time give skipped rows "
              "saying so",
}

BENCHMARK = Benchmark("infer", __doc__, cases, run_case, describe=lambda case: f"{part(case)} {asdict(case)}",
                      arguments=add_arguments, check=check_arguments, setup=setup,
                      ratios=(lambda rows: add_ratios_against(rows, REFERENCE, "reference"),), settings=settings,
                      notes=NOTES, quick_help="fewer images and prompts, fewer repetitions")
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())

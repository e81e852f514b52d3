"""`dinotxt-fast encode`: image and/or text embeddings to a .npy, .npz or .pt file."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .common import (
    CLIError, add_model_args, add_progress_arg, add_transform_args, batches, check_image_files, check_weight_args,
    compute_autocast, image_batches, load_model, progress,
)

SUFFIXES = (".npy", ".npz", ".pt")


def add_parser(sub):
    p = sub.add_parser("encode", help="image and/or text embeddings to .npy/.npz/.pt",
                       description="Encode image files (official eval transform: resize 256 bicubic, center crop "
                                   "224) and/or texts into DINO.txt embeddings.")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--text", action="append", help="a text to encode (repeatable)")
    p.add_argument("--text-file", metavar="FILE", help="texts to encode, one per line")
    p.add_argument("--out", "-o", required=True, help="output file: .npy (one kind), .npz or .pt")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    add_progress_arg(p)
    add_transform_args(p)
    add_model_args(p)
    return p


def run(args) -> int:
    from ..models.tokenizer import tokenize

    texts = list(args.text or [])
    if args.text_file:
        try:
            with open(args.text_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as exc:
            raise CLIError(f"cannot read --text-file {args.text_file}: {exc}") from None
    if not args.images and not texts:
        raise CLIError("nothing to encode: give image files and/or --text STRING / --text-file FILE")
    out = Path(args.out)
    if out.suffix.lower() not in SUFFIXES:
        raise CLIError(f"--out must end in .npy, .npz or .pt, got {out.name!r}")
    if out.suffix.lower() == ".npy" and args.images and texts:
        raise CLIError("a .npy file holds one array: use .npz or .pt to save image and text embeddings together")
    check_weight_args(args)  # every input file checked before the model is built
    check_image_files(args.images)
    model, device = load_model(args)
    image_emb = text_emb = None
    with torch.no_grad(), compute_autocast(args, device):
        if args.images:
            parts = [model.encode_image(batch.to(device), normalize=args.normalize).float().cpu()
                     for _, batch in image_batches(args.images, args)]
            image_emb = torch.cat(parts)
        if texts:
            parts = []
            with progress(args, total=len(texts), desc="texts", unit="text") as bar:
                for chunk in batches(texts, args.batch_size):
                    ids = tokenize(chunk, context_length=model.config.context_length).to(device)
                    parts.append(model.encode_text(ids, normalize=args.normalize).float().cpu())
                    bar.update(len(chunk))
            text_emb = torch.cat(parts)
    save_embeddings(out, image_emb, text_emb, list(args.images), texts)
    what = [f"{len(e)} {k}" for k, e in (("image", image_emb), ("text", text_emb)) if e is not None]
    dim = (image_emb if image_emb is not None else text_emb).shape[1]
    print(f"wrote {' and '.join(what)} embeddings (dim {dim}{', normalized' if args.normalize else ''}) to {out}")
    return 0


def save_embeddings(path: Path, image: Optional[torch.Tensor], text: Optional[torch.Tensor],
                    image_paths: list[str], texts: list[str]) -> None:
    """.npy: the one array; .npz: arrays "image" and/or "text"; .pt: the tensors with their paths and texts."""
    import numpy as np

    suffix = path.suffix.lower()  # one of SUFFIXES: checked by `run` before any work
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(path, (image if image is not None else text).numpy())
    elif suffix == ".npz":
        arrays = {k: v.numpy() for k, v in (("image", image), ("text", text)) if v is not None}
        np.savez(path, **arrays)
    else:
        out: dict = {}
        if image is not None:
            out.update(image_embeddings=image, image_paths=image_paths)
        if text is not None:
            out.update(text_embeddings=text, texts=texts)
        torch.save(out, path)

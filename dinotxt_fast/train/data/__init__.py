"""The trainer's data layer, one module per concern:

- `sources`: dataset specs and the sets they name (synthetic, CSV/TSV captions, WebDataset shard lists, image
  folders): `build_dataset`.
- `skips`: bad samples (`SkipSample`) and their per-reason counts (`SkipCounter`); skipped, never fatal.
- `sampler`: deterministic distributed batching of map-style sets (`GlobalBatchSampler`), exact on resume.
- `shards`: streaming WebDataset shards split over ranks and workers, resumable.
- `loader`: `make_loader` -> `Loader`, the (images, token ids) batches of one rank.
- `eval_sets`: the zero-shot and segmentation evaluation sets.
"""
from .eval_sets import SegmentationSet, ZeroShotSet, build_segmentation_set, build_zero_shot_set
from .loader import DEFAULT_CROP_SCALE, Loader, make_loader
from .sampler import GlobalBatchSampler
from .skips import SkipCounter, SkipSample
from .sources import FORMATS_HELP, CsvCaptions, ImageFolder, ShardSource, build_dataset

__all__ = ["build_dataset", "make_loader", "Loader", "GlobalBatchSampler", "SkipCounter", "SkipSample",
           "CsvCaptions", "ImageFolder", "ShardSource", "ZeroShotSet", "SegmentationSet", "build_zero_shot_set",
           "build_segmentation_set", "FORMATS_HELP", "DEFAULT_CROP_SCALE"]

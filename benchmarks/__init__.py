"""The benchmark suite: one script per op family (attention, pooling, contrastive, dense decoding) and two end to
end (infer, train), each declaring its cases on the shared driver of benchmarks/harness.py.

    python -m benchmarks [NAME ...] [--device cuda|cpu] [--quick] [--out DIR] [--budget-s S]  # then the report
    python benchmarks/<name>.py --help                     # one benchmark, with its own flags
    bash benchmarks/gpu_suite.sh                           # on a GPU machine: build, GPU tests, every benchmark

BENCHMARKS is the one list of them, read by __main__.py, gpu_suite.sh and report.py.
"""
from typing import NamedTuple, Optional


class Entry(NamedTuple):
    family: Optional[str]  # the dinotxt_fast.ops dispatch family whose measured table its GPU rows feed, if one
    suite_share: int  # its share of the GPU suite's benchmark time (gpu_suite.sh)


# In run order: kernels, then end to end. Shares from --quick runs on an H100 (attention ~75 s, contrastive ~40 s,
# pooling and dense decoding ~50 s together, infer ~50 s, train ~70 s, most of it first-call compiles and autotuning);
# the split of the former dense run between pooling (its torch.compile baseline) and decoding is an estimate.
BENCHMARKS: dict[str, Entry] = {
    "attention": Entry("attention", 28),
    "pooling": Entry("patch_pool", 11),
    "contrastive": Entry("contrastive_loss", 14),
    "dense": Entry(None, 6),  # two families (upsample_argmax, slide_decode), one per pass
    "reference": Entry(None, 3),  # the torch backend against naive PyTorch (CPU first: benchmarks/reference.py)
    "infer": Entry(None, 17),
    "train": Entry(None, 24),
}

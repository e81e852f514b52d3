import os
import sys

import pytest
import torch

# Tests run from the source tree too (the package is also pip-installed in CI).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Without a GPU the Triton kernels are exercised under Triton's CPU interpreter; the variable must be set before
# any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "prove: a GPU test of benchmarks/gpu_prove.sh's trimmed matrix (with gpu)")
    config.addinivalue_line("markers", "slow: longer CPU test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The kernel modules that allocate every output and workspace through a module-level `_empty` (torch.empty).
_ALLOCATING_KERNEL_MODULES = [f"dinotxt_fast.ops.{backend}.{family}" for backend in ("triton", "cuda")
                              for family in ("attention", "pooling", "contrastive", "dense")]


def _poisoned_empty(*args, **kwargs):
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan") if t.is_floating_point() else -1)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the Triton and CUDA kernel modules allocate comes filled with NaN (-1 for integers): an element a
    kernel forgets to write shows up in the results. Modules that cannot be imported here (no Triton) are skipped."""
    import importlib

    for name in _ALLOCATING_KERNEL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        monkeypatch.setattr(module, "_empty", _poisoned_empty)

import pytest
import torch

from .tiny_model import make_tiny


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


@pytest.fixture(scope="module")
def tiny64():
    return make_tiny(torch.float64)

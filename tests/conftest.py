"""Shared fixtures."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

from tests.helpers import TinyMLP, tiny_gpt2

# Models come from configs or from packages that ship weights: never from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Torch's first calls are slow (lazy init), which is not slow input generation.
settings.register_profile(
    "purelens", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("purelens")


@pytest.fixture
def mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP().eval()


@pytest.fixture(scope="session")
def gpt2() -> nn.Module:
    return tiny_gpt2()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _no_sdpa_vmap_warning() -> Iterator[None]:
    # torch warns that SDPA has no vmap batching rule on CPU (a slower loop, same values).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield

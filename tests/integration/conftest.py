"""Fixtures of the remote tests: a server on loopback (one per test module), a client, the model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from torch import nn

import purelens as pl
from purelens._server import create_app
from tests.helpers import serving
from tests.integration.test_remote import LIMITS, TOKENS


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serving(create_app(tokens=TOKENS, limits=LIMITS)) as address:
        yield address


@pytest.fixture(scope="module")
def remote(url: str) -> Iterator[Any]:
    with pl.remote(url, "default", token=TOKENS[0]) as handle:
        yield handle


@pytest.fixture(scope="module")
def local() -> tuple[nn.Module, Any]:
    return pl.models.load_default()

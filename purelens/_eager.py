"""Compiled models and compiled callers: purelens runs the model eagerly.

`torch.compile(model)` returns an ``OptimizedModule`` around the model. Its
compiled code ignores hooks added after the first compiled call, and its
``forward`` hides the model's signature, so interventions through it would
silently not happen. `run`, `generate`, `shapes`, `sweep`, `edit` and `sites`
therefore work on the module inside (``_orig_mod``), eagerly, with the site
names of the model itself (``"h.1"``, not ``"_orig_mod.h.1"``).

Called from code that dynamo is compiling, those functions run eagerly too
(dynamo breaks the graph around them), so that ``pl.run`` inside a
``torch.compile``-d function gives what it gives outside.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["eager_under_compile", "eagerly", "unwrapped"]

F = TypeVar("F", bound=Callable[..., Any])


def unwrapped(model: Any) -> Any:
    """The eager module inside `torch.compile`'s wrapper or a `pl.compile` handle (any
    other value as it is)."""
    if type(model).__name__ == "Compiled":  # cheaper than importing the class each call
        from ._compile import Compiled

        if isinstance(model, Compiled):
            model = model.model
    # Before dynamo is imported (or while another thread imports it), nothing is compiled.
    optimized = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    if optimized is None:
        return model
    while isinstance(model, optimized):
        model = model._orig_mod
    return model


def eager_under_compile(fn: F) -> F:
    """`fn`, run eagerly (outside the graph) when dynamo traces a call of it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return eagerly(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


_disabled: dict[Callable[..., Any], Callable[..., Any]] = {}


def eagerly(fn: F) -> F:
    """`fn` as dynamo calls it: outside the graph, eagerly. For a function that asks
    ``torch.compiler.is_compiling()`` itself (cheaper than `eager_under_compile`'s
    wrapper on a hot path), and calls this when it is."""
    disabled = _disabled.get(fn)
    if disabled is None:  # made on first use: torch.compiler.disable imports dynamo
        disabled = _disabled[fn] = torch.compiler.disable(fn, recursive=True)
    return disabled  # type: ignore[return-value]

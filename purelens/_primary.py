"""The primary tensor of a module's output or input, and how to put a new one back.

Modules return a tensor, a tuple/list (attention returns ``(out, weights)``),
or a mapping such as a HF ``ModelOutput``. Interventions see the first tensor;
a patch replaces only that element and keeps the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["primary_input", "primary_output"]

Rebuild = Callable[[Tensor], Any]


def _same(value: Tensor) -> Tensor:
    return value


def primary_output(output: Any) -> tuple[Tensor, Rebuild] | None:
    """The first tensor of `output` and a function that rebuilds `output` around a new one."""
    if isinstance(output, Tensor):
        return output, _same
    if isinstance(output, tuple | list):
        for i, item in enumerate(output):
            if isinstance(item, Tensor):
                return item, lambda v, i=i: _with_item(output, i, v)
        return None
    if isinstance(output, Mapping):
        for key, item in output.items():
            if isinstance(item, Tensor):
                return item, lambda v, key=key: _with_key(output, key, v)
    return None


def _with_item(seq: tuple[Any, ...] | list[Any], i: int, value: Tensor) -> Any:
    items = list(seq)
    items[i] = value
    if isinstance(seq, list):
        return items
    if hasattr(seq, "_fields"):  # a namedtuple
        return type(seq)(*items)
    return type(seq)(items)


def _with_key(mapping: Mapping[str, Any], key: str, value: Tensor) -> Any:
    # ModelOutput and dict subclasses both take their items as keyword arguments.
    return type(mapping)(**{**mapping, key: value})


def primary_input(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, Callable[[Tensor], tuple[tuple[Any, ...], dict[str, Any]]]] | None:
    """The first positional tensor (else the first tensor keyword) and how to swap it."""
    for i, item in enumerate(args):
        if isinstance(item, Tensor):
            return item, lambda v, i=i: ((*args[:i], v, *args[i + 1 :]), kwargs)
    for key, item in kwargs.items():
        if isinstance(item, Tensor):
            return item, lambda v, key=key: (args, {**kwargs, key: v})
    return None

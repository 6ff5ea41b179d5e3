"""Bounds on one call's work, for a server that runs other people's requests.

`bounded` sets, for the current context, a function that raises when the
call must stop (a deadline), called between interventions, between the nodes
of `purelens.ops` expressions and before every module of the served model;
and a budget of bytes for the values a pass saves, spent as it saves them,
so that a request asking for too much fails before it has taken the memory.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch.utils._pytree as torch_pytree
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ._errors import PurelensError

__all__ = ["SavedBytesError", "as_stop", "bounded", "check", "left", "spend", "stopped"]

_CHECK: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "purelens_check", default=None
)
_LEFT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "purelens_saved_bytes_left", default=None
)


class SavedBytesError(PurelensError):
    """The values saved in one call are over the budget that `bounded` set."""


@contextlib.contextmanager
def bounded(
    check: Callable[[], None] | None = None, saved_bytes: int | list[int] | None = None
) -> Iterator[None]:
    """Within this context, call `check` between steps of work and keep saves to `saved_bytes`.

    `saved_bytes` may also be a budget kept across contexts, ``[left, total]``
    (one request's over the steps of a vLLM engine), spent in place.
    """
    checking = _CHECK.set(check)
    if isinstance(saved_bytes, list):
        budget: list[int] | None = saved_bytes
    else:
        budget = None if saved_bytes is None else [saved_bytes, saved_bytes]
    left = _LEFT.set(budget)
    try:
        yield
    finally:
        _LEFT.reset(left)
        _CHECK.reset(checking)


def left() -> int | None:
    """The bytes the context's budget has left for saves, or None when it has none."""
    budget = _LEFT.get()
    return None if budget is None else budget[0]


def check() -> None:
    """Call the context's check (it raises when the work must stop; see `stopped`)."""
    fn = _CHECK.get()
    if fn is not None:
        as_stop(fn)


def as_stop(fn: Callable[[], None]) -> None:
    """Call `fn`, a check, marking what it raises as a stop (see `stopped`)."""
    try:
        fn()
    except Exception as error:
        error._purelens_stopped = True  # type: ignore[attr-defined]
        raise


def stopped(error: BaseException) -> bool:
    """Whether `error` was raised by the context's check (not by the work itself)."""
    return getattr(error, "_purelens_stopped", False) is True


def spend(value: Any) -> None:
    """Count the bytes of the tensors in `value` against the context's budget."""
    left = _LEFT.get()
    if left is None:
        return
    tensors = [value] if isinstance(value, Tensor) else torch_pytree.tree_leaves(value)
    left[0] -= sum(
        t.numel() * t.element_size()
        for t in tensors
        if isinstance(t, Tensor) and not isinstance(t, FakeTensor)  # a fake pass holds no data
    )
    if left[0] < 0:
        raise SavedBytesError(
            f"the values saved are over this call's budget of {left[1]} bytes (limit saved_bytes)"
        )

"""Named functions: how a function inside an intervention travels as data.

`pl.dumps` never serializes code. A function used in an intervention (the
`fn` of `pl.patch`, `pl.save`, ...) is written as the name it was registered
under, and `pl.loads` (on a server, in another process) looks that name up
in its own registry. Register the same function under the same name on both
sides.

A few torch functions that interventions often take are registered under
their torch names: ``"torch.clone"`` (a save that later code changes in
place), ``"torch.zeros_like"``, ``"torch.ones_like"``, ``"torch.neg"`` and
``"torch.abs"``.

Examples:
    >>> import torch, purelens as pl
    >>> @pl.functions.register("demo.double")
    ... def double(v):
    ...     return v * 2
    >>> pl.functions.get("demo.double") is double
    True
    >>> ivs = pl.loads(pl.dumps([pl.patch("0", double)]))
    >>> ivs[0].fn is double
    True
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ._errors import PurelensError

__all__ = ["get", "name_of", "names", "register"]

F = TypeVar("F", bound=Callable[..., Any])

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
_BAD_NAME = (
    "a function name must be 1-128 letters, digits, '_', '.' or '-', starting with a "
    "letter or '_'; got {name!r}."
)
_TAKEN = (
    "the name {name!r} is already registered for {other!r}.\n"
    "  Pick another name, or register the same function again (that is allowed)."
)
_UNKNOWN = (
    "no function is registered under {name!r}. Registered: {known}.\n"
    "  Register it where the interventions are loaded: "
    "@pl.functions.register({name!r}); on a server, start it with "
    "`purelens serve --import MODULE`, MODULE being the module that registers it."
)

_lock = threading.Lock()
_by_name: dict[str, Callable[..., Any]] = {}
_by_id: dict[int, str] = {}


def register(name: str) -> Callable[[F], F]:
    """A decorator registering a function under `name`, for `pl.dumps` and `pl.loads`.

    Raises:
        PurelensError: a malformed name, or one taken by another function.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PurelensError(_BAD_NAME.format(name=name))

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise PurelensError(f"pl.functions.register({name!r}) needs a callable, got {fn!r}.")
        with _lock:
            other = _by_name.get(name)
            if other is not None and other is not fn:
                raise PurelensError(_TAKEN.format(name=name, other=other))
            _by_name[name] = fn
            _by_id[id(fn)] = name
        return fn

    return decorate


def get(name: str) -> Callable[..., Any]:
    """The function registered under `name`.

    Raises:
        PurelensError: no function has that name.
    """
    with _lock:
        fn = _by_name.get(name) if isinstance(name, str) else None
        if fn is None:
            known = ", ".join(repr(n) for n in sorted(_by_name)) or "none"
            raise PurelensError(_UNKNOWN.format(name=name, known=known))
        return fn


def name_of(fn: Callable[..., Any]) -> str | None:
    """The name `fn` is registered under, or None."""
    with _lock:
        name = _by_id.get(id(fn))
        return name if name is not None and _by_name.get(name) is fn else None


def names() -> list[str]:
    """Every registered name, sorted."""
    with _lock:
        return sorted(_by_name)


def _register_torch() -> None:
    import torch

    for fn in (torch.clone, torch.zeros_like, torch.ones_like, torch.neg, torch.abs):
        register(f"torch.{fn.__name__}")(fn)


_register_torch()

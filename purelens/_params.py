"""`params=`: other tensors in place of a model's parameters and buffers, seen by one call only.

`torch.func.functional_call` swaps tensors into the modules, where every
thread sees them. purelens instead gives each module that owns a replaced
tensor a ``_parameters`` (or ``_buffers``) dict that answers reads from the
current context's replacements first. The call that asked for them sees
them, with everything it runs (autograd, `torch.func` transforms); a run in
another thread, or a plain call of the model, sees the module's own tensors.

Those dicts hold the module's own entries, so code that writes to them
(``module.weight = ...``, accelerate's offload) writes to the module. They
are installed for the length of the call, shared by concurrent calls
(reference-counted under a lock), and the module's own dicts are put back,
with any such writes, after the last. Tied weights follow
`functional_call`'s ``tie_weights=True``: replacing one name of a tied
tensor replaces it under every name.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._checkpoint import checkpointed
from ._errors import PurelensError

__all__ = ["replaced", "restore", "without_replacements"]

Key = tuple[int, str]  # (id(module), "_parameters" or "_buffers")

# The replacements the current context sees: (module, dict name) -> {name: tensor}.
_REPLACED: contextvars.ContextVar[Mapping[Key, Mapping[str, Tensor]] | None] = (
    contextvars.ContextVar("purelens_replaced", default=None)
)

# Whether the replacements take the model's writes too (fake passes: nothing they store
# may reach the model, or another thread).
_PRIVATE: contextvars.ContextVar[bool] = contextvars.ContextVar("purelens_private", default=False)

# Whether autograd recorded the call that set the replacements.
_RECORDING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "purelens_replaced_recording", default=False
)

_CHECKPOINTED = (
    "`params=` replaces {name!r}, which a part of the model under gradient checkpointing "
    "reads while gradients are recorded: the backward pass reruns that part after the run, "
    "when it reads the model's own tensors again, so the gradients would be wrong.\n"
    "  Turn checkpointing off for this run (model.gradient_checkpointing_disable()), or run "
    "without gradients (torch.no_grad())."
)
_TIED_APART = (
    "`params` gives {a!r} and {b!r} different tensors, but the model ties them (one "
    "tensor under both names).\n  Give one of the names (it replaces the tensor under "
    "both), or the same tensor for both."
)


class _Overlay(dict):  # type: ignore[type-arg]
    """A module's ``_parameters`` or ``_buffers``, answering reads with the context's replacements.

    Every read is overridden (``__iter__`` too, so that ``dict(overlay)``
    takes the slow path through ``__getitem__``); writes go to the entries,
    or, in a private context, to the context's replacements.
    """

    __slots__ = ("_key",)

    def __init__(self, entries: dict[str, Any], key: Key) -> None:
        super().__init__(entries)
        self._key = key

    def _replacing(self) -> Mapping[str, Tensor] | None:
        table = _REPLACED.get()
        return None if table is None else table.get(self._key)

    def __getitem__(self, name: str) -> Any:
        replacing = self._replacing()
        if replacing is not None and name in replacing:
            if _RECORDING.get() and not _PRIVATE.get() and checkpointed() == "forward":
                raise PurelensError(_CHECKPOINTED.format(name=name))
            return replacing[name]
        return dict.__getitem__(self, name)

    def __setitem__(self, name: str, value: Any) -> None:
        replacing = self._replacing()
        if replacing is not None and _PRIVATE.get():
            replacing[name] = value  # type: ignore[index]
        else:
            dict.__setitem__(self, name, value)

    def __contains__(self, name: object) -> bool:
        replacing = self._replacing()
        return dict.__contains__(self, name) or (replacing is not None and name in replacing)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def __iter__(self) -> Iterator[str]:
        replacing = self._replacing()
        if replacing is None:
            return dict.__iter__(self)
        return iter([*dict.keys(self), *(k for k in replacing if not dict.__contains__(self, k))])

    def keys(self) -> Any:
        return list(iter(self))

    def items(self) -> Any:
        replacing = self._replacing()
        if replacing is None:
            return dict.items(self)
        return [(k, self[k]) for k in self]

    def values(self) -> Any:
        return [v for _, v in self.items()]

    def copy(self) -> dict[str, Any]:
        return dict(self.items())

    def __reduce__(self) -> Any:  # a copy or pickle of the module holds a plain dict
        return (dict, (dict(self.items()),))


class _Installed:
    def __init__(self, module: nn.Module, kind: str) -> None:
        self.module = module
        self.kind = kind
        self.own: dict[str, Any] = module.__dict__[kind]
        self.overlay = _Overlay(self.own, (id(module), kind))
        self.users = 0


_installed: dict[Key, _Installed] = {}
_lock = threading.Lock()


def _install(module: nn.Module, kind: str) -> None:
    with _lock:
        key = (id(module), kind)
        entry = _installed.get(key)
        if entry is None:
            entry = _installed[key] = _Installed(module, kind)
            module.__dict__[kind] = entry.overlay
        entry.users += 1


def _uninstall(module: nn.Module, kind: str) -> None:
    with _lock:
        key = (id(module), kind)
        entry = _installed[key]
        entry.users -= 1
        if entry.users == 0:
            entries = dict(dict.items(entry.overlay))  # with what was written meanwhile
            entry.own.clear()
            entry.own.update(entries)
            module.__dict__[kind] = entry.own
            del _installed[key]


def _table(
    model: nn.Module, params: Mapping[str, Tensor], every: bool = False
) -> tuple[dict[Key, dict[str, Tensor]], list[tuple[nn.Module, str]]]:
    """What each (module, dict name) reads instead, and those modules (one walk of the tree)."""
    holders: dict[int, list[tuple[nn.Module, str, str]]] = {}  # id(tensor) -> its places
    owned: dict[str, Tensor] = {}  # full name -> the module's own tensor
    table: dict[Key, dict[str, Tensor]] = {}
    modules: dict[Key, nn.Module] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for kind in ("_parameters", "_buffers"):
            if every:  # every module gets a table of its own, for its writes
                table.setdefault((id(module), kind), {})
                modules[(id(module), kind)] = module
            for local, tensor in dict.items(module.__dict__[kind]):  # entries, not replacements
                if tensor is not None:
                    holders.setdefault(id(tensor), []).append((module, kind, local))
                    owned[dot + local] = tensor
    given: dict[int, tuple[str, Tensor]] = {}  # id(own tensor) -> the first name given for it
    for name, tensor in params.items():
        own = owned[name]
        first = given.setdefault(id(own), (name, tensor))
        if first[1] is not tensor:
            raise PurelensError(_TIED_APART.format(a=first[0], b=name))
        for module, kind, local in holders[id(own)]:
            table.setdefault((id(module), kind), {})[local] = tensor
            modules[(id(module), kind)] = module
    return table, [(modules[key], key[1]) for key in table]


@contextlib.contextmanager
def replaced(
    model: nn.Module, params: Mapping[str, Tensor], *, private: bool = False
) -> Iterator[None]:
    """Within this context, and in it only, `model` reads `params` in place of its own tensors.

    `params` maps names of ``model.named_parameters()`` and
    ``model.named_buffers()`` (checked by the caller) to tensors. With
    `private`, every module's parameters and buffers are the context's: what
    the model stores in them (a buffer it caches) stays in the context.
    """
    table, owners = _table(model, params, every=private)
    installed: list[tuple[nn.Module, str]] = []
    outer = _REPLACED.get() or {}
    merged = {**outer, **{key: {**outer.get(key, {}), **names} for key, names in table.items()}}
    token = _REPLACED.set(merged)
    recording = _RECORDING.set(torch.is_grad_enabled())
    privately = _PRIVATE.set(private)
    try:
        for module, kind in owners:
            _install(module, kind)
            installed.append((module, kind))
        yield
    finally:
        for module, kind in installed:
            _uninstall(module, kind)
        _PRIVATE.reset(privately)
        _RECORDING.reset(recording)
        _REPLACED.reset(token)


def without_replacements() -> contextvars.Token[Mapping[Key, Mapping[str, Tensor]] | None]:
    """Hide the context's replacements (a run's functions see the model's own tensors).

    Returns the token to pass to `restore`.
    """
    return _REPLACED.set(None)


def restore(token: contextvars.Token[Mapping[Key, Mapping[str, Tensor]] | None]) -> None:
    _REPLACED.reset(token)

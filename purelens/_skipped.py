"""A skip's value against what the skipped module returns: the same structure, or an error.

A skip's value stands in for the module's output, and the module's callers read
it as they read that output. A tensor where the module returns a tuple is
unpacked along its rows: transformers' ``attn_output, attn_weights =
self.attn(...)`` takes row 0 and row 1 of a batch of two, and the model runs on,
silently wrong (a diffusers ``unet(...)[0]`` takes the first image). `check`
compares the value's pytree structure with the output's, found by running the
module once on fake tensors (no compute, nothing written to the module) for
each kind of call: the structure of the arguments and their non-tensor values.
Where the module cannot run on fake tensors (a model that reads values, or
arguments under a ``torch.func`` transform) nothing is known and the value
goes through unchecked.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor, nn

from ._errors import PurelensError
from ._pass import ACTIVE, Pass
from ._plan import Plan
from ._validate import fake_pass

__all__ = ["check"]

_MISMATCH = (
    "{what}: {kind} returns {real} when it runs, and the skip gives {got}; the model "
    "would read the skip's value as that output ({how}).\n"
    "  Give pl.skip a function that returns the same structure, e.g. "
    "pl.skip({site!r}, {example})."
)
_PER_MODULE = 32  # kinds of call remembered per module

_lock = threading.Lock()
_known: weakref.WeakKeyDictionary[nn.Module, dict[Any, torch_pytree.TreeSpec | None]] = (
    weakref.WeakKeyDictionary()
)


def check(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any, skip: Any
) -> None:
    """Raise unless `value`, the output `skip` gives `module` in this call, has the structure
    of what the module returns for such a call (when that can be found)."""
    real = _structure(module, args, kwargs)
    if real is None:
        return
    got = torch_pytree.tree_structure(value)
    if got == real:
        return
    fake = torch_pytree.tree_unflatten([_Leaf()] * real.num_leaves, real)
    mine = torch_pytree.tree_unflatten([_Leaf()] * got.num_leaves, got)
    raise PurelensError(
        _MISMATCH.format(
            what=repr(skip),
            kind=type(module).__name__,
            real=_describe(fake),
            got=_describe(mine),
            how=_how(fake, mine),
            site=skip.site,
            example=_example(fake),
        )
    )


def _structure(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch_pytree.TreeSpec | None:
    """The pytree structure of `module`'s output for this call; None where unknown."""
    leaves, spec = torch_pytree.tree_flatten((args, kwargs))
    key = (str(spec), tuple(_kind(leaf) for leaf in leaves))
    with _lock:
        known = _known.setdefault(module, {})
        if key in known:
            return known[key]
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return None  # functorch's tensors have no fakes (known once a plain call has run)
    try:
        found = torch_pytree.tree_structure(_fake_call(module, args, kwargs))
    except PurelensError:  # it cannot run on fake tensors
        found = None
    with _lock:
        if len(known) >= _PER_MODULE:
            known.clear()
        known[key] = found
    return found


def _fake_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`module(*args, **kwargs)` on fake tensors, with no pass active (a plain call)."""

    def forward(model: nn.Module, pass_: Pass, a: Any, k: Any, params: Any) -> Any:
        token = ACTIVE.set(())
        try:
            return model(*a, **k)
        finally:
            ACTIVE.reset(token)

    empty = Pass(Plan.cached(module, ()), module)
    return fake_pass(
        module, empty, args, kwargs, None, forward, check=False, what="pl.skip", undo_all=True
    )


def _kind(leaf: Any) -> Any:
    if isinstance(leaf, Tensor):
        return "tensor"
    if leaf is None or isinstance(leaf, bool | int | float | str):
        return leaf
    return type(leaf)


class _Leaf:
    """A leaf of a structure, for describing it."""


def _describe(tree: Any) -> str:
    """``a tensor``, ``a tuple of 2``, ``a tuple (tensor, a tuple of 2)``, ``a BaseModelOutput
    with last_hidden_state`` (a leaf is a tensor, or None or a number in its place)."""
    if isinstance(tree, _Leaf):
        return "a tensor"
    if isinstance(tree, tuple | list):
        kind = type(tree).__name__
        if all(isinstance(t, _Leaf) for t in tree):
            return f"a {kind} of {len(tree)}"
        inner = ("tensor" if isinstance(t, _Leaf) else _describe(t) for t in tree)
        return f"a {kind} ({', '.join(inner)})"
    if isinstance(tree, dict):
        return f"a {type(tree).__name__} with {', '.join(map(str, tree))}"
    return f"a {type(tree).__name__}"


def _how(real: Any, got: Any) -> str:
    if isinstance(got, _Leaf) and isinstance(real, tuple | list):
        return "a tensor unpacked or indexed as a tuple gives its rows: wrong values, no error"
    return "wrong values or an error, wherever it reads the output"


def _example(real: Any) -> str:
    if isinstance(real, tuple) and real and all(isinstance(t, _Leaf) for t in real):
        return "lambda x: (x,)" if len(real) == 1 else f"lambda x: (x{', None' * (len(real) - 1)})"
    if isinstance(real, _Leaf):
        return "lambda x: x"
    return f"lambda x: <{_describe(real)} holding x>"

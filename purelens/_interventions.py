"""Interventions: frozen pytree nodes (users build them with `_builders`).

Tensor arguments (a replacement, a steering vector, a factor) are the leaves;
sites, functions, names and selectors are static metadata. Nodes never change:
`torch.func.vmap` over a steering vector is `vmap` over the `add` node's leaf.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from . import _select
from ._errors import PurelensError
from ._layout import current as current_layout
from ._padding import aligned
from ._select import Calls, Rows, Steps
from ._tree import hashable, pytree_node, static_field

__all__ = [
    "Ablate",
    "Add",
    "Intervention",
    "Patch",
    "Replace",
    "Save",
    "Scale",
    "Skip",
    "Stop",
    "Transplant",
    "Writer",
    "flatten_interventions",
    "rewrite",
    "takes_saved",
]

_NOT_INTERVENTION = (
    "`interventions` must hold purelens interventions (pl.save, pl.patch, ...), "
    "possibly in nested lists or tuples; got {value!r}."
)
_BAD_RESULT = (
    "{what} at site {site!r} returned {got}, but the {noun} there is {want}.\n"
    "  A patch must keep the shape and dtype of the {noun} it replaces{rows}."
)
_NOT_TENSOR = "{what} at site {site!r} returned {value!r}, not a torch.Tensor."
_BAD_BROADCAST = (
    "{what} at site {site!r}: a value of shape {got} does not broadcast to the site's shape {want}."
)
_OVERFLOW = (
    "{what} at site {site!r}: its value does not fit the site's {want} values (it would "
    "overflow or wrap around).\n  Give a value within the range of {want}."
)
_MEAN_OF_INTEGERS = (
    "{what} at site {site!r}: the value there is {got}, and the mean of integers (token ids) "
    "is not one of them.\n  Mean-ablate where the values are floating-point (the embedding's "
    "output), or replace the ids with pl.replace."
)
_LOSSY_CAST = (
    "{what} at site {site!r}: the site holds {want} values, and a {got} value would be "
    "changed to fit them (e.g. 0.5 truncated to 0 for integers).\n"
    "  Give a {kind} value, or intervene where the values are {got} (for token ids, "
    "at the embedding's output: pl.add('wte', delta))."
)
_MEAN_OF_ONE = (
    "{what} at site {site!r}: the value there is {got}, with one token or example to average "
    "over (no batch or position beyond it), so a mean ablation would change nothing.\n"
    "  Under torch.func.vmap over examples, each example is a run of its own, whose "
    "batch is that example: compute the mean over examples outside vmap and use "
    "pl.replace(site, mean)."
)


def describe(value: Any) -> str:
    """A short description of a value: ``float32[2, 5, 64]`` for a tensor."""
    if isinstance(value, Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return repr(value)


class Intervention:
    """Base class of every intervention node.

    Subclasses are frozen dataclasses registered as pytrees; their tensor
    fields are leaves. Two nodes are equal when they are of one type, with
    equal static fields and the same leaves (tensors by identity).
    """

    __slots__ = ()
    site: str
    step: Steps
    call: Calls

    def _key(self) -> tuple[Any, ...]:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return (type(self), *(id(v) if isinstance(v, Tensor) else hashable(v) for v in values))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Intervention):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata and f.name != "site" and value == f.default:
                continue
            shown = getattr(value, "__name__", None) if callable(value) else None
            parts.append(f"{f.name}={shown or describe(value)}")
        return f"{type(self).__name__.lower()}({', '.join(parts)})"


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Save(Intervention):
    """Record `fn(value)` (or `value`) under `name`."""

    site: str = static_field()
    fn: Callable[[Tensor], Any] | None = static_field(default=None)
    name: str = static_field(default="")
    step: Steps = static_field(default=None)
    batch: Rows = static_field(default=None)
    call: Calls = static_field(default=None)

    def record(self, value: Tensor) -> Any:
        value = _select.take_rows(value, self.batch, self.site)
        return value if self.fn is None else self.fn(value)


class Writer(Intervention):
    """An intervention that replaces the value at its site (on the selected rows).

    A writer hands the model a tensor of its own: one the model may write into
    in place without changing the intervention's tensors or anything else
    outside the pass. Writers whose results are always new tensors say so
    with ``fresh``; the others' results are copied.
    """

    __slots__ = ()
    batch: Rows
    fresh: bool = False  # new_value always returns a new, dense tensor

    def new_value(self, rows: Tensor, saved: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def write(self, value: Tensor, saved: Mapping[str, Any]) -> Tensor:
        """`value` with this intervention applied, checked against its shape and dtype."""
        return rewrite(self, value, lambda rows: self.new_value(rows, saved))


def rewrite(
    node: Intervention, value: Tensor, compute: Callable[[Tensor], Any], noun: str = "value"
) -> Tensor:
    """`value` with `compute` applied to the rows `node.batch` selects, checked.

    The result must be a tensor of the rows' shape and dtype; it is moved to
    their device and written back out of place.
    """
    batch = getattr(node, "batch", None)
    rows = _select.take_rows(value, batch, node.site)
    new = compute(rows)
    if not isinstance(new, Tensor):
        raise PurelensError(_NOT_TENSOR.format(what=repr(node), site=node.site, value=new))
    if new.shape != rows.shape or new.dtype != rows.dtype:
        raise PurelensError(
            _BAD_RESULT.format(
                what=repr(node),
                site=node.site,
                got=describe(new),
                noun=noun,
                want=describe(rows),
                rows=f" (the rows selected by batch={batch!r})" if batch is not None else "",
            )
        )
    if new.device != rows.device:
        new = new.to(rows.device)
    if batch is None and new is not rows and not getattr(node, "fresh", False):
        # The result becomes the model's own value: it must not be a view of a
        # tensor the user holds (in-place model code would write into it) nor an
        # expanded tensor (which in-place code cannot write into at all).
        new = new.clone()
    return _select.put_rows(value, batch, new, node.site)


def takes_saved(fn: Callable[..., Any]) -> bool:
    """Whether `fn` takes a second positional argument (the saved mapping).

    A callable may say so itself with a ``takes_saved`` attribute (as `pl.at`
    does). A second parameter with a default (``lambda v, c=clean: ...``) is a
    closure trick, not a request for `saved`. Nothing is cached: a cache keyed
    on the function would keep it, and everything it captures, alive.
    """
    declared = getattr(fn, "takes_saved", None)
    if isinstance(declared, bool):
        return declared
    code = getattr(fn, "__code__", None)
    if inspect.isfunction(fn) and code is not None:  # the common case, without inspect
        positional = code.co_argcount
        defaults = len(fn.__defaults__ or ())
        return positional >= 2 and positional - defaults >= 2
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature take the value only
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional_params = [p for p in params if p.kind in kinds]
    return len(positional_params) >= 2 and positional_params[1].default is inspect.Parameter.empty


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Patch(Writer):
    """Replace the value with `fn(value)` or `fn(value, saved)`."""

    site: str = static_field()
    fn: Callable[..., Tensor] = static_field(default=None)  # type: ignore[assignment]
    step: Steps = static_field(default=None)
    batch: Rows = static_field(default=None)
    takes_saved: bool = static_field(default=False)
    call: Calls = static_field(default=None)

    def new_value(self, rows: Tensor, saved: Mapping[str, Any]) -> Any:
        return self.fn(rows, saved) if self.takes_saved else self.fn(rows)


def _broadcast(what: Writer, value: Tensor, rows: Tensor) -> Tensor:
    """`value` cast to the site's dtype (refusing lossy casts) and broadcast to its shape."""
    value = _cast(what, value, rows)
    try:
        return torch.broadcast_to(value, rows.shape)
    except RuntimeError:
        raise _bad_broadcast(what, value, rows) from None


def _cast(what: Writer, value: Tensor, rows: Tensor) -> Tensor:
    """`value` on the site's device and in its dtype, refusing lossy casts."""
    if value.dtype != rows.dtype:
        if not torch.can_cast(value.dtype, rows.dtype):
            got, want = _kind(value.dtype), _kind(rows.dtype)
            raise PurelensError(
                _LOSSY_CAST.format(what=repr(what), site=what.site, got=got, want=want, kind=want)
            )
        _check_fits(what, value, rows.dtype)
    elif value.device == rows.device:
        return value
    return value.to(device=rows.device, dtype=rows.dtype)


def _bad_broadcast(what: Writer, value: Tensor, rows: Tensor) -> PurelensError:
    return PurelensError(
        _BAD_BROADCAST.format(
            what=repr(what), site=what.site, got=list(value.shape), want=list(rows.shape)
        )
    )


def _check_fits(what: Writer, value: Tensor, dtype: torch.dtype) -> None:
    """Raise if casting `value` to `dtype` changes it beyond rounding (overflow, wrap-around)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(value) or isinstance(value, FakeTensor):
        return  # no values to look at
    cast = value.to(dtype)
    if dtype.is_floating_point or dtype.is_complex:
        broken = bool((torch.isinf(cast) & ~torch.isinf(value)).any())
    else:
        broken = not bool((cast.to(value.dtype) == value).all())
    if broken:
        raise PurelensError(
            _OVERFLOW.format(
                what=repr(what), site=what.site, want=str(dtype).removeprefix("torch.")
            )
        )


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "boolean" if dtype == torch.bool else "integer"


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Replace(Writer):
    """Replace the value with a tensor, broadcast to the site's shape."""

    site: str = static_field()
    value: Tensor = None  # type: ignore[assignment]
    step: Steps = static_field(default=None)
    batch: Rows = static_field(default=None)
    call: Calls = static_field(default=None)

    def new_value(self, rows: Tensor, saved: Mapping[str, Any]) -> Tensor:
        return _broadcast(self, torch.as_tensor(self.value), rows)


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Add(Writer):
    """Add `delta` to the value (steering); `delta` is cast to the value's dtype."""

    site: str = static_field()
    delta: Tensor | float = 0.0
    step: Steps = static_field(default=None)
    batch: Rows = static_field(default=None)
    call: Calls = static_field(default=None)
    fresh = True

    def new_value(self, rows: Tensor, saved: Mapping[str, Any]) -> Tensor:
        delta = _cast(self, torch.as_tensor(self.delta), rows)
        try:  # (adding checks the shapes: cheaper than broadcasting first)
            new = rows + delta
        except RuntimeError:
            raise _bad_broadcast(self, delta, rows) from None
        if new.shape != rows.shape:  # `delta` would grow the value
            raise _bad_broadcast(self, delta, rows)
        return new


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Scale(Writer):
    """Multiply the value by `factor`."""

    site: str = static_field()
    factor: Tensor | float = 1.0
    step: Steps = static_field(default=None)
    batch: Rows = static_field(default=None)
    call: Calls = static_field(default=None)
    fresh = True

    def new_value(self, rows: Tensor, saved: Mapping[str, Any]) -> Tensor:
        return rows * _broadcast(self, torch.as_tensor(self.factor), rows)


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Ablate(Writer):
    """Zero the value, or replace it with its mean over batch and position."""

    site: str = static_field()
    how: Literal["zero", "mean"] = static_field(default="zero")
    step: Steps = static_field(default=None)
    batch: Rows = static_field(default=None)
    call: Calls = static_field(default=None)

    @property
    def fresh(self) -> bool:  # type: ignore[override]
        return self.how == "zero"

    def new_value(self, rows: Tensor, saved: Mapping[str, Any]) -> Tensor:
        if self.how == "zero":
            return torch.zeros_like(rows)
        if not (rows.is_floating_point() or rows.is_complex()):
            raise PurelensError(
                _MEAN_OF_INTEGERS.format(what=repr(self), site=self.site, got=describe(rows))
            )
        layout = current_layout()
        if layout.heads is None:
            # Every dimension but the last (features) is batch or position.
            values, dims = rows, tuple(range(rows.ndim - 1))
        else:
            # A per-head port: batch and position only, never across heads.
            values, dims = rows.movedim(layout.pos, 1), (0, 1)
        # In a padded batch of token rows, only real tokens count.
        real = aligned(values, 1) if values.ndim >= 3 else None  # (batch, positions, ...)
        if real is None:
            count = math.prod([values.shape[d] for d in dims])
            mean = values.mean(dim=dims, keepdim=True)
        else:
            weight = real.reshape(*real.shape, *([1] * (values.ndim - 2))).to(values.dtype)
            count = int(real.sum()) * math.prod([values.shape[d] for d in dims[2:]])
            mean = (values * weight).sum(dim=dims, keepdim=True) / max(count, 1)
        if count < 2:
            raise PurelensError(
                _MEAN_OF_ONE.format(what=repr(self), site=self.site, got=describe(rows))
            )
        if layout.heads is not None:
            return mean.expand_as(values).movedim(1, layout.pos)
        return mean.expand_as(rows)


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Transplant(Writer):
    """Copy the value of rows `src` into rows `dst` (cross-prompt patching)."""

    site: str = static_field()
    src: tuple[int, ...] = static_field(default=())
    dst: tuple[int, ...] = static_field(default=())
    step: Steps = static_field(default=None)
    batch: Rows = static_field(default=None, init=False, repr=False)
    call: Calls = static_field(default=None)
    fresh = True

    def new_value(self, rows: Tensor, saved: Mapping[str, Any]) -> Tensor:
        size = rows.shape[0]
        for r in self.src + self.dst:
            if not -size <= r < size:
                raise PurelensError(
                    f"{self!r}: row {r} is outside the batch of size {size} at site {self.site!r}."
                )
        dst = torch.tensor([r % size for r in self.dst], device=rows.device)
        return rows.index_put((dst,), rows[list(self.src)])


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Stop(Intervention):
    """End the forward pass right after the site has run."""

    site: str = static_field()
    step: Steps = static_field(default=None)
    call: Calls = static_field(default=None)


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Skip(Intervention):
    """Do not run the module; its output is `fn(input)`, or the input itself."""

    site: str = static_field()
    fn: Callable[[Tensor], Any] | None = static_field(default=None)
    step: Steps = static_field(default=None)
    call: Calls = static_field(default=None)


def flatten_interventions(interventions: Any) -> tuple[Intervention, ...]:
    """The interventions of a (nested) list or tuple, in order."""
    if isinstance(interventions, Intervention):
        return (interventions,)
    if isinstance(interventions, list | tuple):
        for item in interventions:
            if not isinstance(item, Intervention):
                break
        else:  # a flat list (the common case): no recursion
            return tuple(interventions)
        out: list[Intervention] = []
        for item in interventions:
            out.extend(flatten_interventions(item))
        return tuple(out)
    raise PurelensError(_NOT_INTERVENTION.format(value=interventions))

"""Functions as data: a small expression language for `pl.patch`, `pl.save` and friends.

An expression is a tree of values, not code, so `pl.dumps` can send it to a
server that evaluates it with this module's interpreter, which can only do
what the node types below do: no builtins, no attribute access, no imports.
`ops.value` is the value at the site (or the model's output, in a `loss`);
`ops.saved(name)` something saved earlier in the pass; tensors and numbers
are constants. Indexing with a field name reads a field of a model output:
``ops.value["logits"][:, -1]``.

Examples:
    >>> import torch, purelens as pl
    >>> from purelens import ops
    >>> fn = ops.where(torch.tensor([True, False]), ops.value * 2, 0.0)
    >>> fn(torch.tensor([1.0, 1.0]))
    tensor([2., 0.])
    >>> halve_last = ops.rearrange(ops.value, "b s d -> b s d")[:, -1] / 2
    >>> pl.loads(pl.dumps([pl.save("0", halve_last)]))[0].fn(torch.ones(1, 3, 2))
    tensor([[0.5000, 0.5000]])
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ._budget import check
from ._errors import PurelensError

__all__ = [
    "BINARY",
    "REDUCTIONS",
    "UNARY",
    "ElementLimitError",
    "Expr",
    "const",
    "limit_elements",
    "rearrange",
    "reduce",
    "saved",
    "unary",
    "value",
    "where",
]

BINARY: dict[str, Callable[..., Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "gt": torch.gt,
    "ge": torch.ge,
    "lt": torch.lt,
    "le": torch.le,
}
UNARY: dict[str, Callable[..., Tensor]] = {
    "neg": torch.neg,
    "abs": torch.abs,
    "exp": torch.exp,
    "log": torch.log,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
REDUCTIONS = ("mean", "sum", "max", "min")
_PATTERN = re.compile(r"[A-Za-z0-9_ ()\-.>]{1,200}")
_MAX_NODES = 256
_FIELD = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_NOT_ITERABLE = (
    "ops: the expression {expr!r} is not iterable: it stands for a value that exists only "
    "when the intervention runs.\n  Index it instead (expr[0], expr[:, -1])."
)
_MAX_ELEMENTS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "purelens_ops_max_elements", default=None
)


def _element_limit() -> int | None:
    """The context's limit on the elements of one expression's results (`limit_elements`)."""
    return _MAX_ELEMENTS.get()


@contextlib.contextmanager
def limit_elements(n: int) -> Iterator[None]:
    """Refuse, before computing it, any result that takes one expression over `n` elements.

    The results of one evaluation of an expression count together (nested
    operations keep theirs alive until the end). A server evaluating
    expressions from requests uses this, since broadcasting and indexing can
    make a few small constants into a huge tensor.

    Examples:
        >>> import torch
        >>> from purelens import ops
        >>> grow = ops.value[:, None] * torch.ones(1, 1000)
        >>> with ops.limit_elements(10_000):
        ...     grow(torch.ones(100)).shape
        Traceback (most recent call last):
        ...
        purelens.ops.ElementLimitError: ops: a result of 100000 elements is over the limit of 10000.
    """
    token = _MAX_ELEMENTS.set(n)
    try:
        yield
    finally:
        _MAX_ELEMENTS.reset(token)


class ElementLimitError(PurelensError):
    """A result over the limit set by `limit_elements`."""


class _NotIterable(PurelensError, TypeError):
    """Iterating an expression (a TypeError too, as for any value that is not iterable)."""


# The elements of the results so far in the current evaluation (see `Expr.__call__`).
_SPENT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "purelens_ops_spent", default=None
)


def _check_elements(n: int) -> None:
    check()  # a server's deadline, between the nodes of an expression
    limit = _MAX_ELEMENTS.get()
    if limit is None:
        return
    if n > limit:
        raise ElementLimitError(f"ops: a result of {n} elements is over the limit of {limit}.")
    spent = _SPENT.get()
    if spent is not None:
        spent[0] += n
        if spent[0] > limit:
            raise ElementLimitError(
                f"ops: the results of one expression come to {spent[0]} elements, over the "
                f"limit of {limit}."
            )


def _device(value: Any) -> torch.device | None:
    """Where constants go: the site's device (None for a model output, whose fields say)."""
    return value.device if isinstance(value, Tensor) else None


def _tensor(x: Any, value: Any) -> Tensor:
    return torch.as_tensor(x, device=_device(value) if not isinstance(x, Tensor) else x.device)


class Expr:
    """An expression over the site's value; call it as ``expr(value)`` or ``expr(value, saved)``."""

    __slots__ = ()

    def evaluate(self, value: Tensor, saved: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def children(self) -> tuple[Expr, ...]:
        return ()

    def nodes(self) -> Iterator[Expr]:
        yield self
        for child in self.children():
            yield from child.nodes()

    @property
    def takes_saved(self) -> bool:
        """Whether the expression reads `saved` (then a patch passes it)."""
        return any(isinstance(n, Saved) for n in self.nodes())

    def __call__(self, value: Tensor, saved: Mapping[str, Any] | None = None) -> Any:
        token = _SPENT.set([0])
        try:
            return self.evaluate(value, saved if saved is not None else {})
        finally:
            _SPENT.reset(token)

    def __add__(self, other: Any) -> Expr:
        return Binary("add", self, _wrap(other))

    def __radd__(self, other: Any) -> Expr:
        return Binary("add", _wrap(other), self)

    def __sub__(self, other: Any) -> Expr:
        return Binary("sub", self, _wrap(other))

    def __rsub__(self, other: Any) -> Expr:
        return Binary("sub", _wrap(other), self)

    def __mul__(self, other: Any) -> Expr:
        return Binary("mul", self, _wrap(other))

    def __rmul__(self, other: Any) -> Expr:
        return Binary("mul", _wrap(other), self)

    def __truediv__(self, other: Any) -> Expr:
        return Binary("div", self, _wrap(other))

    def __rtruediv__(self, other: Any) -> Expr:
        return Binary("div", _wrap(other), self)

    def __pow__(self, other: Any) -> Expr:
        return Binary("pow", self, _wrap(other))

    def __gt__(self, other: Any) -> Expr:
        return Binary("gt", self, _wrap(other))

    def __ge__(self, other: Any) -> Expr:
        return Binary("ge", self, _wrap(other))

    def __lt__(self, other: Any) -> Expr:
        return Binary("lt", self, _wrap(other))

    def __le__(self, other: Any) -> Expr:
        return Binary("le", self, _wrap(other))

    def __neg__(self) -> Expr:
        return Unary("neg", self)

    def __getitem__(self, key: Any) -> Expr:
        items = key if isinstance(key, tuple) else (key,)
        return Index(self, tuple(_index_item(k) for k in items))

    def __iter__(self) -> Iterator[Expr]:
        # Without this, iteration falls back to `__getitem__` with 0, 1, 2, ..., which
        # builds a new expression for every int: `list(expr)` would never end.
        raise _NotIterable(_NOT_ITERABLE.format(expr=self))


def _wrap(x: Any) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, Tensor | int | float) and not isinstance(x, bool):
        return Const(x)
    raise PurelensError(
        f"an ops expression takes tensors, numbers and other expressions, got {x!r}."
    )


def _index_item(k: Any) -> Any:
    if k is None or k is Ellipsis or isinstance(k, slice):
        if isinstance(k, slice) and not all(
            v is None or (isinstance(v, int) and not isinstance(v, bool))
            for v in (k.start, k.stop, k.step)
        ):
            raise PurelensError(f"ops: slice bounds must be ints or None, got {k!r}.")
        return k
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    if isinstance(k, Tensor):
        return Const(k)
    if isinstance(k, str) and _FIELD.fullmatch(k):
        return k
    raise PurelensError(
        "ops: index with ints, slices, None, ..., tensors (rows, masks) or a field name "
        f"(letters, digits, '_'; not starting with '_'), got {k!r}."
    )


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Value(Expr):
    """The value at the site."""

    def evaluate(self, value: Tensor, saved: Mapping[str, Any]) -> Any:
        return value

    def __repr__(self) -> str:
        return "ops.value"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Saved(Expr):
    """A value saved earlier in the same pass."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise PurelensError(f"ops.saved takes a name (a string), got {self.name!r}.")

    def evaluate(self, value: Tensor, saved: Mapping[str, Any]) -> Any:
        try:
            return saved[self.name]
        except KeyError:
            raise PurelensError(
                f"ops.saved({self.name!r}): nothing of that name was saved earlier in the pass."
            ) from None

    def __repr__(self) -> str:
        return f"ops.saved({self.name!r})"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Const(Expr):
    """A tensor or a number."""

    value: Any

    def __post_init__(self) -> None:
        if not isinstance(self.value, Tensor | int | float) or isinstance(self.value, bool):
            raise PurelensError(f"ops: a constant is a tensor or a number, got {self.value!r}.")

    def evaluate(self, value: Tensor, saved: Mapping[str, Any]) -> Any:
        if isinstance(self.value, Tensor) and isinstance(value, Tensor):
            return self.value.to(value.device)
        return self.value

    def __repr__(self) -> str:
        return f"ops.const({self.value!r})"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Binary(Expr):
    """Elementwise `op` of two expressions (broadcasting)."""

    op: str
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        if self.op not in BINARY:
            raise PurelensError(f"ops: unknown operation {self.op!r}; known: {sorted(BINARY)}.")

    def children(self) -> tuple[Expr, ...]:
        return (self.a, self.b)

    def evaluate(self, value: Tensor, saved: Mapping[str, Any]) -> Any:
        a = _tensor(self.a.evaluate(value, saved), value)
        b = _tensor(self.b.evaluate(value, saved), value)
        _check_elements(math.prod(torch.broadcast_shapes(a.shape, b.shape)))
        return BINARY[self.op](a, b)

    def __repr__(self) -> str:
        return f"ops.{self.op}({self.a!r}, {self.b!r})"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Unary(Expr):
    """An elementwise function of one expression."""

    op: str
    a: Expr

    def __post_init__(self) -> None:
        if self.op not in UNARY:
            raise PurelensError(f"ops: unknown function {self.op!r}; known: {sorted(UNARY)}.")

    def children(self) -> tuple[Expr, ...]:
        return (self.a,)

    def evaluate(self, value: Tensor, saved: Mapping[str, Any]) -> Any:
        result = torch.as_tensor(self.a.evaluate(value, saved))
        _check_elements(result.numel())
        return UNARY[self.op](result)

    def __repr__(self) -> str:
        return f"ops.unary({self.op!r}, {self.a!r})"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Index(Expr):
    """``a[key]``: ints, slices, None, ``...`` and tensors (row indices, masks)."""

    a: Expr
    key: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.key, tuple):
            raise PurelensError(f"ops: an index key is a tuple, got {self.key!r}.")
        for k in self.key:
            if not isinstance(k, Expr):
                _index_item(k)  # raises for anything but ints, slices, None, ... and fields

    def children(self) -> tuple[Expr, ...]:
        return (self.a, *(k for k in self.key if isinstance(k, Expr)))

    def evaluate(self, value: Tensor, saved: Mapping[str, Any]) -> Any:
        key = tuple(k.evaluate(value, saved) if isinstance(k, Expr) else k for k in self.key)
        a = self.a.evaluate(value, saved)
        rows = [k for k in key if isinstance(k, Tensor) and k.dtype != torch.bool]
        if rows and isinstance(a, Tensor):  # index tensors can make a result larger than `a`
            _check_elements(a.numel() * math.prod(k.numel() for k in rows))
        return a[key[0]] if len(key) == 1 else a[key]  # a field name is not a tuple

    def __repr__(self) -> str:
        return f"{self.a!r}[{', '.join(map(repr, self.key))}]"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Where(Expr):
    """``torch.where(mask, a, b)``."""

    mask: Expr
    a: Expr
    b: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.mask, self.a, self.b)

    def evaluate(self, value: Tensor, saved: Mapping[str, Any]) -> Any:
        a = _tensor(self.a.evaluate(value, saved), value)
        b = _tensor(self.b.evaluate(value, saved), value)
        mask = _tensor(self.mask.evaluate(value, saved), value).to(a.device, torch.bool)
        _check_elements(math.prod(torch.broadcast_shapes(mask.shape, a.shape, b.shape)))
        out = torch.where(mask, a, b)
        if isinstance(value, Tensor) and out.is_floating_point() and value.is_floating_point():
            return out.to(value.dtype)
        return out

    def __repr__(self) -> str:
        return f"ops.where({self.mask!r}, {self.a!r}, {self.b!r})"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Einops(Expr):
    """einops ``rearrange`` (`reduction` None) or ``reduce`` with a pattern."""

    a: Expr
    pattern: str
    reduction: str | None = None
    axes: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not _PATTERN.fullmatch(self.pattern):
            raise PurelensError(
                f"ops: an einops pattern uses letters, digits, spaces, '(', ')' and '->'; "
                f"got {self.pattern!r}."
            )
        if self.reduction is not None and self.reduction not in REDUCTIONS:
            raise PurelensError(f"ops.reduce: reduction must be one of {REDUCTIONS}.")
        for name, size in self.axes:
            if not (isinstance(name, str) and name.isidentifier() and isinstance(size, int)):
                raise PurelensError(f"ops: axis sizes are name=int, got {name!r}={size!r}.")

    def children(self) -> tuple[Expr, ...]:
        return (self.a,)

    def evaluate(self, value: Tensor, saved: Mapping[str, Any]) -> Any:
        import einops

        x = self.a.evaluate(value, saved)
        check()
        if self.reduction is None:
            return einops.rearrange(x, self.pattern, **dict(self.axes))
        return einops.reduce(x, self.pattern, self.reduction, **dict(self.axes))

    def __repr__(self) -> str:
        return f"ops.einops({self.a!r}, {self.pattern!r}, {self.reduction!r})"


value = Value()


def saved(name: str) -> Expr:
    """A value saved earlier in the same pass, by name."""
    return Saved(name)


def const(x: Tensor | float) -> Expr:
    """A tensor or number as an expression."""
    return Const(x)


def where(mask: Any, a: Any, b: Any) -> Expr:
    """``torch.where(mask, a, b)`` with expressions, tensors or numbers."""
    return Where(_wrap(mask), _wrap(a), _wrap(b))


def unary(op: str, a: Any) -> Expr:
    """An elementwise function by name: one of `UNARY` (``"relu"``, ``"exp"``, ...)."""
    return Unary(op, _wrap(a))


def rearrange(a: Any, pattern: str, **axes: int) -> Expr:
    """``einops.rearrange(a, pattern, **axes)``."""
    return Einops(_wrap(a), pattern, None, tuple(sorted(axes.items())))


def reduce(a: Any, pattern: str, reduction: str, **axes: int) -> Expr:
    """``einops.reduce(a, pattern, reduction, **axes)``; reduction one of `REDUCTIONS`."""
    return Einops(_wrap(a), pattern, reduction, tuple(sorted(axes.items())))


EXPRESSIONS: dict[str, type] = {
    "value": Value,
    "saved": Saved,
    "const": Const,
    "binary": Binary,
    "unary": Unary,
    "index": Index,
    "where": Where,
    "einops": Einops,
}
KIND_OF = {cls: kind for kind, cls in EXPRESSIONS.items()}


def check_size(expr: Expr) -> Expr:
    """`expr`, if it has at most a few hundred nodes (a bound for loaded expressions)."""
    if sum(1 for _ in expr.nodes()) > _MAX_NODES:
        raise PurelensError(f"ops: an expression may have at most {_MAX_NODES} nodes.")
    return expr

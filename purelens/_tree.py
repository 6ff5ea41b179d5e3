"""One decorator that makes a class a pytree node for optree *and* torch.

torch.func only looks at `torch.utils._pytree`; optree (namespace ``"purelens"``)
serves users and tools that tree-map with it. Registering by hand anywhere else
is how the two registries drift apart, so `pytree_node` is the only place that
does it.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import optree
import torch
import torch.utils._pytree as torch_pytree

__all__ = ["NAMESPACE", "hashable", "pytree_node", "static_field", "structure"]

NAMESPACE = "purelens"

_STATIC = "purelens.static"

T = TypeVar("T")


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is static metadata of the node, never a leaf."""
    return dataclasses.field(metadata={_STATIC: True}, **kwargs)


def hashable(value: Any) -> Hashable:
    """A hashable stand-in for a static value (slices and lists are not hashable)."""
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    if isinstance(value, list | tuple):
        return tuple(hashable(v) for v in value)
    return value


class _Unkeyable(Exception):
    pass


def structure(tree: Any, *, functions: bool = False, code: bool = False) -> Hashable | None:
    """What of pytree `tree` is not a leaf (its node types and their metadata), as a
    hashable key for caching what depends on nothing else; None when it cannot be one.

    A key must not keep alive what a function captures, so by default metadata holding
    a callable other than a plain function without closure or defaults (a lambda
    capturing a tensor, a bound method, a `purelens.ops` expression holding constants)
    makes it None, as does unhashable metadata. With ``functions=True`` every callable
    is part of the key as itself (for a cache that may hold them: `pl.compile`'s);
    with ``code=True`` a function is its code object instead and any other callable its
    type (structures that differ in function objects only are then equal).

    Examples:
        >>> import torch, purelens as pl
        >>> a = structure([pl.add("h.0", torch.ones(3)), pl.save("h.1")])
        >>> a == structure([pl.add("h.0", torch.zeros(3)), pl.save("h.1")])
        True
        >>> a == structure([pl.add("h.1", torch.ones(3)), pl.save("h.1")])
        False
    """

    def walk(node: Any) -> Hashable:
        kind = type(node)
        if kind in _LEAVES:
            return "leaf"
        fields = _FIELDS.get(kind)
        if fields is not None:  # a dataclass node: its fields, without optree's machinery
            static = tuple(_frozen(getattr(node, n), functions, code) for n in fields[1])
            return (kind, static, tuple(walk(getattr(node, n)) for n in fields[0]))
        if kind is list or kind is tuple:
            return (kind, None, tuple(walk(item) for item in node))
        if optree.tree_is_leaf(node, namespace=NAMESPACE):
            return "leaf"
        level = optree.tree_flatten_one_level(node, namespace=NAMESPACE)
        meta = _frozen(level.metadata, functions, code)
        return (kind, meta, tuple(walk(c) for c in level.children))

    try:
        key = walk(tree)
        hash(key)
    except (_Unkeyable, TypeError):
        return None
    return key


# Leaves of every pytree (what `structure` need not ask optree about); and the leaf and
# static field names of the dataclass nodes `pytree_node` registered.
_LEAVES = {torch.Tensor, torch.nn.Parameter, float, int, bool, complex}
_FIELDS: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _frozen(meta: Any, functions: bool, code: bool) -> Hashable:
    """`meta` as a hashable value that keeps its containers' kinds apart; raises
    `_Unkeyable` for a callable that may hold what it captures (see `structure`)."""
    if meta is None or type(meta) is str:
        return meta  # type: ignore[no-any-return]
    if isinstance(meta, list | tuple):
        return (type(meta), *(_frozen(item, functions, code) for item in meta))
    if isinstance(meta, dict):
        pairs = (
            (_frozen(k, functions, code), _frozen(v, functions, code)) for k, v in meta.items()
        )
        return (dict, *pairs)
    if isinstance(meta, slice):
        parts = (meta.start, meta.stop, meta.step)
        return (slice, *(_frozen(p, functions, code) for p in parts))
    if isinstance(meta, bool | int | float):  # True == 1 == 1.0, but they are not alike
        return (type(meta), meta)
    if isinstance(meta, type) or not callable(meta):
        return meta  # type: ignore[no-any-return]
    if code:
        return getattr(meta, "__code__", None) or type(meta)  # type: ignore[return-value]
    if functions:
        return meta  # type: ignore[no-any-return]
    if isinstance(meta, types.BuiltinFunctionType):  # t.add is bound to its tensor
        owner = getattr(meta, "__self__", None)
        if owner is None or isinstance(owner, types.ModuleType | type):
            return meta  # type: ignore[no-any-return]
        raise _Unkeyable
    if isinstance(meta, types.FunctionType) and not (
        meta.__closure__ or meta.__defaults__ or meta.__kwdefaults__
    ):
        return meta
    raise _Unkeyable


def _dataclass_flatten(cls: type) -> tuple[Callable, Callable]:
    fields = dataclasses.fields(cls)
    leaf_names = tuple(f.name for f in fields if not f.metadata.get(_STATIC))
    static_names = tuple(f.name for f in fields if f.metadata.get(_STATIC))
    _FIELDS[cls] = (leaf_names, static_names)

    def flatten(node: Any) -> tuple[list[Any], tuple[Any, ...]]:
        children = [getattr(node, n) for n in leaf_names]
        return children, tuple(getattr(node, n) for n in static_names)

    def unflatten(meta: tuple[Any, ...], children: Any) -> Any:
        # Bypass __init__/__post_init__: leaves may be BatchedTensors or other
        # stand-ins that validation must not see again.
        node: Any = object.__new__(cls)
        for name, value in zip(leaf_names, children, strict=True):
            object.__setattr__(node, name, value)
        for name, value in zip(static_names, meta, strict=True):
            object.__setattr__(node, name, value)
        return node

    return flatten, unflatten


def pytree_node(cls: type[T]) -> type[T]:
    """Register `cls` with optree (namespace ``"purelens"``) and torch's pytree.

    A dataclass is flattened into its fields: fields made with `static_field`
    are metadata, the others are children. A class may instead define
    ``_tree_flatten(self) -> (children, metadata)`` and the classmethod
    ``_tree_unflatten(metadata, children)``.
    """
    if hasattr(cls, "_tree_flatten"):
        flatten = cls._tree_flatten  # type: ignore[attr-defined]
        unflatten = cls._tree_unflatten  # type: ignore[attr-defined]
    else:
        flatten, unflatten = _dataclass_flatten(cls)

    optree.register_pytree_node(
        cls,  # type: ignore[arg-type]
        flatten,  # type: ignore[arg-type]
        unflatten,  # type: ignore[arg-type]
        namespace=NAMESPACE,
    )
    torch_pytree.register_pytree_node(
        cls,
        flatten,
        lambda children, meta: unflatten(meta, children),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
    )
    return cls

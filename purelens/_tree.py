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


def structure(tree: Any) -> Hashable | None:
    """What of pytree `tree` is not a leaf (its node types and their metadata), as a
    hashable key for caching what depends on nothing else; None when it cannot be one.

    A key must not keep alive what a function captures, so metadata holding a callable
    other than a plain function without closure or defaults (a lambda capturing a
    tensor, a bound method, a `purelens.ops` expression holding constants) makes it
    None, as does unhashable metadata.

    Example:
        >>> import torch, purelens as pl
        >>> a = structure([pl.add("h.0", torch.ones(3)), pl.save("h.1")])
        >>> a == structure([pl.add("h.0", torch.zeros(3)), pl.save("h.1")])
        True
        >>> a == structure([pl.add("h.1", torch.ones(3)), pl.save("h.1")])
        False
    """

    def walk(node: Any) -> Hashable:
        if optree.tree_is_leaf(node, namespace=NAMESPACE):
            return "leaf"
        level = optree.tree_flatten_one_level(node, namespace=NAMESPACE)
        return (type(node), _frozen(level.metadata), tuple(walk(c) for c in level.children))

    try:
        key = walk(tree)
        hash(key)
    except (_Unkeyable, TypeError):
        return None
    return key


def _frozen(meta: Any) -> Hashable:
    """`meta` as a hashable value that keeps its containers' kinds apart; raises
    `_Unkeyable` for a callable that may hold what it captures (see `structure`)."""
    if isinstance(meta, list | tuple):
        return (type(meta), *(_frozen(item) for item in meta))
    if isinstance(meta, dict):
        return (dict, *((_frozen(k), _frozen(v)) for k, v in meta.items()))
    if isinstance(meta, slice):
        return (slice, _frozen(meta.start), _frozen(meta.stop), _frozen(meta.step))
    if isinstance(meta, bool | int | float):  # True == 1 == 1.0, but they are not alike
        return (type(meta), meta)
    if isinstance(meta, types.FunctionType):
        if meta.__closure__ or meta.__defaults__ or meta.__kwdefaults__:
            raise _Unkeyable
    elif callable(meta) and not isinstance(meta, type | types.BuiltinFunctionType):
        raise _Unkeyable
    return meta  # type: ignore[no-any-return]


def _dataclass_flatten(cls: type) -> tuple[Callable, Callable]:
    fields = dataclasses.fields(cls)
    leaf_names = tuple(f.name for f in fields if not f.metadata.get(_STATIC))
    static_names = tuple(f.name for f in fields if f.metadata.get(_STATIC))

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

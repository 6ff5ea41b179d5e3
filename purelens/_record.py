"""Record: the immutable result of a run."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch.utils._pytree as torch_pytree
from torch import Tensor

from ._errors import MissingSaveError
from ._interventions import describe
from ._tree import pytree_node

__all__ = ["Record"]

_MISSING = (
    "{name!r} was not saved in this run. Saved: {saved}.\n"
    "  Save a value with pl.save(site, name=...); gradients are in rec.grads."
)
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _split(tree: Any, layout: tuple[Any, ...] | None) -> tuple[list[Any], tuple[Any, ...]]:
    """The child leaves of `tree`, and the context that rebuilds it around new ones.

    Leaves that are not tensors (``None``, a HF ``DynamicCache``) stay in the
    context, since `torch.func.vmap` only returns tensors. Which leaves are
    children is decided once, from the real values; a record rebuilt by
    unflatten keeps that `layout`, so that its flatten has the same structure
    whatever its leaves are (torch's vmap rebuilds it with ints).
    """
    leaves, spec = torch_pytree.tree_flatten(tree)
    if layout is None:
        slots = tuple(None if isinstance(leaf, Tensor) else (leaf,) for leaf in leaves)
        layout = (spec, slots)
    return [leaf for leaf, slot in zip(leaves, layout[1], strict=True) if slot is None], layout


def _join(layout: tuple[Any, ...], children: Any) -> Any:
    spec, slots = layout
    it = iter(children)
    return torch_pytree.tree_unflatten([next(it) if s is None else s[0] for s in slots], spec)


_NONE: Mapping[str, Any] = MappingProxyType({})  # no gradients (shared: it is read-only)


@pytree_node
class Record(Mapping[str, Any]):
    """What a run saved and returned: an immutable mapping of saved values.

    Attributes:
        output: what the model returned (None when the pass was stopped).
        grads: saved gradients, by name.
        loss: the loss, when `run` was given one.

    A `Record` is a pytree in optree (namespace ``"purelens"``) and torch's
    registry, so it can be returned from `torch.func.vmap` and `grad`.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3))
        >>> rec = pl.run(model, torch.ones(4, 2), [pl.save("0")])
        >>> rec
        Record({'0': float32[4, 3]}, output=float32[4, 3])
        >>> list(rec), rec["0"].shape
        (['0'], torch.Size([4, 3]))
    """

    __slots__ = ("_layout", "_saved", "grads", "loss", "output")

    _saved: Mapping[str, Any]
    _layout: tuple[Any, ...] | None
    output: Any
    grads: Mapping[str, Any]
    loss: Any

    def __init__(
        self,
        saved: Mapping[str, Any] | None = None,
        output: Any = None,
        grads: Mapping[str, Any] | None = None,
        loss: Any = None,
    ) -> None:
        object.__setattr__(self, "_saved", MappingProxyType(dict(saved or {})))
        object.__setattr__(self, "output", output)
        object.__setattr__(self, "grads", MappingProxyType(dict(grads)) if grads else _NONE)
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "_layout", None)

    @classmethod
    def owning(cls, saved: dict[str, Any], output: Any) -> Record:
        """``Record(saved, output)`` from a dict that nothing else holds or changes (a
        finished pass's): not copied, and made without `__init__`'s checks (about
        1.3 us less per run)."""
        record = object.__new__(cls)
        _SET_SAVED(record, MappingProxyType(saved))
        _SET_OUTPUT(record, output)
        _SET_GRADS(record, _NONE)
        _SET_LOSS(record, None)
        _SET_LAYOUT(record, None)
        return record

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a Record is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"a Record is immutable: cannot delete {name!r}")

    def __getitem__(self, name: str) -> Any:
        try:
            return self._saved[name]
        except KeyError:
            saved = ", ".join(repr(k) for k in self._saved) or "nothing"
            raise MissingSaveError(_MISSING.format(name=name, saved=saved)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._saved)

    def __len__(self) -> int:
        return len(self._saved)

    def __repr__(self) -> str:
        def show(mapping: Mapping[str, Any]) -> str:
            return "{" + ", ".join(f"{k!r}: {_describe_tree(v)}" for k, v in mapping.items()) + "}"

        # The saved values come first and unnamed: a Record *is* the mapping of them.
        parts = [show(self._saved), f"output={_describe_tree(self.output)}"]
        if self.grads:
            parts.append(f"grads={show(self.grads)}")
        if self.loss is not None:
            parts.append(f"loss={_describe_tree(self.loss)}")
        return f"Record({', '.join(parts)})"

    # Records hold tensors, whose == is elementwise: compare records by identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __reduce__(self) -> Any:
        return (Record, (dict(self._saved), self.output, dict(self.grads), self.loss))

    # Pytree protocol (see _tree.pytree_node). The children are the saved
    # values, the output, the gradients and the loss, each split into tensors.
    def _tree_flatten(self) -> tuple[list[Any], tuple[Any, ...]]:
        parts = (dict(self._saved), self.output, dict(self.grads), self.loss)
        return _split(parts, self._layout)

    @classmethod
    def _tree_unflatten(cls, layout: tuple[Any, ...], children: Any) -> Record:
        saved, output, grads, loss = _join(layout, children)
        record = cls(saved, output, grads, loss)
        object.__setattr__(record, "_layout", layout)
        return record


# The slots' own setters (a Record's __setattr__ refuses): `Record.owning` uses them.
_SET_SAVED, _SET_OUTPUT, _SET_GRADS, _SET_LOSS, _SET_LAYOUT = (
    Record.__dict__[name].__set__ for name in ("_saved", "output", "grads", "loss", "_layout")
)


def _describe_tree(value: Any) -> str:
    if value is None or isinstance(value, Tensor):
        return describe(value)
    if isinstance(value, tuple | list) and all(isinstance(v, Tensor) for v in value):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    if isinstance(value, Mapping):
        fields = ", ".join(f"{k}={_describe_tree(v)}" for k, v in value.items() if v is not None)
        return f"{type(value).__name__}({fields})"
    return type(value).__name__

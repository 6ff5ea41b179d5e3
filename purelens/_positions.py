"""Token positions that stay right under padding, and `at` to use them.

With a padded batch, "the last token" is at a different index in every row,
and left padding moves "token 0" too. These helpers read the attention mask
(`pl.tokenize` gives the same one `run` uses) and return one index per row;
`pl.at` turns such indices into a function for `pl.save` or `pl.patch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ._errors import PurelensError
from ._interventions import describe, takes_saved
from ._layout import MODULE
from ._layout import current as current_layout
from ._layout import reset as reset_layout
from ._layout import use as use_layout
from ._padding import aligned

__all__ = ["at", "last_token", "token_index"]

_OUT_OF_RANGE = (
    "token {i} does not exist in row {row}, which has {count} real tokens.\n"
    "  Count from the start (0, 1, ...) or from the end (-1 is the last real token)."
)
_AT_OUT_OF_RANGE = (
    "pl.at({i}): position {i} does not exist in a value with {length} positions "
    "(shape {shape}).\n"
    "  Positions count from 0, or from the end with -1 (the last)."
)
_AT_PADDING = (
    "pl.at({i}) reads position {i} of every row, but in this batch (padded on the {side}) "
    "position {i} of row {row} is padding, so its value is not a token's.\n"
    "  Count real tokens per row instead: pl.at(pl.token_index(mask, {i})) with the mask "
    "of pl.tokenize(tokenizer, texts){advice}."
)
_AT_ROW_OUT_OF_RANGE = (
    "pl.at: position {i} of row {row} does not exist in a value with {length} positions "
    "(shape {shape}).\n"
    "  Positions count from 0, or from the end with -1 (the last)."
)
_AT_ROW_PADDING = (
    "pl.at: position {i} of row {row} is padding in this batch, so its value is not a "
    "token's.\n  Positions from pl.token_index(mask, i) or pl.last_token(mask) are real "
    "tokens; compute them from the mask of this batch (pl.tokenize)."
)
_BAD_INDEX = (
    "`index` of pl.at must be an int or a tensor of integer positions (one per row), "
    "got {index!r}.\n  E.g. pl.at(-1) or pl.at(pl.last_token(mask))."
)
_AT_RESULT = (
    "the function of pl.at returned {got}, but the entries it replaces are {want} (one per "
    "row): it must keep their shape, and their dtype (or one that casts without loss)."
)
_ROWS_MISMATCH = (
    "pl.at: {n} positions for a value with {rows} rows.\n"
    "  Give one position per row of the value at the site (with batch=, per selected row)."
)


def _check_not_padding(i: int, value: Tensor) -> None:
    real = aligned(value)
    if real is None:
        return
    pads = (~real[:, i]).nonzero()
    if len(pads):
        side = "left" if bool((~real[:, 0]).any()) else "right"
        advice = ", or pl.at(-1) with left padding" if side == "right" and i < 0 else ""
        raise PurelensError(_AT_PADDING.format(i=i, row=int(pads[0, 0]), side=side, advice=advice))


def _wrapped(t: Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _check_mask(attention_mask: Tensor) -> Tensor:
    if not isinstance(attention_mask, Tensor) or attention_mask.ndim != 2:
        raise PurelensError(
            f"`attention_mask` must be a 2-D tensor (batch, positions), got {attention_mask!r}."
        )
    return attention_mask != 0


def token_index(attention_mask: Tensor, i: int) -> Tensor:
    """The index of real token `i` in each row (negative counts from the end).

    Examples:
        >>> import torch, purelens as pl
        >>> mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding
        >>> pl.token_index(mask, 0), pl.token_index(mask, -1)
        (tensor([2, 0]), tensor([4, 4]))
    """
    real = _check_mask(attention_mask)
    counts = real.sum(-1)
    k = torch.full_like(counts, i) if i >= 0 else counts + i
    bad = ((k < 0) | (k >= counts)).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        raise PurelensError(_OUT_OF_RANGE.format(i=i, row=row, count=int(counts[row])))
    hit = (real.long().cumsum(-1) == (k + 1)[:, None]) & real
    return hit.long().argmax(-1)


def last_token(attention_mask: Tensor) -> Tensor:
    """The index of the last real token in each row, for left or right padding.

    Examples:
        >>> import torch, purelens as pl
        >>> pl.last_token(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))  # right padding
        tensor([1, 3])
    """
    return token_index(attention_mask, -1)


@dataclasses.dataclass(frozen=True, eq=False)
class at:
    """Act at one position per row: a function for `pl.save` or `pl.patch`.

    ``pl.save(site, pl.at(index))`` keeps ``value[row, index[row]]`` for each
    row (shape ``(batch, ...)``); ``pl.patch(site, pl.at(index, fn))``
    replaces those entries with ``fn(entries)`` (or ``fn(entries, saved)``)
    and leaves every other position alone. Positions are dimension 1, but on
    an attention's scores and pattern ``(batch, heads, q_pos, k_pos)`` the
    query dimension 2 (entries ``(batch, heads, k_pos)``).

    Args:
        index: one position per row (e.g. `pl.last_token(mask)`), or an int
            for the same position in every row.
        fn: for patches, applied to the ``(batch, ...)`` entries.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Identity())
        >>> x = torch.arange(12.0).view(2, 3, 2)
        >>> pl.run(model, x, [pl.save("0", pl.at(torch.tensor([2, 0])))])["0"]
        tensor([[4., 5.],
                [6., 7.]])
        >>> pl.run(model, x, [pl.patch("0", pl.at(-1, torch.zeros_like))]).output[0]
        tensor([[0., 1.],
                [2., 3.],
                [0., 0.]])
    """

    index: Tensor | int
    fn: Callable[..., Tensor] | None = None

    def _rows_and_index(self, value: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.arange(value.shape[0], device=value.device)
        if isinstance(self.index, int):
            length = value.shape[1] if value.ndim >= 2 else 0
            if not -length <= self.index < length:
                raise PurelensError(
                    _AT_OUT_OF_RANGE.format(i=self.index, length=length, shape=list(value.shape))
                )
            _check_not_padding(self.index, value)
            return rows, torch.full_like(rows, self.index % length)
        index = self.index.to(value.device)
        if index.shape != rows.shape:
            raise PurelensError(_ROWS_MISMATCH.format(n=list(index.shape), rows=value.shape[0]))
        length = value.shape[1] if value.ndim >= 2 else 0
        if not _wrapped(index) and not isinstance(value, FakeTensor):
            outside = ((index < -length) | (index >= length)).nonzero()
            if len(outside):
                row = int(outside[0, 0])
                i = int(index[row])
                raise PurelensError(
                    _AT_ROW_OUT_OF_RANGE.format(
                        i=i, row=row, length=length, shape=list(value.shape)
                    )
                )
            real = aligned(value)
            if real is not None:
                pads = (~real[rows, index]).nonzero()
                if len(pads):
                    row = int(pads[0, 0])
                    raise PurelensError(_AT_ROW_PADDING.format(i=int(index[row]), row=row))
        return rows, index

    def __post_init__(self) -> None:
        index = self.index
        integer = isinstance(index, int) and not isinstance(index, bool)
        tensor = isinstance(index, Tensor) and not (index.is_floating_point() or index.is_complex())
        if not (integer or tensor) or (isinstance(index, Tensor) and index.dtype == torch.bool):
            raise PurelensError(_BAD_INDEX.format(index=index))
        if self.fn is not None and not callable(self.fn):
            raise PurelensError(f"`fn` of pl.at must be callable or None, got {self.fn!r}.")

    def __eq__(self, other: object) -> bool:
        # By value, so that interventions rebuilt by pl.loads (or written twice) are equal.
        if not isinstance(other, at):
            return NotImplemented
        a, b = self.index, other.index
        if self.fn is not other.fn or isinstance(a, Tensor) != isinstance(b, Tensor):
            return False
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            return a.dtype == b.dtype and bool(torch.equal(a, b))
        return bool(a == b)

    def __hash__(self) -> int:
        index = tuple(self.index.shape) if isinstance(self.index, Tensor) else self.index
        return hash((at, id(self.fn), index))

    @property
    def takes_saved(self) -> bool:
        """Whether `fn` wants the saved mapping (then a patch passes it on)."""
        return self.fn is not None and takes_saved(self.fn)

    def __call__(self, value: Tensor, saved: Mapping[str, Any] | None = None) -> Tensor:
        pos = current_layout().pos
        if pos == 1 or value.ndim <= pos:
            return self._at(value, saved)
        # Positions elsewhere (the query dimension of an attention pattern): move them to 1.
        token = use_layout(MODULE)
        try:
            result = self._at(value.movedim(pos, 1), saved)
        finally:
            reset_layout(token)
        return result if self.fn is None else result.movedim(1, pos)

    def _at(self, value: Tensor, saved: Mapping[str, Any] | None) -> Tensor:
        rows, index = self._rows_and_index(value)
        entries = value[rows, index]
        if self.fn is None:
            return entries
        new = self.fn(entries, saved) if takes_saved(self.fn) else self.fn(entries)
        if not isinstance(new, Tensor) or new.shape != entries.shape:
            got = describe(new) if isinstance(new, Tensor) else repr(new)[:80]
            raise PurelensError(_AT_RESULT.format(got=got, want=describe(entries)))
        if new.dtype != entries.dtype and not torch.can_cast(new.dtype, entries.dtype):
            raise PurelensError(_AT_RESULT.format(got=describe(new), want=describe(entries)))
        return value.index_put((rows, index), new.to(value.dtype))

"""`head`: select attention heads on an attention port, for `pl.save` and `pl.patch`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._errors import PurelensError
from ._interventions import describe, takes_saved
from ._layout import current as current_layout
from ._layout import reset as reset_layout
from ._layout import use as use_layout
from ._select import is_int

__all__ = ["head"]

_BAD_HEAD = (
    "`h` of pl.head must be a head (an int) or a non-empty list of distinct heads, got {h!r}.\n"
    "  E.g. pl.head(0) or pl.head([0, 3])."
)
_NO_HEADS = (
    "pl.head({h!r}) selects heads, but the value at this site ({got}) has no heads "
    "dimension: heads are on the attention ports.\n"
    "  Use it on ':q', ':k', ':v', ':z' (batch, pos, heads, d_head) or ':scores', "
    "':pattern' (batch, heads, q_pos, k_pos), e.g. pl.save('h.0.attn:pattern', pl.head(0))."
)
_OUT_OF_RANGE = (
    "pl.head({h!r}): head {bad} does not exist in a value with {n} heads ({got}{kv}).\n"
    "  Heads count from 0 (negative from the end)."
)
_RESULT = (
    "the function of pl.head({h!r}) returned {got}, but the heads it replaces are {want}: "
    "it must keep their shape and dtype."
)


@dataclasses.dataclass(frozen=True, eq=False)
class head:
    """Act on one attention head (or a list of heads): a function for `pl.save` or `pl.patch`.

    On an attention port, ``pl.save(site, pl.head(h))`` keeps head `h` (an int
    drops the heads dimension, a list keeps it, in list order), and
    ``pl.patch(site, pl.head(h, fn))`` replaces those heads with ``fn`` of
    them (or ``fn(heads, saved)``) and leaves the other heads alone. On
    ``:k`` and ``:v`` the heads are the model's key/value heads.

    Args:
        h: a head, or a list of distinct heads (negative from the end).
        fn: for patches, applied to the selected heads.

    Examples:
        >>> import torch, purelens as pl
        >>> model, tokenizer = pl.models.load_default()
        >>> prompt = "the home of"  # <bos> and 3 words
        >>> rec = pl.run(model, prompt, [pl.save("h.1.attn:pattern", pl.head(0))],
        ...              tokenizer=tokenizer)
        >>> rec["h.1.attn:pattern"].shape  # (batch, q_pos, k_pos)
        torch.Size([1, 4, 4])
        >>> zeroed = pl.patch("h.1.attn:z", pl.head(0, torch.zeros_like))  # head (1, 0) off
        >>> pl.run(model, prompt, [zeroed], tokenizer=tokenizer).output.logits.shape
        torch.Size([1, 4, 344])
    """

    h: int | tuple[int, ...]
    fn: Callable[..., Tensor] | None = None

    def __post_init__(self) -> None:
        h = self.h
        if isinstance(h, list | range):
            h = tuple(h)
            object.__setattr__(self, "h", h)
        many = isinstance(h, tuple) and bool(h) and all(is_int(i) for i in h)
        if not (is_int(h) or many) or (many and len(set(h)) != len(h)):  # type: ignore[arg-type]
            raise PurelensError(_BAD_HEAD.format(h=self.h))
        if self.fn is not None and not callable(self.fn):
            raise PurelensError(f"`fn` of pl.head must be callable or None, got {self.fn!r}.")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, head):
            return NotImplemented
        return self.h == other.h and (self.fn is other.fn or self.fn == other.fn)

    def __hash__(self) -> int:
        return hash((head, self.h, id(self.fn)))

    @property
    def takes_saved(self) -> bool:
        """Whether `fn` wants the saved mapping (then a patch passes it on)."""
        return self.fn is not None and takes_saved(self.fn)

    def __call__(self, value: Tensor, saved: Mapping[str, Any] | None = None) -> Tensor:
        layout = current_layout()
        if layout.heads is None or value.ndim <= layout.heads:
            raise PurelensError(_NO_HEADS.format(h=self.h, got=describe(value)))
        dim, n = layout.heads, value.shape[layout.heads]
        wanted = (self.h,) if isinstance(self.h, int) else self.h
        for i in wanted:
            if not -n <= i < n:
                kv = ", the key/value heads" if n and layout.pos == 1 else ""
                raise PurelensError(
                    _OUT_OF_RANGE.format(h=self.h, bad=i, n=n, got=describe(value), kv=kv)
                )
        index = torch.tensor([i % n for i in wanted], device=value.device)
        if isinstance(self.h, int):
            selected, inner = value.select(dim, self.h % n), layout.without_heads()
        else:
            selected, inner = value.index_select(dim, index), layout
        if self.fn is None:
            return selected
        token = use_layout(inner)
        try:
            new = self.fn(selected, saved) if takes_saved(self.fn) else self.fn(selected)
        finally:
            reset_layout(token)
        if not isinstance(new, Tensor) or new.shape != selected.shape:
            got = describe(new) if isinstance(new, Tensor) else repr(new)[:80]
            raise PurelensError(_RESULT.format(h=self.h, got=got, want=describe(selected)))
        if new.dtype != selected.dtype:
            if not torch.can_cast(new.dtype, selected.dtype):
                raise PurelensError(
                    _RESULT.format(h=self.h, got=describe(new), want=describe(selected))
                )
            new = new.to(selected.dtype)
        if isinstance(self.h, int):
            new = new.unsqueeze(dim)
        return value.index_copy(dim, index, new)

"""Where batch, position and heads are in the value at the current site.

Module ports hold ``(batch, pos, ...)``. Attention ports hold per-head
values: q, k, v and z are ``(batch, pos, heads, d_head)``, scores and
pattern ``(batch, heads, q_pos, k_pos)``. While an intervention runs on a
value, the pass makes its layout current, so that `pl.at` indexes the
position, `pl.head` the heads and a mean ablation averages over batch and
position only, whatever the port.
"""

from __future__ import annotations

import contextvars
from typing import NamedTuple

import torch

__all__ = ["MODULE", "Layout", "current", "layout_of", "reset", "use"]


class Layout(NamedTuple):
    """The dimension of positions, and of heads (None: the value has no heads dimension)."""

    pos: int
    heads: int | None

    def without_heads(self) -> Layout:
        """The layout once one head is selected (its dimension dropped)."""
        if self.heads is None:
            return self
        pos = self.pos - 1 if self.pos > self.heads else self.pos
        return Layout(pos, None)


MODULE = Layout(1, None)
_PER_HEAD = Layout(1, 2)
_SCORES = Layout(2, 1)
_OF_PORT = {"q": _PER_HEAD, "k": _PER_HEAD, "v": _PER_HEAD, "z": _PER_HEAD}
_OF_PORT.update(scores=_SCORES, pattern=_SCORES)

_CURRENT: contextvars.ContextVar[Layout] = contextvars.ContextVar("purelens_layout", default=MODULE)


def layout_of(port: str) -> Layout:
    """The layout of the values at `port`."""
    return _OF_PORT.get(port, MODULE)


# Whether any layout but MODULE was ever made current: until then code that dynamo traces
# (`pl.compile`'s clones, an edited model compiled) need not read the context variable,
# which dynamo cannot trace (it guards on this flag instead).
_ever_used = False


def current() -> Layout:
    """The current site's layout."""
    if not _ever_used and torch.compiler.is_compiling():
        return MODULE
    return _CURRENT.get()


def use(layout: Layout) -> contextvars.Token[Layout]:
    global _ever_used
    if layout is not MODULE:
        _ever_used = True
    return _CURRENT.set(layout)


def reset(token: contextvars.Token[Layout]) -> None:
    _CURRENT.reset(token)

"""Which tokens of the current pass's batch are padding, for interventions that must know.

A pass that runs on a padded batch of token rows (text with ``tokenizer=``,
or ``input_ids`` with a 2-D ``attention_mask``) makes its real-token mask
current while its interventions run (see `_pass`): `pl.at` then refuses a
fixed position that is padding in some row, and a mean ablation averages
over real tokens only. With ``batch=``, the mask is narrowed to the selected
rows. A value with k times the mask's rows (HF generation expands each
prompt into beams or return sequences, row after row) lines up with the
mask repeated k times per row.
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch
from torch import Tensor

from ._layout import current
from ._select import Rows, row_indices

__all__ = ["aligned", "real_tokens", "reset_padding", "set_padding"]

_PADDING: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar(
    "purelens_padding", default=None
)
# Whether a mask was ever made current: until then code that dynamo traces (`pl.compile`'s
# clones, an edited model compiled) need not read the context variable, which dynamo
# cannot trace (it guards on this flag instead).
_ever_set = False


def real_tokens(attention_mask: Any) -> Tensor | None:
    """Which tokens of a batch are real (not padding), from its 2-D attention mask.

    None when there is no such mask, or under `torch.func` transforms (where a
    batched mask is not the batch's). Nothing is read from the mask here, so
    that a run that does not need it never waits for the device.
    """
    if isinstance(attention_mask, Tensor) and attention_mask.ndim == 2:
        if not torch._C._functorch.is_functorch_wrapped_tensor(attention_mask):
            return attention_mask != 0
    return None


def set_padding(
    real: Tensor | None, rows: Rows = None, size: int | None = None
) -> contextvars.Token[Tensor | None]:
    """Make `real` current: lined up with a value of `size` rows, then narrowed to `rows`.

    Returns the token for `reset_padding`.
    """
    if real is not None and rows is not None and size is not None:
        real = _expanded(real, size)
        try:
            real = None if real is None else real[row_indices(rows, real.shape[0], "the batch")]
        except Exception:  # rows the value does not have: the writer says so, not this
            real = None
    global _ever_set
    if real is not None:
        _ever_set = True
    return _PADDING.set(real)


def _expanded(real: Tensor, rows: int) -> Tensor | None:
    """`real` for a value of `rows` rows: itself, or each row repeated (beams), or None."""
    if rows == real.shape[0]:
        return real
    if real.shape[0] and rows % real.shape[0] == 0:
        return real.repeat_interleave(rows // real.shape[0], dim=0)
    return None


def reset_padding(token: contextvars.Token[Tensor | None]) -> None:
    _PADDING.reset(token)


def aligned(value: Tensor, pos: int | None = None) -> Tensor | None:
    """The current real-token mask, lined up with `value`'s batch (dimension 0) and positions.

    Positions are dimension `pos`, by default the current site's (see `_layout`).
    """
    if not _ever_set and torch.compiler.is_compiling():
        return None  # no mask was ever current (see `_ever_set`)
    real = _PADDING.get()
    if pos is None:
        pos = current().pos
    if real is None or value.ndim <= pos or value.shape[pos] != real.shape[1]:
        return None
    return _expanded(real, value.shape[0])

"""Turn `run`'s `inputs` into the arguments of one model call; tokenize text.

Text and token-id lists become a padded batch with an attention mask. The
user's tokenizer is never changed: when it has no pad token, the batch is
padded here with its end-of-sequence token (masked out anyway).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._errors import PurelensError
from ._padding import real_tokens

__all__ = [
    "call_arguments",
    "is_text",
    "pad_id",
    "padding_of",
    "position_ids",
    "tokenize",
]

Side = Literal["left", "right"]

_NEEDS_TOKENIZER = (
    "`inputs` is text ({value!r}), so it needs `tokenizer=` to become token ids.\n"
    "  Pass the model's tokenizer: pl.run(model, text, ivs, tokenizer=tokenizer)."
)
_RAGGED_IDS = (
    "`inputs` holds token-id rows of different lengths ({lengths}); padding them "
    "needs `tokenizer=` (for its pad token), or pad them yourself and pass a dict "
    "with `input_ids` and `attention_mask`."
)
_BAD_INPUTS = (
    "`inputs` must be a tensor (the first positional argument), a tuple (positional "
    "arguments), a dict (keyword arguments), text or token-id lists; got {kind}."
)
_BAD_SIDE = "`padding_side` must be 'left' or 'right', got {side!r}."


def is_text(inputs: Any) -> bool:
    """A string or a non-empty list of strings."""
    return isinstance(inputs, str) or (
        isinstance(inputs, list) and bool(inputs) and all(isinstance(s, str) for s in inputs)
    )


def _is_ids(inputs: Any) -> bool:
    def row(r: Any) -> bool:
        return isinstance(r, list) and all(isinstance(i, int) for i in r)

    return (
        isinstance(inputs, list) and bool(inputs) and (row(inputs) or all(row(r) for r in inputs))
    )


def call_arguments(
    inputs: Any,
    tokenizer: Any,
    model_kwargs: Mapping[str, Any],
    model: nn.Module | None = None,
    padding_side: Side | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` that call the model on `inputs`.

    Text and token-id lists are padded (on `padding_side`, else the
    tokenizer's); when the padding is on the left and `model` takes
    ``position_ids``, they are added so that every row sees the positions it
    would see alone.
    """
    if isinstance(inputs, Tensor):
        return (inputs,), dict(model_kwargs)
    if isinstance(inputs, tuple):
        return inputs, dict(model_kwargs)
    if isinstance(inputs, Mapping):
        return (), {**inputs, **model_kwargs}
    if is_text(inputs) or _is_ids(inputs):
        if tokenizer is None and is_text(inputs):
            raise PurelensError(_NEEDS_TOKENIZER.format(value=inputs))
        batch = tokenize(tokenizer, inputs, padding_side=padding_side)
        if (
            model is not None
            and "position_ids" not in model_kwargs
            and _accepts_position_ids(model)
        ):
            mask = batch["attention_mask"]
            if bool((mask[:, 0] == 0).any()):  # left padding shifts the positions
                batch["position_ids"] = position_ids(mask)
        return (), {**batch, **model_kwargs}
    raise PurelensError(_BAD_INPUTS.format(kind=type(inputs).__name__))


def tokenize(
    tokenizer: Any,
    inputs: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    *,
    padding_side: Side | None = None,
) -> dict[str, Tensor]:
    """A padded batch (``input_ids``, ``attention_mask``, ...) of text or token ids.

    This is what `run` and `generate` feed the model for text, so that
    positions can be computed from the same attention mask beforehand. The
    tokenizer is never changed; with no pad token, rows are padded with its
    end-of-sequence token (masked out).

    Args:
        tokenizer: a HF tokenizer (may be None for equal-length token-id rows).
        inputs: a string, a list of strings, or token-id rows.
        padding_side: ``"left"`` or ``"right"``; default the tokenizer's.

    Examples:
        >>> import purelens as pl
        >>> pl.tokenize(None, [[5, 6, 7], [8, 9, 10]])["attention_mask"]
        tensor([[1, 1, 1],
                [1, 1, 1]])
    """
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise PurelensError(_BAD_SIDE.format(side=side))
    items: list[Any]
    if isinstance(inputs, str):
        items = [inputs]
    elif inputs and all(isinstance(i, int) for i in inputs):
        items = [list(inputs)]
    else:
        items = list(inputs)
    if all(isinstance(r, str) for r in items):
        rows = [dict(tokenizer(text)) for text in items]
    else:
        rows = [{"input_ids": list(r)} for r in items]
    lengths = [len(r["input_ids"]) for r in rows]
    if tokenizer is None and len(set(lengths)) > 1:
        raise PurelensError(_RAGGED_IDS.format(lengths=lengths))
    width = max(lengths)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
    keys = [k for k in rows[0] if k not in batch and isinstance(rows[0][k], list)]
    for key in keys:
        batch[key] = []
    for row, n in zip(rows, lengths, strict=True):
        row["attention_mask"] = [1] * n
        fills = {"input_ids": pad_id(tokenizer)}
        for key in batch:
            fill = [fills.get(key, 0)] * (width - n)
            values = list(row[key])
            batch[key].append(fill + values if side == "left" else values + fill)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only (pads get 1), as HF ``generate`` does."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@functools.lru_cache(maxsize=256)
def _forward_takes(cls: Any, name: str) -> bool | None:
    """Whether `cls.forward` names `name`: True, False, or None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
    if name in params:
        return True
    return None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else False


def _accepts_position_ids(model: nn.Module) -> bool:
    """Whether the model takes ``position_ids``, seen through wrappers that pass ``**kwargs`` on.

    PEFT's models (``get_base_model()``) and data-parallel wrappers (``.module``)
    take ``**kwargs`` and hand them to the model inside.
    """
    for _ in range(8):
        cls: Any = type(model)
        takes = _forward_takes(cls, "position_ids")
        if takes is not None:
            return takes
        inner = _inner(model)
        if inner is None:
            return False
        model = inner
    return False


def _inner(model: nn.Module) -> nn.Module | None:
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
        return inner if isinstance(inner, nn.Module) and inner is not model else None
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        return model.module
    return None


def padding_of(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    """The attention mask of a batch of token rows (for `pl.at` to see padding), if there is one.

    Only a 2-D mask that lines up with the input ids or embeddings counts.
    """
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        return None
    tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if tokens is None and args:
        tokens = args[0]
    if not isinstance(tokens, Tensor) or tuple(tokens.shape[:2]) != tuple(mask.shape):
        return None
    return real_tokens(mask)

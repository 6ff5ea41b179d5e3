"""Turn `run`'s `inputs` into the positional and keyword arguments of one model call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._errors import PurelensError

__all__ = ["call_arguments"]

_NEEDS_TOKENIZER = (
    "`inputs` is text ({value!r}), so `run` needs `tokenizer=` to turn it into token ids.\n"
    "  Pass the model's tokenizer: pl.run(model, text, ivs, tokenizer=tokenizer)."
)
_BAD_INPUTS = (
    "`inputs` must be a tensor (the first positional argument), a tuple (positional "
    "arguments), a dict (keyword arguments), or text with `tokenizer=`; got {kind}."
)


def _is_text(inputs: Any) -> bool:
    return isinstance(inputs, str) or (
        isinstance(inputs, list) and bool(inputs) and all(isinstance(s, str) for s in inputs)
    )


def call_arguments(
    inputs: Any, tokenizer: Any, model_kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` that call the model on `inputs`."""
    if isinstance(inputs, Tensor):
        return (inputs,), dict(model_kwargs)
    if isinstance(inputs, tuple):
        return inputs, dict(model_kwargs)
    if isinstance(inputs, Mapping):
        return (), {**inputs, **model_kwargs}
    if _is_text(inputs):
        if tokenizer is None:
            raise PurelensError(_NEEDS_TOKENIZER.format(value=inputs))
        return (), {**_tokenize(tokenizer, inputs), **model_kwargs}
    raise PurelensError(_BAD_INPUTS.format(kind=type(inputs).__name__))


def _tokenize(tokenizer: Any, text: str | list[str]) -> dict[str, Tensor]:
    batch = [text] if isinstance(text, str) else text
    if getattr(tokenizer, "pad_token_id", None) is not None:
        encoded = tokenizer(batch, return_tensors="pt", padding=True)
        return {k: v for k, v in encoded.items() if isinstance(v, Tensor)}
    # No pad token: pad here with eos (masked out anyway), rather than setting a
    # pad token on the user's tokenizer.
    rows = [list(tokenizer(t)["input_ids"]) for t in batch]
    pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    width = max(len(r) for r in rows)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    ids, mask = [], []
    for r in rows:
        fill = width - len(r)
        ids.append([pad_id] * fill + r if left else r + [pad_id] * fill)
        mask.append([0] * fill + [1] * len(r) if left else [1] * len(r) + [0] * fill)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

"""What one request may ask of `purelens serve`: limits, keyword arguments, wall time.

A request over a limit gets a `LimitError` (413, or 408 for time) that names
the limit; keyword arguments that are not allow-listed data, or values that
are not what a limit needs, get a `BadRequest` (400). The wall-time deadline
is per thread: `check_deadline` is called at every decoded value and before
every module call of the served model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from ._errors import PurelensError
from ._inputs import is_text

__all__ = [
    "GENERATE_KWARGS",
    "RUN_KWARGS",
    "BadRequest",
    "LimitError",
    "Limits",
    "Timeout",
    "check_deadline",
    "check_generate",
    "check_kwargs",
    "check_tokens",
    "count_tokens",
    "deadline",
    "over",
    "time_left",
]

# Keyword arguments a remote run may pass to the model's forward: data only. Not
# `params` (it would swap the served weights for every request running beside it),
# not `tokenizer`, `loss` or `validate` (fields of the request), not caches or objects.
RUN_KWARGS = frozenset(
    {
        "input_ids",
        "inputs_embeds",
        "attention_mask",
        "position_ids",
        "token_type_ids",
        "head_mask",
        "labels",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "decoder_input_ids",
        "decoder_attention_mask",
        "decoder_inputs_embeds",
        "pixel_values",
    }
)
_NOT_ALLOWED = (
    "`kwargs`: a remote {kind} does not take {names}; allowed keyword arguments: {allowed}.\n"
    "  Weights, tokenizers and other objects stay on the server; send data only."
)
# Keyword arguments a remote generate may pass to HF `generate` (data, no objects).
GENERATE_KWARGS = frozenset(
    {
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "num_beams",
        "num_return_sequences",
        "eos_token_id",
        "pad_token_id",
        "min_new_tokens",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "length_penalty",
        "early_stopping",
        "use_cache",
        "attention_mask",
    }
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    Attributes:
        input_tokens: positions in the batch (rows x longest row, after
            tokenizing; x beams for generation), the largest count over the
            inputs and every keyword argument (``input_ids``, and
            ``inputs_embeds`` counted as numel // its last dim).
        new_tokens: ``max_new_tokens`` of a generation.
        saved_bytes: bytes of tensors in the returned record (output included).
        seconds: wall time of the request's own work: reading it (checked at
            every decoded value) and running the model (checked at every
            module call), not the wait for a free slot.
        request_bytes: size of the request body.
        elements: elements of any result inside a `purelens.ops` expression.
    """

    input_tokens: int = 8192
    new_tokens: int = 256
    saved_bytes: int = 256 * 2**20
    seconds: float = 60.0
    request_bytes: int = 64 * 2**20
    elements: int = 2**26


class LimitError(PurelensError):
    """A request over one of the server's `Limits`."""

    def __init__(self, limit: str, message: str, status: int = 413) -> None:
        super().__init__(message)
        self.limit = limit
        self.status = status


class BadRequest(PurelensError):
    """The request is not one the server can read (400)."""


def over(limit: str, value: float, limits: Limits) -> str:
    """The message for `value` over the limit named `limit`."""
    allowed = getattr(limits, limit)
    return f"{value} is over this server's limit {limit}={allowed}"


def check_tokens(tokens: int, limits: Limits) -> None:
    """Raise a `LimitError` if `tokens` is over ``limits.input_tokens``."""
    if tokens > limits.input_tokens:
        raise LimitError("input_tokens", over("input_tokens", tokens, limits) + " (token ids)")


def check_kwargs(kind: str, kwargs: dict[str, Any], also: frozenset[str] = frozenset()) -> None:
    """Raise a `BadRequest` naming any keyword argument of a `kind` call not allow-listed
    (or among `also`, what the served engine takes besides)."""
    allowed = (RUN_KWARGS if kind == "run" else GENERATE_KWARGS) | also
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        raise BadRequest(_NOT_ALLOWED.format(kind=kind, names=names, allowed=sorted(allowed)))


def check_generate(kwargs: dict[str, Any], new: Any, tokens: int, limits: Limits) -> None:
    """Check a generation's max_new_tokens (`new`), beams and tokens against `limits`."""
    if not isinstance(new, int) or isinstance(new, bool) or new < 1:
        raise BadRequest(f"generate needs max_new_tokens, a positive int; got {new!r}")
    if new > limits.new_tokens:
        raise LimitError("new_tokens", over("new_tokens", new, limits) + " (max_new_tokens)")
    beams = max(_positive(kwargs, "num_beams"), _positive(kwargs, "num_return_sequences"))
    check_tokens(tokens * beams, limits)


def _positive(kwargs: dict[str, Any], key: str) -> int:
    value = kwargs.get(key, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"{key} must be a positive int, got {value!r}")
    return value


def count_tokens(tokenizer: Any, limits: Limits, inputs: Any, kwargs: dict[str, Any]) -> int:
    """Positions in the batch the model will see, over the inputs and the keyword arguments.

    Ids can come as the inputs or as a keyword argument (``input_ids``,
    ``inputs_embeds``, ...): the count is the largest of any of them.
    """
    from ._inputs import tokenize

    counts = [_positions(value) for value in kwargs.values()]
    if is_text(inputs):
        if isinstance(inputs, list) and len(inputs) > limits.input_tokens:
            raise LimitError("input_tokens", over("input_tokens", len(inputs), limits))
        counts.append(int(tokenize(tokenizer, inputs)["input_ids"].numel()))
    else:
        counts.append(_positions(inputs))
    return max(counts)


def _positions(value: Any) -> int:
    """The largest number of positions in `value`: ids, masks, embeddings, id lists."""
    import torch.utils._pytree as torch_pytree

    leaves = torch_pytree.tree_leaves(value)
    sizes = [
        # Embeddings and other floats have one vector per position, in their last dim.
        t.numel() // t.shape[-1]
        if t.is_floating_point() and t.ndim > 1 and t.shape[-1]
        else t.numel()
        for t in leaves
        if isinstance(t, Tensor)
    ]
    ids = sum(1 for i in leaves if isinstance(i, int) and not isinstance(i, bool))  # id lists
    return max([*sizes, ids], default=0)


# Wall time ----------------------------------------------------------------------

_clock = threading.local()


class Timeout(Exception):
    """Raised inside the model (or the decoder) when a request's deadline has passed.

    Not a PurelensError, so that no handler of those takes it for the request's fault.
    """


def time_left() -> float | None:
    """The seconds this thread's request has left (`deadline`), or None without one."""
    deadline = getattr(_clock, "deadline", None)
    return None if deadline is None else deadline - time.monotonic()


def check_deadline() -> None:
    deadline = getattr(_clock, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise Timeout


@contextlib.contextmanager
def deadline(limits: Limits, seconds: float, what: str) -> Iterator[None]:
    """Raise `Timeout` at the next check after `seconds`; answer it as the 408 of `seconds`."""
    _clock.deadline = time.monotonic() + seconds
    try:
        yield
    except Timeout:
        message = f"the {what} took longer than this server's limit of {limits.seconds} s"
        raise LimitError("seconds", message, 408) from None
    finally:
        _clock.deadline = None

"""The values of generation itself: the sites ``"logits"`` and ``"samples"``.

In `pl.generate` two sites are not modules of the model: ``"logits"``, the
raw next-token logits of each step (``[batch, vocab]``, the model's output at
the last position, before any logits processor, penalty or temperature), and
``"samples"``, the token ids chosen at each step (``[batch]``). On HF models
they are identity modules (`Tap`) that purelens calls at those two points, so
every builder and every pass mechanism works on them unchanged: a patch of
``"logits"`` changes what is sampled, a patch of ``"samples"`` the token that
is appended and fed back. Backends that have real modules there (vLLM's
logits processor and sampler) map the two names onto those instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import PurelensError
from ._plan import Plan

__all__ = ["GENERATION_SITES", "TAPS", "SampleTap", "Tap", "tap_logits", "tapped"]


class Tap(nn.Module):
    """An identity module: hooks on it see (and may replace) what purelens hands it."""

    def forward(self, value: Tensor) -> Tensor:
        return value


# Shared by every call: hooks act only for the pass that installed them.
TAPS: Mapping[str, nn.Module] = MappingProxyType({"logits": Tap(), "samples": Tap()})
GENERATION_SITES = tuple(TAPS)

_UNDO_END = (
    "a patch of 'samples' replaced an end-of-sequence token at step {step}, but HF's "
    "generate had already ended that row by then.\n"
    "  Patch 'logits' instead (the end-of-sequence token then is never sampled)."
)
_BEAMS = (
    "'samples' cannot be patched with beam search (num_beams > 1): beams choose their "
    "tokens together, not one sample per row.\n  Use do_sample or greedy decoding."
)


def tapped(plan: Plan) -> set[str]:
    """The generation sites (``"logits"``, ``"samples"``) that `plan` acts on."""
    taps = {id(m): name for name, m in TAPS.items()}
    return {taps[id(site.module)] for site in plan.sites if id(site.module) in taps}


def tap_logits(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
    """A root forward hook: the output's last-position logits through the ``"logits"`` tap."""
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise PurelensError(
            "site 'logits': the model's output has no `logits` of shape [batch, seq, vocab] "
            f"to take the next-token logits from (got {type(output).__name__})."
        )
    last = logits[:, -1]
    new = TAPS["logits"](last)
    if new is last:
        return None
    logits = logits.clone()
    logits[:, -1] = new
    output["logits"] = logits
    return output


class SampleTap:
    """A stopping criterion that hands each step's sampled tokens to the ``"samples"`` tap.

    HF's generate appends the tokens it sampled and then asks its stopping
    criteria; this one comes first, so a patched token is the one appended,
    returned and fed to the next step, and a patch to an end-of-sequence token
    ends the row.
    """

    def __init__(self, eos: Tensor | None, num_beams: int) -> None:
        if num_beams > 1:
            raise PurelensError(_BEAMS)
        self.eos = eos
        self.step = 0
        self.done: Tensor | None = None  # rows that had ended before this step

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        last = input_ids[:, -1].clone()  # a save keeps it; a patch writes into input_ids
        done = torch.zeros_like(last, dtype=torch.bool) if self.done is None else self.done
        new = TAPS["samples"](last)
        ended = self._ends(last) & ~done
        if new is not last:
            new = torch.where(done, last, new.to(last.dtype))  # an ended row only pads
            if bool((ended & ~self._ends(new)).any()):
                raise PurelensError(_UNDO_END.format(step=self.step))
            input_ids[:, -1] = new  # HF's own tensor: what it returns and feeds back
            ended = self._ends(new) & ~done
        self.done = done | ended
        self.step += 1
        return ended

    def _ends(self, tokens: Tensor) -> Tensor:
        if self.eos is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.eos.to(tokens.device))

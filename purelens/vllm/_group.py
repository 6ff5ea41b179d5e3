"""The interventions of one prompt of a call, and the two that span the call's prompts.

On vLLM each prompt is a request with a pass of its own (`_worker`), laid out
as ``pl.generate(hf_model, [prompt])`` lays it out. `batch=` therefore picks
prompts: prompt ``i`` gets the interventions whose rows include ``i``. Two
builders read other prompts' values and are defined over the call:

- ``pl.transplant(site, src, dst)``: prompt ``dst`` gets prompt ``src``'s
  value at the site, in the same step (its own step count), which needs both
  in the same engine step with the same number of tokens there;
- ``pl.ablate(site, "mean")``: the mean over the tokens of the call's prompts
  (those `batch=` selects) that are in the same engine step at the same step.

Both read the values as they arrive at the site, so on vLLM they must come
before any other writer on that site (else an error says so).
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._errors import PurelensError
from .._interventions import Ablate, Intervention, Transplant, Writer, describe
from .._plan import Plan
from .._select import Calls, Steps, row_indices
from .._tree import static_field

__all__ = ["ARRIVALS", "Arrive", "FromPrompt", "GroupMean", "check_order", "for_prompt"]

# While a request's interventions run at a site: (its prompt index, its step, {prompt
# index: (step, value)} for the requests of its call at that site in this engine step, as
# they arrived).
# The last item: the engine step at which each prompt of the call had its prompt pass.
Arrivals = tuple[int, int, Mapping[int, tuple[int, Tensor]], Mapping[int, int]]
ARRIVALS: contextvars.ContextVar[Arrivals] = contextvars.ContextVar(
    "purelens_vllm_arrivals", default=(0, 0, {}, {})
)

_ROW = "{what}: prompt {row} is outside the call's {count} prompts."
_ABSENT = (
    "{what}: prompt {src} is not at step {step} at site {site!r} in the engine step where "
    "prompt {dst} is (vLLM scheduled them apart, or prompt {src} has ended).\n"
    "  On vLLM, transplant between prompts that run together, e.g. in one pl.generate "
    "call with the same max_new_tokens."
)
_LENGTHS = (
    "{what}: prompt {src} has {got} at site {site!r} and prompt {dst} {want}, so one "
    "cannot take the other's value.\n  Transplant between prompts of the same length."
)
_AFTER_WRITER = (
    "{what}: on vLLM, a transplant or mean ablation takes the values of the call's "
    "prompts as they arrive at the site, so it must come before the other writers on "
    "site {site!r} ({writer!r} comes first).\n  Put it first among that site's writers."
)
_APART = (
    "{what}: vLLM ran the prompt passes of the call's prompts {missing} in other engine "
    "steps, so the mean would be over a part of the call.\n"
    "  vLLM starts a call's prompts together when they fit its token budget "
    "(max_num_batched_tokens, max_num_seqs) and reach it at once (the multiprocess engine "
    "may take them over two steps): mean-ablate fewer prompts a call, or compute the mean "
    "first and use pl.replace."
)
_MEAN_OF_INTEGERS = (
    "{what} at site {site!r}: the value there is {got}, and the mean of integers (token ids) "
    "is not one of them.\n  Mean-ablate where the values are floating-point."
)
_MEAN_OF_ONE = (
    "{what} at site {site!r}: the call's prompts at this step have one token between them, "
    "so a mean ablation would change nothing.\n  Mean-ablate over several prompts or tokens, "
    "or compute a mean and use pl.replace(site, mean)."
)


@dataclasses.dataclass(frozen=True, eq=False)
class Arrive(Intervention):
    """A prompt whose value another prompt of its call reads (it changes nothing)."""

    site: str = static_field()
    step: Steps = static_field(default=None)
    call: Calls = static_field(default=None)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _AcrossPrompts(Writer):
    """A writer that reads other prompts of the call; it shows as the builder it stands for."""

    site: str = static_field()
    origin: str = static_field(default="")  # the repr of the user's intervention
    step: Steps = static_field(default=None)
    call: Calls = static_field(default=None)
    batch: Any = static_field(default=None)
    fresh = True

    def __repr__(self) -> str:
        return self.origin


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class FromPrompt(_AcrossPrompts):
    """The value of prompt `src` of the call (a transplant, for its `dst` prompt)."""

    src: int = static_field(default=0)

    def new_value(self, rows: Tensor, saved: Mapping[str, Any]) -> Tensor:
        dst, step, arrived, _ = ARRIVALS.get()
        found = arrived.get(self.src)
        if found is None or found[0] != step:
            raise PurelensError(
                _ABSENT.format(what=self.origin, src=self.src, step=step, site=self.site, dst=dst)
            )
        value = found[1]
        if value.shape != rows.shape:
            raise PurelensError(
                _LENGTHS.format(
                    what=self.origin,
                    src=self.src,
                    dst=dst,
                    site=self.site,
                    got=describe(value),
                    want=describe(rows),
                )
            )
        return value.clone()


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class GroupMean(_AcrossPrompts):
    """The mean over the call's prompts `members` at this step (a mean ablation)."""

    members: tuple[int, ...] = static_field(default=())

    def new_value(self, rows: Tensor, saved: Mapping[str, Any]) -> Tensor:
        if not (rows.is_floating_point() or rows.is_complex()):
            raise PurelensError(
                _MEAN_OF_INTEGERS.format(what=self.origin, site=self.site, got=describe(rows))
            )
        me, step, arrived, starts = ARRIVALS.get()
        # Prompts that started apart would each average over a different set, at any step.
        apart = [i for i in self.members if starts.get(i, -1) != starts.get(me)]
        if apart:
            raise PurelensError(_APART.format(what=self.origin, missing=apart))
        values = [
            v.reshape(-1, v.shape[-1])
            for i, (s, v) in sorted(arrived.items())
            if i in self.members and s == step
        ]
        flat = torch.cat(values)
        if flat.shape[0] < 2:
            raise PurelensError(_MEAN_OF_ONE.format(what=self.origin, site=self.site))
        return flat.mean(0).expand_as(rows).clone()


def for_prompt(spec: Any) -> tuple[tuple[Intervention, ...], tuple[Any, ...]]:
    """The interventions of prompt `spec.index` of a call of `spec.count` prompts, and a
    signature equal for the prompts of the call that get the same ones."""
    index, count = spec.index, spec.count
    out: list[Intervention] = []
    signature: list[Any] = []
    for position, iv in enumerate(spec.interventions):
        if isinstance(iv, Transplant):
            given = zip(iv.src, iv.dst, strict=True)
            pairs = [(_row(iv, s, count), _row(iv, d, count)) for s, d in given]
            mine = [s for s, d in pairs if d == index]
            for src in mine:
                out.append(FromPrompt(iv.site, repr(iv), iv.step, iv.call, src=src))
                signature.append((position, "from", src))
            if not mine and any(s == index for s, _ in pairs):
                out.append(Arrive(iv.site, iv.step, iv.call))
                signature.append((position, "arrive"))
            continue
        batch = getattr(iv, "batch", None)
        rows = list(range(count)) if batch is None else row_indices(batch, count, iv.site)
        if index not in rows:
            continue
        if batch is not None:
            iv = dataclasses.replace(iv, batch=None)  # type: ignore[type-var]
        if isinstance(iv, Ablate) and iv.how == "mean":
            out.append(GroupMean(iv.site, repr(iv), iv.step, iv.call, members=tuple(rows)))
            signature.append((position, "mean", tuple(rows)))
            continue
        out.append(iv)
        signature.append(position)
    return tuple(out), tuple(signature)


def _row(iv: Transplant, row: int, count: int) -> int:
    if not -count <= row < count:
        raise PurelensError(_ROW.format(what=repr(iv), row=row, count=count))
    return row % count


def check_order(plan: Plan) -> None:
    """Raise if a transplant or mean ablation comes after another writer on its site."""
    for site in plan.sites:
        writer = None
        for _, iv in plan.entries(site):
            if isinstance(iv, FromPrompt | GroupMean | Arrive) and writer is not None:
                raise PurelensError(
                    _AFTER_WRITER.format(what=repr(iv), site=site.site, writer=writer)
                )
            if isinstance(iv, Writer):
                writer = iv

"""One request on the worker: what purelens asks of it, its state while it runs, what it leaves.

`Spec` travels from the driver (as an object in this process, else as data in
the request's ``extra_args``); `Live` is the request's own `Pass` and where its
tokens are in the current engine step; `Outcome` is what `collect` hands back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .. import ops
from .._budget import bounded
from .._errors import PurelensError
from .._interventions import Intervention
from .._limits import Timeout
from .._pass import Pass
from .._plan import Plan
from .._record import Record
from .._wire import decode_result, encode_records
from ._group import Arrive, FromPrompt, GroupMean

if TYPE_CHECKING:  # the driver imports this module
    from ._worker import Driver

__all__ = ["Live", "Outcome", "Spec", "check_supported", "unwired_outcomes", "wire_outcomes"]

_ACROSS = (Arrive, FromPrompt, GroupMean)

_INSIDE = (
    "site {site!r}: attention ports and op sites are not supported on vLLM yet (its "
    "attention runs in fused kernels over a paged cache).\n"
    "  Use them with pl.run or pl.generate on the HF model; on vLLM, intervene on "
    "module outputs and inputs."
)
_GRADS = (
    "{what}: vLLM runs without autograd (torch.inference_mode), so there is no gradient "
    "to save or patch.\n  Use pl.run(hf_model, ..., loss=...) for gradients."
)


_SKIPPED_ATTENTION = (
    "{what}: {site!r} holds an attention layer, and skipping it at some steps only leaves "
    "that layer's keys and values of those steps unwritten in vLLM's paged cache, which "
    "its later steps would read (HF's cache lacks them too).\n"
    "  Skip it at every step (no step=), or skip a module without attention (an MLP)."
)


def _holds_attention(module: nn.Module) -> bool:
    """Whether `module` is or contains one of vLLM's attention layers (which write the
    paged key-value cache)."""
    return any(
        any(c.__name__ == "AttentionLayerBase" for c in type(m).__mro__) for m in module.modules()
    )


@dataclasses.dataclass(frozen=True)
class Spec:
    """What purelens asks of one request: its call's interventions, and which prompt it is."""

    interventions: tuple[Intervention, ...]
    index: int  # the prompt's place in its call (`batch=` counts these)
    count: int  # how many prompts the call has
    group: str  # the call
    run: bool  # pl.run: one pass, whose logits are the output
    seconds: float | None = None  # a server's limits: the time the call had left when sent,
    saved_bytes: int | None = None  # and the bytes this request may save,
    elements: int | None = None  # and the elements an ops expression may make

    def wire(self, data: bytes) -> dict[str, Any]:
        """This spec as plain data for another process, with `data` its call's
        interventions (`pl.dumps`)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del fields["interventions"]
        return {**fields, "data": data}

    @classmethod
    def from_wire(cls, call: Mapping[str, Any], decode: Callable[[Any], Any]) -> Spec:
        """The spec `wire` wrote (its types checked), `decode` reading its interventions."""

        def maybe(kind: Callable[[Any], Any], value: Any) -> Any:
            return None if value is None else kind(value)

        return cls(
            decode(call["data"]),
            int(call["index"]),
            int(call["count"]),
            str(call["group"]),
            bool(call["run"]),
            maybe(float, call.get("seconds")),
            maybe(int, call.get("saved_bytes")),
            maybe(int, call.get("elements")),
        )


@dataclasses.dataclass
class Outcome:
    """What one request left: its saved values, or an error.

    ``record`` is a `Record` whose output is pl.run's next-token logits (None
    for pl.generate). Across processes a call's outcomes travel as plain data
    (`wire_outcomes`).
    """

    record: Record
    error: str | None = None
    kind: str | None = None  # the error's: "GenerationEnded", "SavedBytesError", "Timeout", ...
    stopped: bool = False  # pl.run: a pl.stop ended its pass


def wire_outcomes(outcomes: list[Outcome | None]) -> dict[str, Any]:
    """A call's outcomes as plain data for another process: their records as one blob
    (`encode_records`: one header and one tensor file for the call, not one per prompt,
    which cost 0.1 ms a prompt each way here), the rest as dicts. A record that cannot
    be sent (a save function's value that is no tensor) fails its prompt alone."""
    kept = [o for o in outcomes if o is not None]
    try:
        blob = encode_records([o.record for o in kept])
    except PurelensError:
        for outcome in kept:
            try:
                encode_records([outcome.record])
            except PurelensError as error:
                outcome.record = Record({}, None)
                outcome.error = outcome.error or str(error)
                outcome.kind = outcome.kind or type(error).__name__
        blob = encode_records([o.record for o in kept])
    return {
        "outcomes": [
            None if o is None else {"error": o.error, "kind": o.kind, "stopped": o.stopped}
            for o in outcomes
        ],
        "records": blob,
    }


def unwired_outcomes(data: Any) -> list[Outcome | None]:
    """The outcomes `wire_outcomes` wrote."""
    found = decode_result(data["records"])
    records = iter(found if isinstance(found, list) else [found])
    return [None if o is None else Outcome(next(records), **o) for o in data["outcomes"]]


class Live:
    """One request while it runs: its pass, and where its tokens are in this step."""

    def __init__(self, key: str, spec: Spec, driver: Driver) -> None:
        self.key = key
        self.spec = spec
        self.error: str | None = None
        self.kind: str | None = None
        self.deadline = None if spec.seconds is None else time.monotonic() + spec.seconds
        self.budget = None if spec.saved_bytes is None else [spec.saved_bytes, spec.saved_bytes]
        self.stopped = False
        self.steps = 0  # steps run so far
        self.tokens = 0  # tokens computed so far
        self.prompt = 0
        self.start = self.end = self.row = 0
        self.logits: Tensor | None = None
        self.started_at: int | None = None  # the engine step of its prompt pass
        self.unbounded = spec.seconds is None and spec.saved_bytes is None and spec.elements is None
        self.across = False  # whether it reads or is read by other prompts of its call
        self.idle = False  # whether it has nothing to do at any step (then steps skip it)
        # Whether it may change values, by writers or by functions of the user's (a save's
        # may change its value in place): then its cache blocks are zeroed as it leaves.
        self.writes = False
        try:
            plan = driver.plan_for(spec)
            self.across = any(isinstance(iv, _ACROSS) for iv in plan.interventions)
            self.idle = not (plan.sites or plan.skip_modules or spec.run)
            self.writes = bool(plan.skips) or not all(
                site.only_saves and site.bare for site in plan.sites
            )
            self.pass_: Pass | None = Pass(plan, driver.model, steps=not spec.run)
        except PurelensError as error:
            self.pass_ = None
            self.error = str(error)
            self.kind = type(error).__name__

    @property
    def acting(self) -> bool:
        return self.pass_ is not None and self.error is None and not self.stopped

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.kind = type(error).__name__
            self.error = str(error) or self.kind

    def check(self) -> None:
        """Raise `Timeout` once a server's deadline for this request has passed."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Timeout

    @contextlib.contextmanager
    def bounded(self) -> Iterator[None]:
        """This request's limits (a server's), while its interventions run."""
        if self.deadline is None and self.budget is None and self.spec.elements is None:
            yield
            return
        with contextlib.ExitStack() as stack:
            if self.spec.elements is not None:
                stack.enter_context(ops.limit_elements(self.spec.elements))
            stack.enter_context(bounded(self.check, self.budget))
            yield

    def outcome(self) -> Outcome:
        if self.error is None and self.pass_ is not None:
            try:
                self.pass_.check_finished()
            except PurelensError as error:
                self.fail(error)
        saved = self.pass_.record_saved() if self.pass_ is not None else {}
        return Outcome(Record(saved, self.logits), self.error, self.kind, self.stopped)


def check_supported(plan: Plan, *, generating: bool) -> None:
    from .._grads import PatchGrad, SaveGrad

    for site in plan.sites:
        if site.inside:
            raise PurelensError(_INSIDE.format(site=site.site))
    for module in plan.skip_modules if generating else ():
        _, skip = plan.skip(module)  # type: ignore[misc]
        if skip.step is not None and _holds_attention(module):
            raise PurelensError(_SKIPPED_ATTENTION.format(what=repr(skip), site=skip.site))
    for iv in plan.interventions:
        if isinstance(iv, SaveGrad | PatchGrad):
            raise PurelensError(_GRADS.format(what=repr(iv)))

"""One forward pass: the state of one call, acting on the sites of its `Plan`.

A `Pass` holds what that call has saved so far, counts steps and calls, and
applies the plan's interventions as hooks hand it values. Neither it nor its
plan lives on the model: hooks find the pass through the context variable
`ACTIVE`, which is what makes runs thread-safe and re-entrant.

A pass's interventions act on its own forward call only. While one of them
runs (a patch function, a save's function), that pass and the passes
activated after it are inactive: a model called from inside a run's function
(a plain call, or an edited module) runs untouched by the run, as a nested
`pl.run` does. An edit's function is part of the edited model, so the run
that called the edited model still acts inside it (on an autoencoder spliced
in by `pl.patch`, say).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, TypeVar

import torch.utils._pytree as torch_pytree
from torch import Tensor, nn

from ._budget import check, spend
from ._checkpoint import checkpointed
from ._errors import GenerationEnded, PurelensError
from ._grads import PatchGrad, SaveGrad, mark, tap
from ._interventions import Intervention, Save, Stop, Writer
from ._layout import layout_of
from ._layout import reset as reset_layout
from ._layout import use as use_layout
from ._padding import reset_padding, set_padding
from ._params import restore, without_replacements
from ._plan import Plan, SitePlan
from ._primary import primary_input, primary_output
from ._select import is_int, step_selected

__all__ = ["ACTIVE", "Pass", "StopPass"]

T = TypeVar("T")

# The passes whose hooks act now, in this thread or task.
ACTIVE: contextvars.ContextVar[tuple[Pass, ...]] = contextvars.ContextVar(
    "purelens_passes", default=()
)

_RAN_TWICE = (
    "site {site!r} ran more than once in one pass (the model calls the module again), "
    "and without `call=` a save keeps one value per pass.\n"
    "  Select calls, counted from 0 within the pass (a generation step, or a pipeline's "
    "denoising step): "
    "call=0 for the first, call=slice(None) for a tuple of every call."
)
_NO_SUCH_CALL = (
    "site {site!r} ran {count} time(s) per {unit} at most, but not at the selected "
    "call={call!r} (calls count from 0)"
)
_NEVER_RAN = (
    "{what} never applied: {why}.\n"
    "  An intervention whose site does not run is an error rather than a silent no-op."
)
_ENDED = (
    "{what} did not apply at every step it selects: generation ended after step {last} "
    "({why}), before step {step}.\n"
    "  What was generated is in this error's `.record` (`.record.output`: what it returned)."
)
_NO_TENSOR = "site {site!r}: the module {port} is {kind}, which holds no tensor to intervene on."
_CHANGED_IN_PLACE = (
    "the value saved as {name!r} was changed in place by the model after it was "
    "saved, so the record would not hold the value at the site.\n"
    "  Save a copy instead: pl.save({site!r}, torch.clone, name={name!r})."
)
_CHECKPOINTED = (
    "{what} at site {site!r} acts inside gradient checkpointing (torch.utils.checkpoint, "
    "e.g. after model.gradient_checkpointing_enable()) while gradients are recorded: the "
    "backward pass recomputes that part of the model after this run's hooks are gone, so "
    "the gradients would not see the intervention.\n"
    "  Turn checkpointing off for this run (model.gradient_checkpointing_disable(), or "
    "model.eval() for HF models), or run without gradients (torch.no_grad())."
)


class StopPass(Exception):
    """Raised by a hook after a `pl.stop` site ran; caught by the run it belongs to."""

    def __init__(self, owner: Pass) -> None:
        super().__init__("purelens stopped the forward pass")
        self.owner = owner


class Pass:
    """The state of one call: what was saved and which interventions applied.

    A generation call is one `Pass` over several forward steps (`begin_step`
    is called at the start of each call of the root module; step 0 is the
    prompt pass, including an encoder that runs before it). A value saved at
    several steps is then a tuple.
    """

    # What most passes keep as it starts (class attributes: a pass that changes one sets
    # its own, and one made per call assigns fewer).
    lenient = False  # for surveys (pl.shapes): skip what cannot be saved
    multi_step = False
    step = 0
    _root_calls = 0
    recording = False  # whether autograd records the root call (set by `installed`)
    padding: Tensor | None = None  # the batch's real tokens, when it is padded
    stopped_at: str | None = None
    _stop_now = False

    def __init__(
        self, plan: Plan, model: nn.Module, *, steps: bool = False, lenient: bool = False
    ) -> None:
        self.plan = plan
        self.model = model
        if lenient:
            self.lenient = True
        if steps:
            self.multi_step = True
        self.saved: dict[str, Any] = {}  # the latest value of each name
        self.saved_view = MappingProxyType(self.saved)
        self.history: dict[str, list[Any]] = {}
        self._saved_at: dict[str, int] = {}
        self.applied: set[int] = set()
        self.grad_targets: dict[str, tuple[Tensor, SaveGrad]] = {}
        self._saved_versions: list[tuple[str, str, Tensor, int]] = []
        self.calls: dict[int, int] = {}  # id(SitePlan or skipped module) -> calls this step
        self.most_calls: dict[int, int] = {}  # the most calls of one step so far (0: never ran)
        self._by_call: dict[str, dict[int, list[Any]]] = {}  # name -> step -> values by call

    # --- called by the hooks -------------------------------------------------

    def on_output(self, site: SitePlan, output: Any) -> Any:
        """The module's output with the site's interventions applied (None: unchanged)."""
        if type(output) is Tensor:  # (the common case: no rebuilding)
            return self.on_value(site, output)
        split = primary_output(output)
        if split is None:
            if self.lenient:
                return None
            raise PurelensError(
                _NO_TENSOR.format(site=site.site, port="output", kind=type(output).__name__)
            )
        new = self.on_value(site, split[0])
        return None if new is None else split[1](new)

    def on_value(self, site: SitePlan, value: Tensor) -> Tensor | None:
        """`value`, the site's tensor as its caller took it out of the module's input or
        output, with the site's interventions applied; None when they left it as it is."""
        if site.plain and not self.recording:  # (`_at_site`, inlined: the common case)
            new = self._plain(site, value)
        else:
            new = self._at_site(site, value)
        if self._stop_now:
            self._maybe_stop(site)
        return None if new is value else new

    def on_input(
        self, site: SitePlan, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        split = primary_input(args, kwargs)
        if split is None:
            if self.lenient:
                return None
            raise PurelensError(_NO_TENSOR.format(site=site.site, port="input", kind="no tensor"))
        new = self.on_value(site, split[0])
        return None if new is None else split[1](new)

    def on_port(self, site: SitePlan, value: Tensor) -> Tensor:
        """A value inside the module's forward (an attention port, an op) with the site's
        interventions applied, in the port's layout."""
        token = use_layout(layout_of(site.port))
        try:
            new = self._at_site(site, value)
        finally:
            reset_layout(token)
        self._maybe_stop(site)
        return new

    def on_skip(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bool, Any]:
        """Whether this pass skips `module` now, and the output it gets instead."""
        entry = self.plan.skip(module)
        if entry is None:
            return False, None
        call = self._count(id(module))
        position, skip = entry
        if not self._selected(skip, call):
            return False, None
        split = primary_input(args, kwargs)
        if split is None:
            raise PurelensError(_NO_TENSOR.format(site=skip.site, port="input", kind="no tensor"))
        if self.recording and checkpointed() == "forward":
            raise PurelensError(_CHECKPOINTED.format(what=repr(skip), site=skip.site))
        self.applied.add(position)
        value = split[0]
        if skip.fn is None:  # the module's output would be a new tensor, not its input
            return True, value.clone()
        output = self._acting(skip.fn, value)
        # The skip's result becomes the model's own value: never a tensor the user holds.
        return True, torch_pytree.tree_map(
            lambda x: x.clone() if isinstance(x, Tensor) else x, output
        )

    # --- internals -----------------------------------------------------------

    def _at_site(self, site: SitePlan, value: Tensor) -> Tensor:
        """`value` with the site's interventions applied; in the context a function of the
        user's gets (`_acting`) unless the site runs none (`SitePlan.plain`)."""
        if site.plain:
            return self._apply(site, value) if self.recording else self._plain(site, value)
        if site.bare:
            return self._apply(site, value)
        return self._acting(self._apply, site, value)

    def _plain(self, site: SitePlan, value: Tensor) -> Tensor:
        """`_apply` for a plain site (whole-value saves and stops) outside autograd's
        recording: no writers, rows, checkpoint reruns or gradient taps to see to."""
        call = self._count(id(site))
        nodes = self.plan.nodes
        for k in site.slots:
            position, iv = nodes[k]
            if (iv.step is not None or iv.call is not None) and not self._selected(iv, call):
                continue
            check()  # a server's deadline, between interventions
            if isinstance(iv, Save):
                self._save(iv, value)
            else:
                self._stop_now = True
            self.applied.add(position)
        return value

    def _selected(self, iv: Intervention, call: int) -> bool:
        """Whether `iv` acts at this step, at this call of its site in the step."""
        return (iv.step is None or step_selected(iv.step, self.step)) and (
            iv.call is None or step_selected(iv.call, call)
        )

    def _acting(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` as this pass's interventions run: with only the passes activated
        before it (see the module docstring), and this pass's padding for `pl.at`."""
        passes = ACTIVE.get()
        below = passes[: passes.index(self)] if self in passes else passes
        active = ACTIVE.set(below)
        padding = set_padding(self.padding)
        # A run's `params=` are its model's tensors; its functions see the model's own.
        hidden = None if below else without_replacements()
        try:
            return fn(*args)
        finally:
            if hidden is not None:
                restore(hidden)
            reset_padding(padding)
            ACTIVE.reset(active)

    def _apply(self, site: SitePlan, value: Tensor) -> Tensor:
        if self.recording:
            where = checkpointed()
            if where == "rerun":  # autograd replaying the forward: values were taken already
                return value
            if where == "forward" and not site.only_saves:
                iv = next(
                    iv for _, iv in self.plan.entries(site) if not isinstance(iv, Save | Stop)
                )
                raise PurelensError(_CHECKPOINTED.format(what=repr(iv), site=site.site))
        call = self._count(id(site))
        patch_grads: list[PatchGrad] = []
        save_grads: list[SaveGrad] = []
        nodes = self.plan.nodes
        for k in site.slots:
            position, iv = nodes[k]
            if not self._selected(iv, call):
                continue
            check()  # a server's deadline, between interventions
            narrowed = None
            if self.padding is not None and getattr(iv, "batch", None) is not None:
                narrowed = set_padding(self.padding, iv.batch, value.shape[0])  # type: ignore[attr-defined]
            try:
                if isinstance(iv, Writer):
                    value = iv.write(value, self.saved_view)
                elif isinstance(iv, Save):
                    self._save(iv, iv.record(value))
                elif isinstance(iv, Stop):
                    self._stop_now = True
            finally:
                if narrowed is not None:
                    reset_padding(narrowed)
            if isinstance(iv, PatchGrad):
                patch_grads.append(iv)
            elif isinstance(iv, SaveGrad):
                save_grads.append(iv)
            self.applied.add(position)
        # Gradient taps sit downstream of every forward intervention (see _grads).
        if patch_grads:
            value = tap(value, patch_grads)
        for node in save_grads:
            key = node.name if node.call is None or is_int(node.call) else (node.name, call)
            if key in self.grad_targets:
                raise PurelensError(_RAN_TWICE.format(site=node.site))
            spend(value)  # its gradient will be as large
            value = mark(value, node, own=site.port == "input")
            self.grad_targets[key] = (value, node)  # type: ignore[index]
        return value

    def _count(self, key: int) -> int:
        """This call's number (from 0) among the calls of a site or module in this step."""
        call = self.calls.get(key, 0)
        self.calls[key] = call + 1
        if call >= self.most_calls.get(key, 0):
            self.most_calls[key] = call + 1
        return call

    def begin_step(self) -> None:
        """A call of the root module: the first is step 0, each later one the next step."""
        if self._root_calls:
            self.step += 1
            self.calls.clear()
        self._root_calls += 1

    def record_saved(self) -> dict[str, Any]:
        """The saved values for the Record: per step a tuple, unless `step=` was one int."""
        if not self.multi_step:
            return dict(self.saved)
        kinds = {iv.name: iv for _, iv in self.plan.nodes if isinstance(iv, Save)}
        out: dict[str, Any] = {}
        for name, values in self.history.items():
            out[name] = values[0] if isinstance(kinds[name].step, int) else tuple(values)
        for name, steps in self._by_call.items():
            iv = kinds[name]
            per_step = [_calls_value(iv, values) for values in steps.values()]
            out[name] = per_step[0] if isinstance(iv.step, int) else tuple(per_step)
        return out

    def _save(self, iv: Save, value: Any) -> None:
        if iv.call is not None:  # one value per selected call: kept by step and call
            spend(value)
            value = self._kept(iv, value)
            values = self._by_call.setdefault(iv.name, {}).setdefault(self.step, [])
            values.append(value)
            self.saved[iv.name] = _calls_value(iv, values)
            return
        if self._saved_at.get(iv.name) == self.step:
            if self.lenient:  # keep the first call's value
                return
            raise PurelensError(_RAN_TWICE.format(site=iv.site))
        self._saved_at[iv.name] = self.step
        spend(value)
        value = self._kept(iv, value)
        self.saved[iv.name] = value
        if self.multi_step:
            self.history.setdefault(iv.name, []).append(value)

    def _kept(self, iv: Save, value: T) -> T:
        """`value` as the record keeps it, watched for in-place changes until the pass ends.

        Inference tensors (``torch.inference_mode()``) have no version counter
        to watch, so they are copied.
        """
        if isinstance(value, Tensor):
            if value.is_inference():
                return value.clone()  # type: ignore[return-value]
            self._saved_versions.append((iv.name, iv.site, value, value._version))
            return value
        value = torch_pytree.tree_map(
            lambda x: x.clone() if isinstance(x, Tensor) and x.is_inference() else x, value
        )
        for leaf in torch_pytree.tree_leaves(value):
            if isinstance(leaf, Tensor) and not leaf.is_inference():
                self._saved_versions.append((iv.name, iv.site, leaf, leaf._version))
        return value

    def _maybe_stop(self, site: SitePlan) -> None:
        if self._stop_now and self.stopped_at is None:
            self.stopped_at = site.site
            raise StopPass(self)

    def check_finished(self) -> None:
        """Raise if an intervention never applied or a saved value was changed in place."""
        for name, site, value, version in self._saved_versions:
            if value._version != version:
                raise PurelensError(_CHANGED_IN_PLACE.format(name=name, site=site))
        if self.multi_step:
            for iv in self.plan.interventions:
                if isinstance(iv.step, frozenset) and max(iv.step) > self.step:
                    raise GenerationEnded(
                        _ENDED.format(
                            what=repr(iv), last=self.step, why=self._ended(), step=self._late(iv)
                        )
                    )
        if len(self.applied) == len(self.plan.interventions):  # (positions: all applied)
            return
        missing = [(i, iv) for i, iv in enumerate(self.plan.interventions) if i not in self.applied]
        if not missing:
            return
        i, iv = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        if self.multi_step and iv.step is not None and not self._selected_so_far(iv):
            raise GenerationEnded(
                _ENDED.format(
                    what=repr(iv) + more, last=self.step, why=self._ended(), step=self._late(iv)
                )
            )
        if self.stopped_at is not None:
            why = (
                f"the pass was stopped at {self.stopped_at!r}, "
                f"and site {iv.site!r} had not run by then"
            )
        elif iv.call is not None and self._site_ran(i) and self._calls_missed(i, iv):
            unit = "generation step" if self.multi_step else "pass"
            count = self._most_calls(i)
            why = _NO_SUCH_CALL.format(site=iv.site, count=count, unit=unit, call=iv.call)
        elif iv.step is not None and self._site_ran(i):
            ran = f"generation ran steps 0 to {self.step}" if self.multi_step else "run is step 0"
            why = f"site {iv.site!r} ran, but not at the selected step={iv.step!r} ({ran})"
        else:
            why = f"site {iv.site!r} did not run in this forward pass"
        raise PurelensError(_NEVER_RAN.format(what=repr(iv) + more, why=why))

    def _late(self, iv: Intervention) -> str:
        """The first step `iv` selects after the last step that ran."""
        steps = iv.step
        if isinstance(steps, int):
            return str(steps)
        if isinstance(steps, frozenset):
            return str(min(s for s in steps if s > self.step))
        assert isinstance(steps, slice)
        return str(steps.start or 0)

    def _ended(self) -> str:
        return (
            f"{self.step + 1} forward passes: max_new_tokens, an end-of-sequence token "
            "in every row, or a stopping criterion"
        )

    def _selected_so_far(self, iv: Intervention) -> bool:
        return any(step_selected(iv.step, s) for s in range(self.step + 1))

    def _site_ran(self, position: int) -> bool:
        return self._most_calls(position) > 0

    def _most_calls(self, position: int) -> int:
        """The most calls in one step of the site (or skipped module) of intervention
        `position`: 0 if it never ran."""
        plan = self.plan
        keys = [
            id(site) for site in plan.sites if any(plan.nodes[k][0] == position for k in site.slots)
        ]
        keys += [id(m) for m in plan.skip_modules if plan.skip(m)[0] == position]  # type: ignore[index]
        return max((self.most_calls.get(k, 0) for k in keys), default=0)

    def _calls_missed(self, position: int, iv: Intervention) -> bool:
        """Whether the site ran, but never at a call `iv` selects."""
        most = self._most_calls(position)
        return not any(step_selected(iv.call, c) for c in range(most))


def _calls_value(iv: Save, values: list[Any]) -> Any:
    """A save's values of one step: the value itself for ``call=k``, else a tuple by call."""
    return values[0] if is_int(iv.call) else tuple(values)

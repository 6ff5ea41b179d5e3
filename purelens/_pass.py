"""One forward pass: the plan of what happens at each site, and the pass's own state.

A `Plan` is built from the interventions of one call (sites resolved, grouped
by module and port). A `Pass` holds what that call has saved so far. Neither
lives on the model: hooks find the pass through the context variable
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
import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor, nn

from ._budget import check, spend
from ._checkpoint import checkpointed
from ._errors import GenerationEnded, PurelensError, SiteError
from ._grads import PatchGrad, SaveGrad, mark, tap
from ._interventions import Intervention, Save, Skip, Stop, Writer
from ._layout import layout_of
from ._layout import reset as reset_layout
from ._layout import use as use_layout
from ._padding import reset_padding, set_padding
from ._params import restore, without_replacements
from ._primary import primary_input, primary_output
from ._select import is_int, step_selected
from ._site import ATTENTION_PORTS, Port, expand, parse_site, resolve

__all__ = ["ACTIVE", "Pass", "Plan", "SitePlan", "StopPass", "hookable"]

T = TypeVar("T")

# The passes whose hooks act now, in this thread or task.
ACTIVE: contextvars.ContextVar[tuple[Pass, ...]] = contextvars.ContextVar(
    "purelens_passes", default=()
)

_DUPLICATE_NAME = (
    "two {kind} are named {name!r} ({first!r} and {second!r}).\n"
    "  Give one a different name: pl.{builder}(site, name='...')."
)
_NAMED = {Save: ("saves", "save"), SaveGrad: ("save_grads", "save_grad")}
_TWO_SKIPS = "two pl.skip interventions on site {site!r}; a module can be skipped once."
_RAN_TWICE = (
    "site {site!r} ran more than once in one pass (the model calls the module again), "
    "and without `call=` a save keeps one value per pass.\n"
    "  Select calls, counted from 0 within the pass (a generation step): "
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
    "  What was generated is in this error's `.record` (`.record.output`: the token ids)."
)
_NO_TENSOR = "site {site!r}: the module {port} is {kind}, which holds no tensor to intervene on."
_CHANGED_IN_PLACE = (
    "the value saved as {name!r} was changed in place by the model after it was "
    "saved, so the record would not hold the value at the site.\n"
    "  Save a copy instead: pl.save({site!r}, torch.clone, name={name!r})."
)
_CONTAINER = (
    "site {site!r} is {name!r}, a {kind}: a container of modules that is never called "
    "itself, so no value flows through it.\n"
    "  Intervene on its items instead, e.g. {example!r}."
)
_SCRIPTED = (
    "site {site!r} is {name!r}, a TorchScript module ({kind}), which runs no Python "
    "hooks, so purelens cannot intervene inside it.\n"
    "  Intervene on the eager module (before torch.jit.script), or at a site outside it."
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


# Not frozen: a frozen dataclass's __init__ costs a microsecond per field, and
# plans are built on every call. Nothing assigns to a plan after `Plan.build`.
@dataclasses.dataclass(slots=True, eq=False)
class SitePlan:
    """The interventions on one (module, port), in the order they were given."""

    name: str
    module: nn.Module
    port: Port
    site: str  # as the user first wrote it, for messages
    entries: tuple[tuple[int, Intervention], ...]  # (position in the run's list, node)
    stops: bool = False  # whether the pass ends here (a pl.stop among the entries)
    only_saves: bool = True  # whether the entries only read (then checkpointing is harmless)
    op: str | None = None  # an op site's op ("softmax.0"), acted on inside the module's forward
    inside: bool = False  # whether the value is inside the module's forward (a port, an op)


@dataclasses.dataclass(slots=True, eq=False)
class Plan:
    """Every intervention of one call, resolved against the model."""

    interventions: tuple[Intervention, ...]
    sites: tuple[SitePlan, ...]
    skips: Mapping[int, tuple[int, Skip]]  # id(module) -> (position, skip)
    skip_modules: tuple[nn.Module, ...]
    save_grads: tuple[SaveGrad, ...]
    # The interventions as they act: one per match of a site with '*' (by position).
    nodes: tuple[tuple[int, Intervention], ...] = ()
    # id(module) -> its sites inside its forward, by port ("q", ...) or op ("#softmax.0")
    inside: Mapping[int, Mapping[str, SitePlan]] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, model: nn.Module, interventions: tuple[Intervention, ...]) -> Plan:
        grouped: dict[tuple[str, Port, str | None], list[tuple[int, Intervention]]] = {}
        modules: dict[str, nn.Module] = {}
        first_site: dict[tuple[str, Port, str | None], str] = {}
        skips: dict[int, tuple[int, Skip]] = {}
        skip_modules: list[nn.Module] = []
        taken: dict[type, dict[str, str]] = {Save: {}, SaveGrad: {}}  # name -> site
        nodes: list[tuple[int, Intervention]] = []
        for i, given in enumerate(interventions):
            for iv, name, module, port, op in _targets(model, given):
                nodes.append((i, iv))
                if isinstance(iv, Save | SaveGrad):
                    seen = taken[type(iv)]
                    if iv.name in seen:
                        kind, builder = _NAMED[type(iv)]
                        raise PurelensError(
                            _DUPLICATE_NAME.format(
                                kind=kind,
                                name=iv.name,
                                first=seen[iv.name],
                                second=iv.site,
                                builder=builder,
                            )
                        )
                    seen[iv.name] = iv.site
                if isinstance(iv, Skip):
                    if id(module) in skips:
                        raise PurelensError(_TWO_SKIPS.format(site=iv.site))
                    skips[id(module)] = (i, iv)
                    skip_modules.append(module)
                    continue
                key = (name, port, op)
                modules[name] = module
                first_site.setdefault(key, iv.site)
                grouped.setdefault(key, []).append((i, iv))
        sites = tuple(
            SitePlan(
                name,
                modules[name],
                port,
                first_site[(name, port, op)],
                tuple(entries),
                any(isinstance(iv, Stop) for _, iv in entries),
                all(isinstance(iv, Save | Stop) for _, iv in entries),
                op,
                op is not None or port in ATTENTION_PORTS,
            )
            for (name, port, op), entries in grouped.items()
        )
        save_grads = tuple(iv for _, iv in nodes if isinstance(iv, SaveGrad))
        return cls(
            interventions,
            sites,
            MappingProxyType(skips),
            tuple(skip_modules),
            save_grads,
            tuple(nodes),
            _inside(sites),
        )

    def rebased(self, modules: Mapping[int, nn.Module]) -> Plan:
        """The same plan on another copy of the module tree (`modules`: id(old) -> new)."""
        sites = tuple(
            dataclasses.replace(site, module=modules[id(site.module)]) for site in self.sites
        )
        skips = {id(modules[id(m)]): self.skips[id(m)] for m in self.skip_modules}
        return Plan(
            self.interventions,
            sites,
            MappingProxyType(skips),
            tuple(modules[id(m)] for m in self.skip_modules),
            self.save_grads,
            self.nodes,
            _inside(sites),
        )


def _inside(sites: tuple[SitePlan, ...]) -> Mapping[int, Mapping[str, SitePlan]]:
    inside: dict[int, dict[str, SitePlan]] = {}
    for site in sites:
        if site.inside:
            key = site.port if site.op is None else f"#{site.op}"
            inside.setdefault(id(site.module), {})[key] = site
    return inside


def _targets(
    model: nn.Module, iv: Intervention
) -> list[tuple[Intervention, str, nn.Module, Port, str | None]]:
    """Where `iv` acts: its site resolved, or for a site with '*' each match (a node each)."""
    parsed = parse_site(iv.site)
    if "*" not in parsed.path:
        name, module, port = resolve(model, iv.site)
        _check_hookable(iv.site, name, module)
        return [(iv, name, module, port, parsed.op)]
    matches = expand(model, iv.site)
    out: list[tuple[Intervention, str, nn.Module, Port, str | None]] = []
    for filled, name, module, port in matches:
        if not hookable(module):  # a container among the matches: its items may match too
            continue
        renamed = {"name": filled} if isinstance(iv, Save | SaveGrad) else {}
        node = dataclasses.replace(iv, site=filled, **renamed)  # type: ignore[type-var]
        out.append((node, name, module, port, parsed.op))
    if not out:
        _check_hookable(iv.site, matches[0][1], matches[0][2])
    return out


def hookable(module: nn.Module) -> bool:
    """Whether hooks can act on `module`: not TorchScript, and not a container never called."""
    return not isinstance(module, torch.jit.ScriptModule) and not _container(module)


def _container(module: nn.Module) -> bool:
    return type(module).forward is nn.Module.forward and bool(module._modules)


def _check_hookable(site: str, name: str, module: nn.Module) -> None:
    """Raise for a module that no hook can act on: a container, or TorchScript."""
    if isinstance(module, torch.jit.ScriptModule):
        raise SiteError(_SCRIPTED.format(site=site, name=name, kind=type(module).__name__))
    if _container(module):
        kind = type(module).__name__
        first = next(iter(module._modules))
        raise SiteError(
            _CONTAINER.format(site=site, name=name, kind=kind, example=f"{site}.{first}")
        )


class Pass:
    """The state of one call: what was saved and which interventions applied.

    A generation call is one `Pass` over several forward steps (`begin_step`
    is called at the start of each call of the root module; step 0 is the
    prompt pass, including an encoder that runs before it). A value saved at
    several steps is then a tuple.
    """

    def __init__(
        self, plan: Plan, model: nn.Module, *, steps: bool = False, lenient: bool = False
    ) -> None:
        self.plan = plan
        self.lenient = lenient  # for surveys (pl.shapes): skip what cannot be saved
        self.model = model
        self.multi_step = steps
        self.step = 0
        self._root_calls = 0
        self.recording = False  # whether autograd records the root call (set by `installed`)
        self.padding: Tensor | None = None  # the batch's real tokens, when it is padded
        self.saved: dict[str, Any] = {}  # the latest value of each name
        self.saved_view = MappingProxyType(self.saved)
        self.history: dict[str, list[Any]] = {}
        self._saved_at: dict[str, int] = {}
        self.applied: set[int] = set()
        self.stopped_at: str | None = None
        self.ran: set[int] = set()  # ids of the SitePlans whose hook fired
        self.grad_targets: dict[str, tuple[Tensor, SaveGrad]] = {}
        self._saved_versions: list[tuple[str, str, Tensor, int]] = []
        self.calls: dict[int, int] = {}  # id(SitePlan or skipped module) -> calls this step
        self.most_calls: dict[int, int] = {}  # the most calls of one step, so far
        self._by_call: dict[str, dict[int, list[Any]]] = {}  # name -> step -> values by call
        self._stop_now = False

    # --- called by the hooks -------------------------------------------------

    def on_output(self, site: SitePlan, output: Any) -> Any:
        """The module's output with the site's interventions applied (None: unchanged)."""
        split = primary_output(output)
        if split is None:
            if self.lenient:
                return None
            raise PurelensError(
                _NO_TENSOR.format(site=site.site, port="output", kind=type(output).__name__)
            )
        value, rebuild = split
        new = self._acting(self._apply, site, value)
        self._maybe_stop(site)
        return None if new is value else rebuild(new)

    def on_input(
        self, site: SitePlan, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        split = primary_input(args, kwargs)
        if split is None:
            if self.lenient:
                return None
            raise PurelensError(_NO_TENSOR.format(site=site.site, port="input", kind="no tensor"))
        value, rebuild = split
        new = self._acting(self._apply, site, value)
        self._maybe_stop(site)
        return None if new is value else rebuild(new)

    def on_port(self, site: SitePlan, value: Tensor) -> Tensor:
        """A value inside the module's forward (an attention port, an op) with the site's
        interventions applied, in the port's layout."""
        token = use_layout(layout_of(site.port))
        try:
            new = self._acting(self._apply, site, value)
        finally:
            reset_layout(token)
        self._maybe_stop(site)
        return new

    def on_skip(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bool, Any]:
        """Whether this pass skips `module` now, and the output it gets instead."""
        entry = self.plan.skips.get(id(module))
        if entry is None:
            return False, None
        call = self._count(id(module))
        position, skip = entry
        if not step_selected(skip.step, self.step) or not step_selected(skip.call, call):
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
                iv = next(iv for _, iv in site.entries if not isinstance(iv, Save | Stop))
                raise PurelensError(_CHECKPOINTED.format(what=repr(iv), site=site.site))
        self.ran.add(id(site))
        call = self._count(id(site))
        patch_grads: list[PatchGrad] = []
        save_grads: list[SaveGrad] = []
        for position, iv in site.entries:
            if iv.step is not None and not step_selected(iv.step, self.step):
                continue
            if iv.call is not None and not step_selected(iv.call, call):
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
        for module in self.plan.skip_modules:
            if self.plan.skips[id(module)][0] == position:
                return bool(self.most_calls.get(id(module)))
        return any(
            id(site) in self.ran
            for site in self.plan.sites
            if any(p == position for p, _ in site.entries)
        )

    def _most_calls(self, position: int) -> int:
        keys = [id(site) for site in self.plan.sites if any(p == position for p, _ in site.entries)]
        keys += [id(m) for m in self.plan.skip_modules if self.plan.skips[id(m)][0] == position]
        return max((self.most_calls.get(k, 0) for k in keys), default=0)

    def _calls_missed(self, position: int, iv: Intervention) -> bool:
        """Whether the site ran, but never at a call `iv` selects."""
        most = self._most_calls(position)
        return not any(step_selected(iv.call, c) for c in range(most))


def _calls_value(iv: Save, values: list[Any]) -> Any:
    """A save's values of one step: the value itself for ``call=k``, else a tuple by call."""
    return values[0] if is_int(iv.call) else tuple(values)

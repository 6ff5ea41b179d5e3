"""The plan of one call: its interventions resolved against the model, grouped by site.

A `Plan` is built from the interventions of one call: every site resolved
(a site with ``*``, once per match), grouped by module, port and op, and
checked (names saved twice, a module skipped twice, containers and
TorchScript modules that no hook can act on). It holds no state of the call
itself: that is the `Pass` (see `_pass`).

`Plan.cached` builds a plan once per model and *structure* (each
intervention's kind, site, name, and whether it runs code of the user's) and
then only binds each call's interventions to it (`_Template`): a plan depends
on nothing else. A template holds its modules weakly and none of the
interventions (their tensors and functions belong to the call), and is used
only while every module on the paths to its sites is still where it was and
no module anywhere gained a child nor a container changed length
(`tree_version`: a site's suffix may match anew). Training mode and parameters
are not part of a plan.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ._errors import PurelensError, SiteError
from ._grads import SaveGrad
from ._interventions import Intervention, Save, Skip, Stop
from ._site import ATTENTION_PORTS, Port, expand, parse_site, resolve, tree_unchanged, tree_version

__all__ = ["Plan", "SitePlan", "hookable"]

_DUPLICATE_NAME = (
    "two {kind} are named {name!r} ({first!r} and {second!r}).\n"
    "  Give one a different name: pl.{builder}(site, name='...')."
)
_EXTRA_PORT = (
    "site {site!r}: {path!r} is a value of generation, not a module, so it has no ports.\n"
    "  Write {path!r}."
)
_NAMED = {Save: ("saves", "save"), SaveGrad: ("save_grads", "save_grad")}
_TWO_SKIPS = "two pl.skip interventions on site {site!r}; a module can be skipped once."
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
    only_saves: bool = True  # whether the entries only read (then checkpointing is harmless)
    op: str | None = None  # an op site's op ("softmax.0"), acted on inside the module's forward
    inside: bool = False  # whether the value is inside the module's forward (a port, an op)
    # Whether the entries run none of the user's code (plain saves, stops): then they need
    # none of the context a function gets (`Pass._acting`).
    plain: bool = False


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
    def cached(cls, model: nn.Module, interventions: tuple[Intervention, ...]) -> Plan:
        """`Plan.build(model, interventions)`, from a template of the same structure when
        one is cached for `model` (see the module docstring)."""
        key = tuple([_shape(iv) for iv in interventions])
        if None in key:  # a site with '*' or a negative index: it may match anew each call
            return cls.build(model, interventions)
        with _cache_lock:
            templates = _templates.get(model)
            template = None if templates is None else templates.get(key)
            if template is not None:
                templates.move_to_end(key)  # type: ignore[union-attr]
        if template is not None:
            plan = template.bind(model, interventions)
            if plan is not None:
                return plan
        plan = cls.build(model, interventions)
        template = _Template(model, plan)
        with _cache_lock:
            templates = _templates.setdefault(model, OrderedDict())
            templates[key] = template
            if len(templates) > _MAX_TEMPLATES:
                templates.popitem(last=False)
        return plan

    @classmethod
    def build(
        cls,
        model: nn.Module,
        interventions: tuple[Intervention, ...],
        *,
        extra: Mapping[str, nn.Module] | None = None,
    ) -> Plan:
        """The plan of `interventions` on `model`.

        `extra` names sites that are not module paths of `model` (a backend's
        ``"logits"`` and ``"samples"``) and the modules that stand for them.
        """
        grouped: dict[tuple[str, Port, str | None], list[tuple[int, Intervention]]] = {}
        modules: dict[str, nn.Module] = {}
        first_site: dict[tuple[str, Port, str | None], str] = {}
        skips: dict[int, tuple[int, Skip]] = {}
        skip_modules: list[nn.Module] = []
        taken: dict[type, dict[str, str]] = {Save: {}, SaveGrad: {}}  # name -> site
        nodes: list[tuple[int, Intervention]] = []
        for i, given in enumerate(interventions):
            for iv, name, module, port, op in _targets(model, given, extra):
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
                all(isinstance(iv, Save | Stop) for _, iv in entries),
                op,
                op is not None or port in ATTENTION_PORTS,
                all(_plain(iv) for _, iv in entries),
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
    model: nn.Module, iv: Intervention, extra: Mapping[str, nn.Module] | None = None
) -> list[tuple[Intervention, str, nn.Module, Port, str | None]]:
    """Where `iv` acts: its site resolved, or for a site with '*' each match (a node each)."""
    parsed = parse_site(iv.site)
    if extra and parsed.path in extra:
        if parsed.port != "output" or parsed.op is not None:
            raise SiteError(_EXTRA_PORT.format(site=iv.site, path=parsed.path))
        return [(iv, parsed.path, extra[parsed.path], parsed.port, None)]
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


def _plain(iv: Intervention) -> bool:
    """Whether `iv` runs none of the user's code and selects no rows (see `SitePlan.plain`)."""
    return isinstance(iv, Stop) or (isinstance(iv, Save) and iv.fn is None and iv.batch is None)


def _shape(iv: Intervention) -> tuple[Any, ...] | None:
    """What of `iv` its plan depends on; None when its site may match differently from one
    call to the next (a ``*``, a negative index)."""
    site = iv.site
    if "*" in site or ".-" in site or site.startswith("-"):
        return None
    named = iv.name if isinstance(iv, Save | SaveGrad) else None
    return (type(iv), site, named, _plain(iv))


_EMPTY: Mapping[int, Any] = MappingProxyType({})  # no skips, or no sites inside modules
_MAX_TEMPLATES = 256  # structures per model, least recently used first out
_templates: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple[Any, ...], _Template]] = (
    weakref.WeakKeyDictionary()
)
_cache_lock = threading.Lock()


class _Template:
    """A plan without its interventions, its modules held weakly (see `Plan.cached`)."""

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        # Any module gaining a child anywhere may make a site's suffix match more than one
        # module; a removed or replaced one is seen by the links below.
        self.table = tree_version(model)
        sites = plan.sites
        self.sites = [
            (s.name, weakref.ref(s.module), s.port, s.site, tuple(i for i, _ in s.entries),
             (s.only_saves, s.op, s.inside, s.plain))
            for s in sites
        ]  # fmt: skip
        self.skips = [(weakref.ref(m), plan.skips[id(m)][0]) for m in plan.skip_modules]
        self.save_grads = [i for i, iv in enumerate(plan.interventions) if isinstance(iv, SaveGrad)]
        self.inside = any(s.inside for s in sites)
        # Each link of the paths to the plan's modules: (parent, child's name, child).
        links: dict[tuple[int, str], tuple[Any, str, Any]] = {}
        # A skip's own path, as its site resolved (a module may be at several paths).
        skipped = [resolve(model, plan.skips[id(m)][1].site)[0] for m in plan.skip_modules]
        names = [s.name for s in sites] + skipped
        for name in names:
            parent = model
            for part in name.split(".") if name else ():
                child = parent._modules[part]
                links[(id(parent), part)] = (weakref.ref(parent), part, weakref.ref(child))
                parent = child  # type: ignore[assignment]
        self.links = list(links.values())

    def bind(self, model: nn.Module, interventions: tuple[Intervention, ...]) -> Plan | None:
        """The plan of `interventions` (of this template's structure), or None when a module
        on its paths was replaced, moved or removed, or a module gained a child."""
        if not tree_unchanged(self.table):
            return None
        for parent_ref, part, child_ref in self.links:
            parent = parent_ref()
            if parent is None or parent._modules.get(part) is not child_ref():
                return None
        sites = []
        for name, ref, port, site, positions, rest in self.sites:
            module = ref()
            if module is None:
                return None
            entries = tuple([(i, interventions[i]) for i in positions])
            sites.append(SitePlan(name, module, port, site, entries, *rest))
        skips: dict[int, tuple[int, Skip]] = {}
        skip_modules = []
        for ref, i in self.skips:
            module = ref()
            if module is None:
                return None
            skips[id(module)] = (i, interventions[i])  # type: ignore[assignment]
            skip_modules.append(module)
        placed = tuple(sites)
        return Plan(
            interventions,
            placed,
            MappingProxyType(skips) if skips else _EMPTY,
            tuple(skip_modules),
            tuple(interventions[i] for i in self.save_grads),  # type: ignore[misc]
            tuple(enumerate(interventions)),
            _inside(placed) if self.inside else _EMPTY,
        )

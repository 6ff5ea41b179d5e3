"""The plan of one call: its interventions resolved against the model, grouped by site.

A `Plan` is built from the interventions of one call: every site resolved
(a site with ``*``, once per match), grouped by module, port and op, and
checked (names saved twice, a module skipped twice, containers and
TorchScript modules that no hook can act on). It holds no state of the call
itself: that is the `Pass` (see `_pass`).

`Plan.cached` builds the `Layout` of a plan (its sites, grouped and
checked) once per model and *structure* (each intervention's kind, site,
name, and whether it runs code of the user's): a later call of that
structure is the layout and the call's interventions, and nothing more is
done for it. A cached layout holds its modules weakly and none of the
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
from ._interventions import Ablate, Add, Intervention, Replace, Save, Scale, Skip, Stop, Transplant
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


# Not frozen: a frozen dataclass's __init__ costs a microsecond per field.
@dataclasses.dataclass(slots=True, eq=False)
class SitePlan:
    """The interventions on one (module, port), in the order they were given.

    A site plan is shared by every call of one structure (`Plan.cached`): it
    holds its module weakly and no intervention, only their places among the
    plan's `nodes` (`Plan.entries` gives them).
    """

    name: str
    ref: weakref.ReferenceType[nn.Module]
    port: Port
    site: str  # as the user first wrote it, for messages
    slots: tuple[int, ...]  # indices into the plan's nodes, in order
    only_saves: bool = True  # whether the entries only read (then checkpointing is harmless)
    op: str | None = None  # an op site's op ("softmax.0"), acted on inside the module's forward
    inside: bool = False  # whether the value is inside the module's forward (a port, an op)
    # Whether the entries only save whole values or stop (`_plain`).
    plain: bool = False
    # Whether the entries run none of the user's code and read nothing of the call's
    # context (`_bare`): then they need none of the context a function gets (`Pass._acting`).
    bare: bool = False

    @property
    def module(self) -> nn.Module:
        module = self.ref()
        if module is None:  # a plan is used only while its model holds its modules
            raise PurelensError(f"site {self.site!r}: its module no longer exists.")
        return module


@dataclasses.dataclass(slots=True, eq=False)
class Layout:
    """What a plan depends on only through its structure (see `Plan.cached`): its sites
    and skipped modules, held weakly, and where its interventions act."""

    sites: tuple[SitePlan, ...]
    skips: Mapping[int, int]  # id(module) -> index of its skip in the plan's nodes
    skipped: tuple[weakref.ReferenceType[nn.Module], ...]
    save_grads: tuple[int, ...]  # indices into the plan's nodes
    # id(module) -> its sites inside its forward, by port ("q", ...) or op ("#softmax.0")
    inside: Mapping[int, Mapping[str, SitePlan]]


class Plan:
    """Every intervention of one call, resolved against the model: the call's
    `interventions`, the `nodes` they act as (one per match of a site with '*', each with
    its position in the call's list), and the `Layout` of their structure."""

    __slots__ = ("inside", "interventions", "layout", "nodes", "sites", "skips")

    def __init__(
        self,
        interventions: tuple[Intervention, ...],
        nodes: tuple[tuple[int, Intervention], ...],
        layout: Layout,
    ) -> None:
        self.interventions = interventions
        self.nodes = nodes
        self.layout = layout
        self.sites = layout.sites
        self.skips = layout.skips
        self.inside = layout.inside

    def entries(self, site: SitePlan) -> tuple[tuple[int, Intervention], ...]:
        """The interventions at `site`, as (position in the call's list, node)."""
        nodes = self.nodes
        return tuple([nodes[k] for k in site.slots])

    def skip(self, module: nn.Module) -> tuple[int, Skip] | None:
        """The (position, node) of the skip of `module`, if the plan skips it."""
        k = self.skips.get(id(module))
        return None if k is None else self.nodes[k]  # type: ignore[return-value]

    @property
    def skip_modules(self) -> tuple[nn.Module, ...]:
        refs = self.layout.skipped
        return tuple(_alive(ref) for ref in refs) if refs else ()

    @property
    def save_grads(self) -> tuple[SaveGrad, ...]:
        slots = self.layout.save_grads
        return tuple(self.nodes[k][1] for k in slots) if slots else ()  # type: ignore[misc]

    @classmethod
    def cached(cls, model: nn.Module, interventions: tuple[Intervention, ...]) -> Plan:
        """`Plan.build(model, interventions)`, with the layout of a plan of the same
        structure when one is cached for `model` (see the module docstring)."""
        key = tuple([_shape(iv) for iv in interventions])
        if None in key:  # a site with '*' or a negative index: it may match anew each call
            return cls.build(model, interventions)
        entry = _templates.get(id(model))
        if entry is not None and entry[0]() is model:
            templates = entry[1]
            template = templates.get(key)
            if template is not None and template.holds():
                try:
                    templates.move_to_end(key)
                except KeyError:  # evicted by another thread meanwhile
                    pass
                return cls(interventions, tuple(enumerate(interventions)), template.layout)
        plan = cls.build(model, interventions)
        template = _Template(model, plan)
        with _cache_lock:
            entry = _templates.get(id(model))
            if entry is None or entry[0]() is not model:
                entry = _templates[id(model)] = (_forget_when_gone(model), OrderedDict())
            templates = entry[1]
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
        grouped: dict[tuple[str, Port, str | None], list[int]] = {}
        modules: dict[str, nn.Module] = {}
        first_site: dict[tuple[str, Port, str | None], str] = {}
        skips: dict[int, int] = {}
        skipped: list[nn.Module] = []
        taken: dict[type, dict[str, str]] = {Save: {}, SaveGrad: {}}  # name -> site
        nodes: list[tuple[int, Intervention]] = []
        for i, given in enumerate(interventions):
            for iv, name, module, port, op in _targets(model, given, extra):
                k = len(nodes)
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
                    skips[id(module)] = k
                    skipped.append(module)
                    continue
                key = (name, port, op)
                modules[name] = module
                first_site.setdefault(key, iv.site)
                grouped.setdefault(key, []).append(k)
        sites = tuple(
            SitePlan(
                name,
                weakref.ref(modules[name]),
                port,
                first_site[(name, port, op)],
                tuple(slots),
                all(isinstance(nodes[k][1], Save | Stop) for k in slots),
                op,
                op is not None or port in ATTENTION_PORTS,
                all(_plain(nodes[k][1]) for k in slots),
                all(_bare(nodes[k][1]) for k in slots),
            )
            for (name, port, op), slots in grouped.items()
        )
        layout = Layout(
            sites,
            MappingProxyType(skips) if skips else _EMPTY,
            tuple(weakref.ref(m) for m in skipped),
            tuple(k for k, (_, iv) in enumerate(nodes) if isinstance(iv, SaveGrad)),
            _inside(sites),
        )
        return cls(interventions, tuple(nodes), layout)


def _alive(ref: weakref.ReferenceType[nn.Module]) -> nn.Module:
    module = ref()
    if module is None:  # a plan is used only while its model holds its modules
        raise PurelensError("a module that pl.skip skips no longer exists.")
    return module


def _inside(sites: tuple[SitePlan, ...]) -> Mapping[int, Mapping[str, SitePlan]]:
    inside: dict[int, dict[str, SitePlan]] = {}
    for site in sites:
        if site.inside:
            key = site.port if site.op is None else f"#{site.op}"
            inside.setdefault(id(site.module), {})[key] = site
    return inside if inside else _EMPTY


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


# Interventions that compute from their own fields and the value alone.
_OWN_FIELDS_ONLY = (Add, Scale, Replace, Transplant, Stop)


def _bare(iv: Intervention) -> bool:
    """Whether `iv` runs none of the user's code and reads none of the context that
    `Pass._acting` sets (padding, active passes, replaced parameters): see `SitePlan.bare`.
    By exact type: a subclass may compute otherwise."""
    kind = type(iv)
    if kind is Save:
        return iv.fn is None  # type: ignore[attr-defined]
    if kind is Ablate:
        return iv.how == "zero"  # type: ignore[attr-defined]  # (a mean reads the padding)
    return kind in _OWN_FIELDS_ONLY


def _shape(iv: Intervention) -> tuple[Any, ...] | None:
    """What of `iv` its plan depends on; None when its site may match differently from one
    call to the next (a ``*``, a negative index).

    Kept in the node's ``__dict__`` once known, as `functools.cached_property` keeps a
    value (a node is frozen, and what this reads of it never changes): a sweep or a loop
    that reuses its nodes asks once.
    """
    kept = getattr(iv, "__dict__", None)
    if kept is None:  # a node with slots only (a user's own class): asked each time
        return _shape_of(iv)
    known = kept.get(_SHAPE, _UNKNOWN)
    if known is _UNKNOWN:
        known = kept[_SHAPE] = _shape_of(iv)
    return known  # type: ignore[no-any-return]


_SHAPE = "_purelens_plan_shape"
_UNKNOWN = object()


def _shape_of(iv: Intervention) -> tuple[Any, ...] | None:
    site = iv.site
    if "*" in site or ".-" in site or site.startswith("-"):
        return None
    named = iv.name if isinstance(iv, Save | SaveGrad) else None
    return (type(iv), site, named, _plain(iv), _bare(iv))


_EMPTY: Mapping[int, Any] = MappingProxyType({})  # no skips, or no sites inside modules
_MAX_TEMPLATES = 256  # structures per model, least recently used first out
# id(model) -> (a weak reference to it, its templates by structure); a plain dict, not a
# WeakKeyDictionary: a lookup makes no weak reference (the entry goes with its model).
_templates: dict[int, tuple[weakref.ReferenceType[nn.Module], OrderedDict[Any, _Template]]] = {}
_cache_lock = threading.Lock()


def _forget_when_gone(model: nn.Module) -> weakref.ReferenceType[nn.Module]:
    key = id(model)

    def forget(ref: weakref.ReferenceType[nn.Module]) -> None:
        # Without the lock: a collection may run this in a thread that holds it (inside
        # `Plan.cached`). Losing a race here drops another model's cache, nothing more.
        entry = _templates.get(key)
        if entry is not None and entry[0] is ref:
            _templates.pop(key, None)

    return weakref.ref(model, forget)


class _Template:
    """The layout of a cached plan, and what must still hold for it to be right (see
    `Plan.cached`)."""

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        self.layout = plan.layout
        # Any module gaining a child anywhere may make a site's suffix match more than one
        # module; a removed or replaced one is seen by the links below.
        self.table = tree_version(model)
        # Each link of the paths to the plan's modules: (parent, child's name, child).
        links: dict[tuple[int, str], tuple[Any, str, Any]] = {}
        # A skip's own path, as its site resolved (a module may be at several paths).
        skipped = [resolve(model, iv.site)[0] for _, iv in plan.nodes if isinstance(iv, Skip)]
        for name in [s.name for s in plan.sites] + skipped:
            parent = model
            for part in name.split(".") if name else ():
                child = parent._modules[part]
                links[(id(parent), part)] = (weakref.ref(parent), part, weakref.ref(child))
                parent = child  # type: ignore[assignment]
        self.links = list(links.values())

    def holds(self) -> bool:
        """Whether the layout is still right: no module on its paths was replaced, moved
        or removed, and no module gained a child."""
        if not tree_unchanged(self.table):
            return False
        for parent_ref, part, child_ref in self.links:
            parent, child = parent_ref(), child_ref()
            # (a child removed and collected: None is not None's child either)
            if parent is None or child is None or parent._modules.get(part) is not child:
                return False
        return True

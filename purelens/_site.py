"""Sites: parse ``"h.5:input"`` and resolve it against a module tree.

A site is ``PATH``, ``PATH:PORT`` or ``PATH#OP.N``. ``PATH`` matches a name
from ``model.named_modules()`` exactly, or else as a unique suffix on dot
boundaries; a negative component counts from the end of its container, and
a ``*`` component matches any one component (`expand` lists the matches).
``PORT`` is ``output`` (the default) or ``input``, or on an attention module
one of the attention ports (``q``, ``k``, ``v``, ``scores``, ``pattern``,
``z``, see `_attention`); ``#OP.N`` is the N-th call of torch operation OP
inside one call of PATH's own forward (see `_opsites`).

Resolutions are cached per model, so a run does not rescan the module tree,
and the cache never goes stale: torch calls a global registration hook
whenever a submodule is added or replaced anywhere (`append`, `setattr`,
``__setitem__``), which bumps a tree version that every table checks in
O(1); removals fire no hook, so each cached path is also checked to still
hold the module it resolved to (and a negative index, its container's
length) in O(depth).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import threading
import weakref
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from ._errors import SiteError

__all__ = [
    "ATTENTION_PORTS",
    "Site",
    "expand",
    "is_wildcard",
    "module_names",
    "parse_site",
    "path_of",
    "resolve",
    "tree_version",
]

Port = Literal["input", "output", "q", "k", "v", "scores", "pattern", "z"]
ATTENTION_PORTS: tuple[Port, ...] = ("q", "k", "v", "scores", "pattern", "z")
PORTS: tuple[Port, ...] = ("output", "input", *ATTENTION_PORTS)
_INDEXED = (nn.ModuleList, nn.Sequential)
_OP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[0-9]+")

_HELP = (
    "  Sites are dotted module paths (see purelens.sites(model)), optionally followed by "
    "':input' or ':output', an attention port (':q', ':k', ':v', ':scores', ':pattern', "
    "':z') or an op ('#softmax.0')."
)
_MALFORMED = "site {site!r} is malformed: {why}.\n" + _HELP
_NOT_A_STRING = "a site is a string such as 'h.1' or 'h.1:input', got {what}.\n" + _HELP
_A_MODULE = (
    "a site is a string, not the module itself: {found}.\n"
    "  purelens finds modules by path, so that interventions stay values (serializable, "
    "hashable, usable on any copy of the model)."
)
_UNKNOWN = "site {site!r} matches no module of {model}. Closest: {closest}.\n" + _HELP
_AMBIGUOUS = (
    "site {site!r} is ambiguous in {model}: it is a suffix of {matches}.\n"
    "  Write more of the path, e.g. {example!r}."
)
_WILD_CLASH = (
    "site {site!r} matches {first!r} and {second!r}, which fill its '*' alike ({filled!r}), "
    "so their values would have one name.\n  Write more of the path, e.g. {example!r}."
)
_NO_WILD_MATCH = (
    "site {site!r} matches no module of {model}: '*' stands for exactly one path "
    "component. Closest: {closest}.\n" + _HELP
)


class Site(NamedTuple):
    """A parsed site: the path as written, the port, and the op (``"softmax.0"``) or None."""

    path: str
    port: Port
    op: str | None = None


def parse_site(site: Any) -> Site:
    """Split ``"PATH:PORT"`` into a `Site`, checking its form (not the model).

    Raises:
        SiteError: if `site` is not a string or has an unknown port.
    """
    if not isinstance(site, str):
        raise SiteError(_not_a_string(site))
    parsed = _parsed.get(site)
    if parsed is None:
        parsed = _parse(site)
        if len(_parsed) >= 4096:  # a bound, for programs that make sites without end
            _parsed.clear()
        _parsed[site] = parsed
    return parsed


# A plain dict, not functools.lru_cache: dynamo traces it (builders inside compiled code).
_parsed: dict[str, Site] = {}


def _parse(site: str) -> Site:
    path, sep, port = site.partition(":")
    if not sep:
        port = "output"
    elif port not in PORTS:
        why = f"port {port!r} is not one of {', '.join(map(repr, PORTS))}"
        raise SiteError(_MALFORMED.format(site=site, why=why))
    path, hash_, op = path.partition("#")
    if hash_:
        if not _OP.fullmatch(op):
            why = (
                f"after '#' comes an op and its call number within the module, such as "
                f"'softmax.0', not {op!r}"
            )
            raise SiteError(_MALFORMED.format(site=site, why=why))
        if port != "output":
            why = "an op site is the op's result: it takes no port"
            raise SiteError(_MALFORMED.format(site=site, why=why))
    if "*" in path and any(part != "*" and "*" in part for part in path.split(".")):
        why = "'*' stands for one whole path component, as in 'h.*.attn'"
        raise SiteError(_MALFORMED.format(site=site, why=why))
    return Site(path, port, op if hash_ else None)  # type: ignore[arg-type]


def is_wildcard(site: str) -> bool:
    """Whether `site` has a ``*`` component (then `expand` resolves it)."""
    return "*" in parse_site(site).path


def _not_a_string(site: Any) -> str:
    if isinstance(site, nn.Module):
        return _A_MODULE.format(found=path_of(site))
    if isinstance(site, list | tuple) and site and all(isinstance(s, str) for s in site):
        what = (
            f"a {type(site).__name__} {site!r}; one intervention names one site, so build "
            f"one per site: [pl.save(s) for s in {site!r}]"
        )
        return _NOT_A_STRING.format(what=what)
    return _NOT_A_STRING.format(what=f"{type(site).__name__} {_short(site)}")


def path_of(module: nn.Module) -> str:
    """Where `module` is in the models purelens has seen, as advice for a site string."""
    kind = type(module).__name__
    with _tables_lock:
        models = list(_tables.keys())[-16:][::-1]  # the models used last, first
    for model in models:
        for name, candidate in model.named_modules(remove_duplicate=False):
            if candidate is module:
                return f"this {kind} is {name!r} in {type(model).__name__}: write {name!r}"
    return f"got a {kind}; write its path, e.g. one of [n for n, m in model.named_modules()]"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# The tree version: bumped by torch whenever a module of a model purelens has listed
# gains or replaces a child. Only those: a forward that slices a ModuleList
# (``self.layers[:n]``, CLIP's text encoder) makes a new container each call, whose
# children registering in it change no model's tree.
_version = 0
_listed: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the modules of listed models


def tree_version(model: nn.Module) -> object:
    """A token for `model`'s module tree: the same object until a module anywhere gains or
    replaces a child, or a ``ModuleList`` or ``Sequential`` of the model changes length
    (their ``insert``, ``pop`` and ``del`` write their children directly, which no hook
    sees). Compare tokens with ``is``."""
    return _table(model)


def tree_unchanged(token: object) -> bool:
    """Whether the module tree that `tree_version` gave `token` for is unchanged: as
    ``tree_version(model) is token``, without looking the model up."""
    return token.current()  # type: ignore[attr-defined, no-any-return]


def _on_registration(module: nn.Module, name: str, submodule: Any) -> None:
    global _version
    # Under dynamo every registration bumps: tracing ``in _listed`` would guard on each
    # listed module, and a compile fails when one is freed before its guards are built.
    if torch.compiler.is_compiling() or module in _listed:
        _version += 1


register_module_module_registration_hook(_on_registration)


@dataclasses.dataclass(frozen=True)
class _Resolved:
    """A cached resolution, and what must still hold for it to be right."""

    name: str
    module: weakref.ref[nn.Module]
    # (container, its length) for each negative index the path was resolved through
    lengths: tuple[tuple[weakref.ref[nn.Module], int], ...]

    def still_holds(self, model: nn.Module) -> nn.Module | None:
        try:
            module = model.get_submodule(self.name)
        except AttributeError:
            return None
        if module is not self.module():
            return None
        for container, length in self.lengths:
            held: Any = container()
            if held is None or len(held) != length:
                return None
        return module


class _Table:
    """The module names of one model and the paths already resolved against them."""

    def __init__(self, model: nn.Module) -> None:
        self.version = _version
        modules = list(model.named_modules(remove_duplicate=False))
        self.names = [name for name, _ in modules]
        for _, module in modules:
            _listed.add(module)
        self.resolved: dict[str, _Resolved] = {}
        self.containers = tuple(
            (weakref.ref(m), len(m._modules)) for m in model.modules() if isinstance(m, _DIRECT)
        )

    def current(self) -> bool:
        """Whether the model's tree is still the one this table lists."""
        if self.version != _version:
            return False
        for ref, length in self.containers:
            container = ref()
            if container is None or len(container._modules) != length:
                return False
        return True


# Containers whose insert, pop and del write `_modules` directly (no registration hook).
_DIRECT = (nn.ModuleList, nn.Sequential)


_tables: weakref.WeakKeyDictionary[nn.Module, _Table] = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def _table(model: nn.Module, fresh: bool = False) -> _Table:
    with _tables_lock:
        table = None if fresh else _tables.get(model)
        if table is None or not table.current():
            table = _tables[model] = _Table(model)
        return table


def _negative(want: str) -> bool:
    return want.startswith("-") and want[1:].isdigit()


def _matches(model: nn.Module, name: str, pattern: list[str]) -> bool:
    """Whether `pattern` is a dot-boundary suffix of `name`, with negative indices."""
    parts = name.split(".") if name else []
    if len(pattern) > len(parts):
        return False
    start = len(parts) - len(pattern)
    for i, want in enumerate(pattern):
        have = parts[start + i]
        if want == have or want == "*":
            continue
        if _negative(want) and have.isdigit():
            parent = model.get_submodule(".".join(parts[: start + i]))
            if isinstance(parent, _INDEXED) and int(have) == len(parent) + int(want):
                continue
        return False
    return True


def _closest(names: list[str], path: str) -> str:
    suffixes = {".".join(n.split(".")[-k:]) for n in names if n for k in range(1, 4)}
    close = difflib.get_close_matches(path, [n for n in names if n] + sorted(suffixes), n=4)
    if not close:  # nothing alike: show where the tree starts
        close = [n for n in names if n and "." not in n][:4]
    return ", ".join(repr(c) for c in dict.fromkeys(close)) or "(the model has no submodules)"


def _search(model: nn.Module, table: _Table, site: str, path: str) -> str:
    if path in table.names:
        return path
    pattern = path.split(".")
    found = [n for n in table.names if n and _matches(model, n, pattern)]
    found = list(dict.fromkeys(found))
    if len(found) == 1:
        return found[0]
    model_name = type(model).__name__
    if not found:
        raise SiteError(
            _UNKNOWN.format(site=site, model=model_name, closest=_closest(table.names, path))
        )
    raise SiteError(
        _AMBIGUOUS.format(
            site=site,
            model=model_name,
            matches=", ".join(repr(f) for f in found[:6]) + (", ..." if len(found) > 6 else ""),
            example=found[0],
        )
    )


def _lengths(model: nn.Module, name: str, path: str) -> tuple[tuple[Any, int], ...]:
    """The containers a negative index in `path` counted from, with their lengths now."""
    pattern = path.split(".")
    if not any(_negative(p) for p in pattern):
        return ()
    parts = name.split(".")
    start = len(parts) - len(pattern)
    out = []
    for i, want in enumerate(pattern):
        if _negative(want):
            parent: Any = model.get_submodule(".".join(parts[: start + i]))
            out.append((weakref.ref(parent), len(parent)))
    return tuple(out)


def resolve(model: nn.Module, site: str) -> tuple[str, nn.Module, Port]:
    """Resolve `site` against `model`: its full module name, the module and the port.

    Raises:
        SiteError: if the site is malformed, unknown or ambiguous.
    """
    path, port, _ = parse_site(site)
    table = _table(model)
    cached = table.resolved.get(path)
    if cached is not None:
        module = cached.still_holds(model)
        if module is not None:
            return cached.name, module, port
        # A module was removed or moved since the path was cached: scan the tree again.
        table = _table(model, fresh=True)
    name = _search(model, table, site, path)
    module = model.get_submodule(name)
    table.resolved[path] = _Resolved(name, weakref.ref(module), _lengths(model, name, path))
    return name, module, port


def expand(model: nn.Module, site: str) -> list[tuple[str, str, nn.Module, Port]]:
    """Every match of a site with ``*``: (the site with ``*`` filled in, name, module, port).

    ``"h.*.attn:pattern"`` gives ``("h.0.attn:pattern", "transformer.h.0.attn", ...)``
    and so on, in the model's order. Two matches that fill the site alike
    (``"layer.*"`` in an encoder and a decoder) are an error.

    Raises:
        SiteError: if nothing matches, or two matches fill the site alike.
    """
    path, port, _ = parse_site(site)
    table = _table(model)
    pattern = path.split(".")
    found = list(dict.fromkeys(n for n in table.names if n and _matches(model, n, pattern)))
    whole = [n for n in found if n.count(".") + 1 == len(pattern)]
    if whole:  # as for other sites, a whole path first ("*": the root's children)
        found = whole
    if not found:
        closest = _closest(table.names, path.replace("*", "0"))
        model_name = type(model).__name__
        raise SiteError(_NO_WILD_MATCH.format(site=site, model=model_name, closest=closest))
    out: list[tuple[str, str, nn.Module, Port]] = []
    seen: dict[str, str] = {}
    suffix = site[len(path) :]
    for name in found:
        parts = name.split(".")[-len(pattern) :]
        pairs = zip(pattern, parts, strict=True)
        filled = ".".join(have if want == "*" else want for want, have in pairs)
        if filled in seen:
            raise SiteError(
                _WILD_CLASH.format(
                    site=site, first=seen[filled], second=name, filled=filled, example=name
                )
            )
        seen[filled] = name
        out.append((filled + suffix, name, model.get_submodule(name), port))
    return out


def module_names(model: nn.Module) -> list[str]:
    """Every module path of `model`, ``""`` being the root, in the model's order."""
    return list(dict.fromkeys(_table(model).names))

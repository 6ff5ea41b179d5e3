"""Sites: parse ``"h.5:input"`` and resolve it against a module tree.

A site is ``PATH`` or ``PATH:PORT``. ``PATH`` matches a name from
``model.named_modules()`` exactly, or else as a unique suffix on dot
boundaries; a negative component counts from the end of its container. The
resolution of each path is cached per model, so a run does not rescan the
module tree.
"""

from __future__ import annotations

import difflib
import functools
import threading
import weakref
from typing import Literal, NamedTuple

from torch import nn

from ._errors import SiteError

__all__ = ["Site", "parse_site", "resolve", "sites"]

Port = Literal["input", "output"]
PORTS: tuple[Port, ...] = ("output", "input")
_INDEXED = (nn.ModuleList, nn.Sequential)

_HELP = (
    "  Sites are dotted module paths (see purelens.sites(model)), "
    "optionally followed by ':input' or ':output'."
)
_MALFORMED = "site {site!r} is malformed: {why}.\n" + _HELP
_UNKNOWN = "site {site!r} matches no module of {model}. Closest: {closest}.\n" + _HELP
_AMBIGUOUS = (
    "site {site!r} is ambiguous in {model}: it is a suffix of {matches}.\n"
    "  Write more of the path, e.g. {example!r}."
)


class Site(NamedTuple):
    """A parsed site: the path as written and the port."""

    path: str
    port: Port


@functools.lru_cache(maxsize=4096)
def parse_site(site: str) -> Site:
    """Split ``"PATH:PORT"`` into a `Site`, checking its form (not the model).

    Raises:
        SiteError: if `site` is not a string or has an unknown port.
    """
    if not isinstance(site, str):
        raise SiteError(_MALFORMED.format(site=site, why="a site is a string"))
    path, sep, port = site.partition(":")
    if not sep:
        return Site(path, "output")
    if port not in PORTS:
        why = f"port {port!r} is not one of {', '.join(map(repr, PORTS))}"
        raise SiteError(_MALFORMED.format(site=site, why=why))
    return Site(path, port)  # type: ignore[arg-type]


class _Table:
    """The module names of one model and the paths already resolved against them."""

    def __init__(self, model: nn.Module) -> None:
        self.names = [name for name, _ in model.named_modules(remove_duplicate=False)]
        self.resolved: dict[str, str] = {}
        self.fresh = True  # scanned for the current call: a miss is then real


_tables: weakref.WeakKeyDictionary[nn.Module, _Table] = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def _table(model: nn.Module, fresh: bool = False) -> _Table:
    with _tables_lock:
        table = None if fresh else _tables.get(model)
        if table is None:
            table = _tables[model] = _Table(model)
        else:
            table.fresh = False
        return table


def _matches(model: nn.Module, name: str, pattern: list[str]) -> bool:
    """Whether `pattern` is a dot-boundary suffix of `name`, with negative indices."""
    parts = name.split(".") if name else []
    if len(pattern) > len(parts):
        return False
    start = len(parts) - len(pattern)
    for i, want in enumerate(pattern):
        have = parts[start + i]
        if want == have:
            continue
        if want.startswith("-") and want[1:].isdigit() and have.isdigit():
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


def resolve(model: nn.Module, site: str) -> tuple[str, nn.Module, Port]:
    """Resolve `site` against `model`: its full module name, the module and the port.

    Raises:
        SiteError: if the site is malformed, unknown or ambiguous.
    """
    path, port = parse_site(site)
    table = _table(model)
    name = table.resolved.get(path)
    if name is not None:
        try:
            return name, model.get_submodule(name), port
        except AttributeError:
            # The module tree changed since the path was cached: scan it again.
            table = _table(model, fresh=True)
    try:
        name = _search(model, table, site, path)
    except SiteError:
        if table.fresh:
            raise
        # Modules may have been added since the tree was scanned: look again once.
        table = _table(model, fresh=True)
        name = _search(model, table, site, path)
    table.resolved[path] = name
    return name, model.get_submodule(name), port


def sites(model: nn.Module) -> list[str]:
    """Every addressable module path of `model` (local or `pl.remote`), ``""`` being the root.

    Each path can be used as a site as it is, or with ``":input"`` or
    ``":output"``; any unique dot-boundary suffix works too.

    Example:
        >>> import torch, purelens as pl
        >>> pl.sites(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        ['', '0', '1']
    """
    from ._remote import Remote

    if isinstance(model, Remote):
        return list(model.sites)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    return list(dict.fromkeys(_table(model, fresh=True).names))

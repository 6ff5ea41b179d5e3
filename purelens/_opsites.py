"""Op sites: ``"PATH#OP.N"``, the N-th call of torch operation OP in one call of PATH's forward.

A torch function mode, active while the module's own forward runs (see
`_hooks`), sees every torch operation; it numbers them by name, from 0 at
each call of the module, counting only the module's own code: while one of
its child modules runs (``c_proj``, say), `OWNER` names the child and the
mode lets its operations pass uncounted. Only operations that return
tensors are numbered (``x.size()`` is not).

Names are the operation's (``softmax``, ``matmul``, ``view``); operators
lose their underscores (``x + y`` is ``add``, ``x[i]`` is ``getitem``). The
numbering follows the code path, so it can change with the attention
implementation or the cache: list what a model does with
``pl.sites(model, ops=True)``, and prefer module sites and attention ports,
whose names do not depend on how the model's code is written.
"""

from __future__ import annotations

import contextvars
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._errors import PurelensError

__all__ = ["OWNER", "OpSurvey", "OpTaps", "op_name"]

# The module whose own code runs now (set around the forward of op-site modules and
# their children).
OWNER: contextvars.ContextVar[nn.Module | None] = contextvars.ContextVar(
    "purelens_owner", default=None
)

_IN_PLACE = (
    "site {site!r} is an in-place operation ({op}), which changes a tensor the model goes on "
    "using rather than making a value: it cannot be saved or replaced as a value.\n"
    "  Intervene on the operation before it, or on the module's output."
)
_TUPLE = (
    "site {site!r} is an operation that returns {kind}, not one tensor.\n"
    "  Intervene on an operation that uses its parts (e.g. the getitem that picks one)."
)
_IN_PLACE_DUNDERS = {
    f"__i{op}__"
    for op in ("add sub mul matmul truediv floordiv mod pow lshift rshift and or xor".split())
}


def op_name(func: Any) -> str | None:
    """The name an op site uses for `func` (``"softmax"``, ``"add"`` for ``+``)."""
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a tensor property (x.T, x.mT)
        name = getattr(getattr(func, "__self__", None), "__name__", None)
    if not isinstance(name, str) or not name:
        return None
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        return name[2:-2]
    return name


def _in_place(func: Any, name: str) -> bool:
    raw = getattr(func, "__name__", "")
    return raw in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))


def _numbered(result: Any) -> bool:
    if isinstance(result, Tensor):
        return True
    return isinstance(result, tuple | list) and bool(result) and isinstance(result[0], Tensor)


class OpTaps(TorchFunctionMode):
    """In one call of a module's forward: its own operations, numbered, with taps."""

    def __init__(self, module: nn.Module, taps: list[tuple[Any, Any]]) -> None:
        super().__init__()
        self.module, self.taps = module, taps
        self.counts: dict[str, int] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if OWNER.get() is not self.module or not _numbered(result):
            return result
        name = op_name(func)
        if name is None:
            return result
        n = self.counts.get(name, 0)
        self.counts[name] = n + 1
        key = f"#{name}.{n}"
        for pass_, sites in self.taps:
            site = sites.get(key)
            if site is None:
                continue
            if _in_place(func, name):
                raise PurelensError(_IN_PLACE.format(site=site.site, op=name))
            if not isinstance(result, Tensor):
                kind = f"a {type(result).__name__} of {len(result)}"
                raise PurelensError(_TUPLE.format(site=site.site, kind=kind))
            result = pass_.on_port(site, result)
        return result


class OpSurvey(TorchFunctionMode):
    """Lists the op sites of every module as a pass runs (for ``pl.sites(model, ops=True)``).

    `enter` and `leave` are called around each module's forward (by hooks on
    every module); numbering starts again at each call of a module.
    """

    def __init__(self, names: dict[nn.Module, str]) -> None:
        super().__init__()
        self.names = names
        self.stack: list[tuple[nn.Module, dict[str, int]]] = []
        self.found: dict[str, None] = {}  # ordered set of "PATH#OP.N"

    def enter(self, module: nn.Module) -> None:
        self.stack.append((module, {}))

    def leave(self, module: nn.Module) -> None:
        if self.stack and self.stack[-1][0] is module:
            self.stack.pop()

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        name = op_name(func)
        if self.stack and name is not None and _numbered(result):
            module, counts = self.stack[-1]
            n = counts.get(name, 0)
            counts[name] = n + 1
            path = self.names.get(module)
            if path is not None and not _in_place(func, name):
                self.found[f"{path}#{name}.{n}"] = None
        return result

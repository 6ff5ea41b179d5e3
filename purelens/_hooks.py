"""The only place that touches a model: hooks installed for one call, removed in `finally`.

Hooks are registered per call on the modules the plan names, and they act only
while their own pass is in the context variable `ACTIVE`. A run makes its pass
the only active one, so a run in another thread, or a run nested inside an
intervention's function, passes through hooks that are not its own untouched.
An edited module (`pl.edit`) adds its edits' pass to the active ones for the
length of its forward, with its hooks ahead of the run's: edits apply first.

`pl.skip` must keep a module from running at all, which no hook can do: the
module's ``forward`` is swapped for a dispatcher, shared by concurrent runs
(reference-counted under a lock) and restored when the last one ends. The
same dispatcher runs the forward of a module with sites inside it (op sites,
attention ports of a module that calls ``F.scaled_dot_product_attention``)
under the torch function modes that reach them, for the passes that name
them. Attention ports of HF modules go through transformers' attention
interface instead (see `_attention`).

A run's output hooks go ahead of hooks the module has already, so that those
(transformers' recorders of ``output_hidden_states``, a user's) see the value as
the run left it, whenever they were registered; its input hooks go after them,
nearest the forward. An edit is part of the model's function: its hooks go
ahead of every other (a run's, a user's), for inputs too.

Two exceptions to "for one call", both on modules purelens owns:
`check_before_every_module` puts permanent pre-hooks on the model `purelens
serve` loads, to stop a request that runs past its wall time, and
`hold_at_site` puts a `pl.compile` path clone's hooks on its copied modules.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._attention import SdpaTaps, switched, uses_interface
from ._budget import as_stop
from ._errors import PurelensError
from ._opsites import OWNER, OpTaps
from ._pass import ACTIVE, Pass
from ._plan import SitePlan
from ._primary import primary_input, primary_output
from ._skipped import check as check_skip

__all__ = [
    "ACTIVE",
    "ForwardDispatch",
    "around_forwards",
    "calling",
    "check_before_every_module",
    "for_a_run",
    "hold_at_site",
    "installed",
    "skip_of",
]

_SKIPPED_TWICE = (
    "the module is skipped twice, by {sites} (an edit's pl.skip and a run's, say); a module "
    "can be skipped once.\n  Give one pl.skip, with a function that does both."
)


def _output_hook(pass_: Pass, site: SitePlan) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if pass_ not in ACTIVE.get():
            return None
        return pass_.on_output(site, output)

    return hook


def _input_hook(pass_: Pass, site: SitePlan) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if pass_ not in ACTIVE.get():
            return None
        return pass_.on_input(site, args, kwargs)

    return hook


def _step_hook(pass_: Pass) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if pass_ in ACTIVE.get():
            pass_.begin_step()
            pass_.recording = torch.is_grad_enabled()

    return hook


class ForwardDispatch:
    """A module's ``forward`` while some pass may skip it or act inside it.

    With no active pass it is the original forward. Otherwise it skips the
    module if a pass says so, or runs the original forward under the modes
    that reach the sites inside it (op sites; attention ports of a module
    outside transformers' attention interface).
    """

    def __init__(self, module: nn.Module, original: Callable[..., Any]) -> None:
        self.module = module
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        active = ACTIVE.get()
        if not active:
            return self.original(*args, **kwargs)
        passes = tuple(reversed(active))
        module = self.module
        skipped, output = skip_of(passes, module, args, kwargs)
        if skipped:
            return output
        taps = [(p, sites) for p in passes if (sites := p.plan.inside.get(id(module)))]
        if not taps:
            return self.original(*args, **kwargs)
        ops = _split(taps, op=True)
        ports = [] if uses_interface(module) else _split(taps, op=False)
        token = OWNER.set(module)
        try:
            with contextlib.ExitStack() as modes:
                if ops:
                    modes.enter_context(OpTaps(module, ops))
                if ports:
                    modes.enter_context(SdpaTaps(module, ports))
                return self.original(*args, **kwargs)
        finally:
            OWNER.reset(token)


def _split(taps: list[tuple[Pass, Any]], *, op: bool) -> list[tuple[Pass, Any]]:
    """The op sites (or the attention ports) among each pass's sites inside a module."""
    out = []
    for p, sites in taps:
        mine = {key: site for key, site in sites.items() if key.startswith("#") == op}
        if mine:
            out.append((p, mine))
    return out


def _owner_hooks(module: nn.Module) -> list[Any]:
    """Hooks that make `module` the `OWNER` while its forward runs (a child of an op site's
    module: its operations are its own, not its parent's)."""
    tokens: list[Any] = []

    def enter(module: nn.Module) -> None:
        tokens.append(OWNER.set(module))

    def leave(module: nn.Module) -> None:
        if tokens:
            OWNER.reset(tokens.pop())

    return _around(module, enter, leave)


def _around(
    module: nn.Module, enter: Callable[[nn.Module], None], leave: Callable[[nn.Module], None]
) -> list[Any]:
    """Hooks calling `enter(module)` before its forward and `leave(module)` after, also when
    the forward raises."""
    return [
        _Attached(module, lambda m, a: enter(m), pre=True),
        _Attached(module, lambda m, a, o: leave(m), always_call=True),
    ]


def skip_of(
    passes: tuple[Pass, ...], module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bool, Any]:
    """Whether one of `passes` skips `module` now, and the output it gives; two is an error."""
    skips = [(p, p.on_skip(module, args, kwargs)) for p in passes]
    skipping = [(p, output) for p, (skipped, output) in skips if skipped]
    if len(skipping) > 1:
        raise PurelensError(
            _SKIPPED_TWICE.format(sites=[p.plan.skip(module)[1].site for p, _ in skipping])  # type: ignore[index]
        )
    if not skipping:
        return False, None
    pass_, output = skipping[0]
    check_skip(module, args, kwargs, output, pass_.plan.skip(module)[1])  # type: ignore[index]
    return True, output


class _Swap:
    """A module's ``forward`` replaced by a dispatcher, and how to restore it."""

    def __init__(self, module: nn.Module) -> None:
        self.users = 0
        self.had_own = "forward" in module.__dict__
        self.own = module.__dict__.get("forward")
        self.forward = ForwardDispatch(module, module.forward)

    def restore(self, module: nn.Module) -> None:
        if self.had_own:
            module.forward = self.own  # type: ignore[method-assign, assignment]
        else:
            del module.forward


_swaps: dict[int, _Swap] = {}
_swaps_lock = threading.Lock()


def _swap_in(module: nn.Module) -> None:
    with _swaps_lock:
        swap = _swaps.get(id(module))
        if swap is None:
            swap = _swaps[id(module)] = _Swap(module)
            module.forward = swap.forward  # type: ignore[method-assign]
        swap.users += 1


def _swap_out(module: nn.Module) -> None:
    with _swaps_lock:
        swap = _swaps[id(module)]
        swap.users -= 1
        if swap.users == 0:
            swap.restore(module)
            del _swaps[id(module)]


class installed:  # (a context manager, named as one: ``with installed(pass_):``)
    """Install the hooks of `pass_`'s plan and activate it, for one ``with`` block.

    A run's pass becomes the only active one; an edit's (``edit=True``) joins
    the active ones, its hooks ahead of those already there. A module whose
    ``forward`` applies its own sites (an edited module's) gets no hooks.
    (A class, not a generator: entering and leaving cost a run 1.5 us less.)
    """

    __slots__ = ("edit", "first", "handles", "interface", "pass_", "swapped", "token")

    def __init__(self, pass_: Pass, *, edit: bool = False) -> None:
        self.pass_ = pass_
        self.edit = edit

    def __enter__(self) -> None:
        pass_, edit = self.pass_, self.edit
        self.handles: list[_Attached] = []
        self.first: list[tuple[dict[int, Any], int]] = []  # output hooks: (hook dict, key)
        self.swapped: list[nn.Module] = []
        self.interface: contextlib.AbstractContextManager[None] | None = None
        pass_.recording = torch.is_grad_enabled()
        self.token = ACTIVE.set((*ACTIVE.get(), pass_) if edit else (pass_,))
        try:
            self._install(pass_, edit)
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _install(self, pass_: Pass, edit: bool) -> None:
        handles = self.handles
        plan = pass_.plan
        if pass_.multi_step:  # each call of the root module is one generation step
            handles.append(_Attached(pass_.model, _step_hook(pass_), pre=True, prepend=True))
        dispatched: dict[int, nn.Module] = (
            {id(m): m for m in plan.skip_modules} if plan.skips else {}
        )
        interface: list[SitePlan] = []  # attention ports reached through transformers
        first = self.first
        for site in plan.sites:
            module = site.module
            if _applies_own_sites(module):
                continue
            if site.inside:
                if site.op is None and uses_interface(module):
                    interface.append(site)
                elif id(module) not in dispatched:
                    dispatched[id(module)] = module
                    if site.op is not None:
                        for child in module.children():
                            handles.extend(_owner_hooks(child))
                continue
            if site.port == "input":
                hook = _input_hook(pass_, site)
                handles.append(_Attached(module, hook, pre=True, kwargs=True, prepend=edit))
            else:  # ahead of the module's own hooks (see the module docstring)
                key = next(_KEYS)  # (`_Attached(..., prepend=True)` inlined: the commonest hook)
                hooks: Any = module._forward_hooks
                hooks[key] = _output_hook(pass_, site)
                hooks.move_to_end(key, last=False)
                first.append((hooks, key))
        if not dispatched and not interface:
            return
        for module in dispatched.values():
            if _applies_own_sites(module):  # an edited module's forward skips it itself
                continue
            _swap_in(module)
            self.swapped.append(module)
        if interface:
            switch = switched(interface)
            switch.__enter__()
            self.interface = switch

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.interface is not None:
                self.interface.__exit__(None, None, None)
        finally:
            for hooks, key in self.first:
                hooks.pop(key, None)
            for handle in self.handles:
                handle.remove()
            for module in self.swapped:
                _swap_out(module)
            ACTIVE.reset(self.token)


@contextlib.contextmanager
def calling(
    modules: list[nn.Module], enter: Callable[[nn.Module], None], leave: Callable[[nn.Module], None]
) -> Iterator[None]:
    """`enter(module)` and `leave(module)` around every forward of `modules`, for one block."""
    handles = []
    try:
        for module in modules:
            handles.extend(_around(module, enter, leave))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def around_forwards(
    pre: dict[nn.Module, Callable[..., Any]], post: dict[nn.Module, Callable[..., Any]]
) -> Iterator[None]:
    """For one block, ``pre[m](m, args, kwargs)`` before each forward of `m` (it may
    return new ``(args, kwargs)``) and ``post[m](m, args, kwargs, output)`` after it
    (it may return a new output): the hooks of a backend that lays out several
    passes in one batch (vLLM), and of the values of generation (`_taps`)."""
    handles = []
    try:
        for module, fn in pre.items():
            handles.append(_Attached(module, fn, pre=True, kwargs=True))
        for module, fn in post.items():
            handles.append(_Attached(module, fn, kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# Keys of purelens's hooks in modules' hook dicts: torch's own handles count up from 0.
_KEYS = itertools.count(-1, -1)


class _Attached:
    """A hook put straight into a module's hook dicts for one call, as torch's
    ``register_forward_(pre_)hook`` would (the same dicts, order and flags), and taken
    out by `remove`: making and removing a `RemovableHandle` costs about 4 us, this
    about 0.5, and a run has one per site."""

    __slots__ = ("dicts", "key")

    def __init__(
        self,
        module: nn.Module,
        fn: Callable[..., Any],
        *,
        pre: bool = False,
        kwargs: bool = False,
        prepend: bool = False,
        always_call: bool = False,
    ) -> None:
        self.key = key = next(_KEYS)
        hooks: Any = module._forward_pre_hooks if pre else module._forward_hooks  # OrderedDicts
        hooks[key] = fn
        self.dicts: list[dict[int, Any]] = [hooks]
        if prepend:
            hooks.move_to_end(key, last=False)
        if kwargs:
            flags = (
                module._forward_pre_hooks_with_kwargs if pre else module._forward_hooks_with_kwargs
            )
            flags[key] = True
            self.dicts.append(flags)
        if always_call:
            module._forward_hooks_always_called[key] = True
            self.dicts.append(module._forward_hooks_always_called)

    def remove(self) -> None:
        for hooks in self.dicts:
            hooks.pop(self.key, None)


def for_a_run(key: Any) -> bool:
    """Whether a key of a module's hook dict is one of a run's hooks (`_Attached`)."""
    return isinstance(key, int) and key < 0


def hold_at_site(module: nn.Module, site: SitePlan, apply: Callable[[Tensor], Tensor]) -> None:
    """``apply(value)`` on the site's tensor at every forward of `module`, for good: only on
    a module purelens owns (a `pl.compile` path clone's copy). Its output hooks go ahead of
    the module's own, as a run's do."""

    if site.port == "input":

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            split = primary_input(args, kwargs)
            if split is None:
                raise PurelensError(f"site {site.site!r}: the module's input holds no tensor.")
            value, rebuild = split
            return rebuild(apply(value))

        module.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(module: nn.Module, args: Any, output: Any) -> Any:
            split = primary_output(output)
            if split is None:
                raise PurelensError(f"site {site.site!r}: the module's output holds no tensor.")
            value, rebuild = split
            return rebuild(apply(value))

        module.register_forward_hook(post, prepend=True)


def _applies_own_sites(module: nn.Module) -> bool:
    own = module.__dict__.get("forward")  # (None for almost every module: no getattr then)
    return own is not None and getattr(own, "applies_own_sites", False) is True


def check_before_every_module(model: nn.Module, check: Callable[[], None]) -> None:
    """Call `check()` before every module call of `model`, for good (it may raise).

    Only for a model purelens owns: the hooks are never removed.
    """

    def hook(module: nn.Module, args: Any) -> None:
        as_stop(check)  # a stop, which no handler takes for the model's own error

    for module in model.modules():
        module.register_forward_pre_hook(hook)

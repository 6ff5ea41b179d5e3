"""edit(): a module that always applies some interventions, sharing the original's weights.

The edited module is a shallow copy of the root: the same class (HF's
``generate``, ``config`` and friends keep working), the same submodules,
parameters and buffers (no weight is copied), but a root of its own, whose
``forward`` installs the edits' hooks for the length of each call. Between
calls nothing is left on the shared submodules, so the original runs as it
always did, also at the same time in another thread.

That ``forward`` is an `_EditForward`, an object rather than a closure, so
that it follows its module: ``copy.deepcopy(edited)`` copies it along (the
copy's edits act on the copy's modules), and edits on the root site itself
(``""``, ``":input"``) apply around the call, where no hook of the root's
own could act anymore.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from collections import OrderedDict
from typing import Any

from torch import nn

from ._backend import module_of
from ._errors import PurelensError
from ._grads import SaveGrad
from ._hooks import installed, skip_of
from ._inputs import padding_of
from ._interventions import Intervention, Save, Stop, flatten_interventions
from ._pass import ACTIVE, Pass
from ._plan import Plan, SitePlan
from ._remote import check_local

__all__ = ["edit"]

_NOT_AN_EDIT = (
    "{what} cannot be an edit: an edited module returns only its output, so there is "
    "nowhere to put saved values, and a stop would leave nothing to return.\n"
    "  Use pl.run(edited, x, [{builder}(...)]) on the edited module instead."
)
_ENCODER = (
    "  In generation, HF runs the encoder on its own (get_encoder()), outside the edited "
    "model's forward, so an edit inside the encoder cannot apply there: in pl.generate, "
    "give it as a run-time intervention with step=0 instead."
)
_STEP_IN_EDIT = (
    "{what}: edits apply at every forward call, so `step=` has no meaning there.\n"
    "  Select steps at run time: pl.generate(edited, x, [...step=...])."
)

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _check(iv: Intervention) -> None:
    if isinstance(iv, Save | SaveGrad | Stop):
        builder = {Save: "pl.save", SaveGrad: "pl.save_grad", Stop: "pl.stop"}[type(iv)]
        raise PurelensError(_NOT_AN_EDIT.format(what=repr(iv), builder=builder))
    if iv.step is not None:
        raise PurelensError(_STEP_IN_EDIT.format(what=repr(iv)))


class _EditForward:
    """The ``forward`` of an edited module: its edits, around the forward it had.

    The edited module's own sites (``""``, ``":input"``) take no hooks (they
    would act before or after this call, not inside it): this forward applies
    them, the edits' first and then those of the passes already active (the
    run's), in the order hooks would.
    """

    __slots__ = ("edits", "inner", "owner")
    applies_own_sites = True  # `installed` hooks no site on a module with this forward

    def __init__(self, owner: nn.Module, inner: Any, edits: tuple[Intervention, ...]) -> None:
        self.owner = owner  # the edited module
        self.inner = inner  # its forward before the edits; None: its class's
        self.edits = edits

    @property
    def __signature__(self) -> inspect.Signature:
        """The signature of the forward it wraps (HF's `generate` reads it to pass arguments)."""
        inner = self.inner
        if inner is None:
            inner = type(self.owner).forward.__get__(self.owner)
        return inspect.signature(inner)

    def rebound(self, owner: nn.Module) -> _EditForward:
        """The same edits on another module (a shallow copy of the owner)."""
        return _EditForward(owner, _rebound(self.inner, self.owner, owner), self.edits)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        pass_ = Pass(Plan.build(owner, self.edits), owner)
        pass_.padding = padding_of(args, kwargs)
        with installed(pass_, edit=True):
            passes = tuple(reversed(ACTIVE.get()))  # this edit's pass first, as with hooks
            for site, p in _own_sites(passes, owner, "input"):
                changed = p.on_input(site, args, kwargs)
                if changed is not None:
                    args, kwargs = changed
            skipped, output = skip_of(passes, owner, args, kwargs)
            if not skipped:
                inner = self.inner
                output = (
                    type(owner).forward(owner, *args, **kwargs)
                    if inner is None
                    else inner(*args, **kwargs)
                )
            for site, p in _own_sites(passes, owner, "output"):
                changed = p.on_output(site, output)
                if changed is not None:
                    output = changed
        try:
            pass_.check_finished()
        except PurelensError as error:
            if "encoder_outputs" in kwargs:
                raise PurelensError(f"{error}\n{_ENCODER}") from None
            raise
        return output


def _own_sites(
    passes: tuple[Pass, ...], owner: nn.Module, port: str
) -> list[tuple[SitePlan, Pass]]:
    return [
        (site, p)
        for p in passes
        for site in p.plan.sites
        if site.module is owner and site.port == port
    ]


def _rebound(forward: Any, old: nn.Module, new: nn.Module) -> Any:
    """`forward` (a module's own ``forward`` attribute) for `new`, where it was bound to `old`."""
    if isinstance(forward, _EditForward) and forward.owner is old:
        return forward.rebound(new)
    if isinstance(forward, types.MethodType) and forward.__self__ is old:
        return types.MethodType(forward.__func__, new)
    if isinstance(forward, functools.partial) and forward.args[:1] == (old,):
        return functools.partial(forward.func, new, *forward.args[1:], **forward.keywords)
    return forward


def edit(model: nn.Module, interventions: Any) -> nn.Module:
    """A new module that applies `interventions` on every forward; `model` is untouched.

    The edited module shares the original's parameters and submodules (no
    weight is copied), keeps its class and its site names (``"h.1"`` still
    resolves), and applies the edits in plain calls, `pl.run`, `pl.generate`
    and training. Run-time interventions apply after the edits, and edits
    compose: ``pl.edit(pl.edit(m, a), b)`` applies ``a`` then ``b``.
    ``edited.edits`` holds the interventions (a pytree) and ``edited.original``
    the module it was made from: "clearing" edits is using the original.
    ``copy.deepcopy(edited)`` is an edited copy (for an EMA or a reference
    model): its edits act on its own modules.

    Edits change values (``patch``, ``replace``, ``add``, ``scale``,
    ``ablate``, ``transplant``, ``skip``, ``patch_grad``), also at the root
    site (``""``, ``":input"``); saves, stops and ``step=`` belong to runs.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Identity())
        >>> edited = pl.edit(model, [pl.ablate("1")])
        >>> edited(torch.ones(1, 2))
        tensor([[0., 0.]])
        >>> x = torch.ones(1, 2)
        >>> torch.equal(model(x), model[0](x)), edited.original is model
        (True, True)
        >>> edited[0].weight is model[0].weight
        True
    """
    check_local(model, "pl.edit")
    model = module_of(model, "pl.edit")
    edits = flatten_interventions(interventions)
    for iv in edits:
        _check(iv)

    edited = copy.copy(model)
    # A root of its own: its own containers (adding a module to the edited one
    # leaves the original alone) and no hooks of the original's root.
    for name in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(edited, name, OrderedDict(getattr(model, name)))
    object.__setattr__(
        edited, "_non_persistent_buffers_set", set(model._non_persistent_buffers_set)
    )
    for name in _HOOK_DICTS:
        if name in model.__dict__:
            object.__setattr__(edited, name, OrderedDict())
    inner = _rebound(model.__dict__.get("forward"), model, edited)
    every = edits
    if isinstance(inner, _EditForward):  # an edit of an edited module: one forward, in order
        inner, every = inner.inner, inner.edits + edits
    Plan.build(edited, every)  # a bad site fails here, not at the first call
    object.__setattr__(edited, "forward", _EditForward(edited, inner, every))
    object.__setattr__(edited, "edits", edits)
    object.__setattr__(edited, "original", model)
    return edited

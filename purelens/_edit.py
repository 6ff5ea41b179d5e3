"""edit(): a module that always applies some interventions, sharing the original's weights.

The edited module is a shallow copy of the root: the same class (HF's
``generate``, ``config`` and friends keep working), the same submodules,
parameters and buffers (no weight is copied), but a root of its own, whose
``forward`` installs the edits' hooks for the length of each call. Between
calls nothing is left on the shared submodules, so the original runs as it
always did, also at the same time in another thread.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

from torch import nn

from ._errors import PurelensError
from ._grads import SaveGrad
from ._hooks import installed
from ._interventions import Intervention, Save, Stop, flatten_interventions
from ._pass import Pass, Plan
from ._remote import check_local

__all__ = ["edit"]

_NOT_AN_EDIT = (
    "{what} cannot be an edit: an edited module returns only its output, so there is "
    "nowhere to put saved values, and a stop would leave nothing to return.\n"
    "  Use pl.run(edited, x, [{builder}(...)]) on the edited module instead."
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


def edit(model: nn.Module, interventions: Any) -> nn.Module:
    """A new module that applies `interventions` on every forward; `model` is untouched.

    The edited module shares the original's parameters and submodules (no
    weight is copied), keeps its class and its site names (``"h.1"`` still
    resolves), and applies the edits in plain calls, `pl.run`, `pl.generate`
    and training. Run-time interventions apply after the edits, and edits
    compose: ``pl.edit(pl.edit(m, a), b)`` applies ``a`` then ``b``.
    ``edited.edits`` holds the interventions (a pytree) and ``edited.original``
    the module it was made from: "clearing" edits is using the original.

    Edits change values (``patch``, ``replace``, ``add``, ``scale``,
    ``ablate``, ``transplant``, ``skip``, ``patch_grad``); saves, stops and
    ``step=`` belong to runs.

    Example:
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
    if not isinstance(model, nn.Module):
        raise PurelensError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
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
    inner_forward = model.__dict__.get("forward") or type(model).forward.__get__(edited)
    plan = Plan.build(edited, edits)  # a site "" is the edited root itself

    def forward(*args: Any, **kwargs: Any) -> Any:
        pass_ = Pass(plan, edited)
        with installed(pass_, edit=True):
            output = inner_forward(*args, **kwargs)
        pass_.check_finished()
        return output

    object.__setattr__(edited, "forward", forward)
    object.__setattr__(edited, "edits", edits)
    object.__setattr__(edited, "original", model)
    return edited

"""A path clone of a model for `pl.compile`, and what must hold for it to act as the model.

A path clone is a shallow copy of the model whose modules on the paths from the
root to some sites are copies with hook dicts of their own; every parameter,
buffer and other module is the model's. It acts as the model while no module
on those paths is used at several places, has a forward of its own or keeps
modules outside ``_modules`` (`unclonable`), while the copied modules'
attributes and children are the model's (`_Copied.holds`), and while the model
has no hooks a clone would skip (`has_hooks`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

from torch import nn

from ._edit import _HOOK_DICTS  # every hook dict a module has
from ._errors import PurelensError
from ._hooks import for_a_run
from ._plan import Plan

__all__ = ["has_hooks", "path_clone", "unclonable"]


def has_hooks(model: nn.Module) -> bool:
    """Whether torch has global module hooks or a module of `model` has hooks a clone
    would skip: any but a run's own and transformers' recorders (`_kept`)."""
    from torch.nn.modules import module as torch_module

    global_hooks = (
        torch_module._global_forward_hooks,
        torch_module._global_forward_pre_hooks,
        torch_module._global_backward_hooks,
        torch_module._global_backward_pre_hooks,
    )
    if any(global_hooks):
        return True
    for module in model.modules():
        for name in _CALLED:
            hooks = getattr(module, name, None)
            if hooks and any(not _kept(k, fn) for k, fn in hooks.items()):
                return True
    return False


_CALLED = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _kept(key: Any, hook: Any) -> bool:
    """Whether a clone may leave `hook` as it is: purelens's own for a run (negative keys,
    see `_hooks`: they act for their run only) or a permanent hook (`_permanent`)."""
    return for_a_run(key) or _permanent(hook)


def _permanent(hook: Any) -> bool:
    """transformers' recorders of ``output_hidden_states`` and attentions: added once on
    first use and never removed, and written to compile; a clone's copies keep them."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def unclonable(model: nn.Module, plan: Plan) -> str | None:
    """Why a path clone of `plan`'s sites would not act as the model does, or None."""
    uses: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    for site in plan.sites:
        module = model
        for part in [""] + (site.name.split(".") if site.name else []):
            if part:
                module = module._modules[part]  # type: ignore[assignment]
            if uses.get(id(module), 0) > 1:
                return (
                    "a module on the way to a site is used at more than one place (shared or "
                    "tied), and a clone would intervene at one of them"
                )
            if "forward" in module.__dict__:
                return (
                    "a module on the way to a site runs a forward of its own (pl.edit, "
                    "accelerate's hooks), which a clone cannot intervene in"
                )
            for name, value in module.__dict__.items():
                if name == "_modules":
                    continue
                items = value.values() if isinstance(value, dict) else value
                if isinstance(value, list | tuple | dict) and any(
                    isinstance(v, nn.Module) for v in items
                ):
                    return (
                        "a module on the way to a site keeps modules in a plain list or dict, "
                        "which a clone would not see"
                    )
    return None


_OWN = frozenset(("_modules", "training", *_HOOK_DICTS))  # what a copy does not share
_MISSING = object()


class _Copied:
    """A module of the model and its copy in a path clone, with what the copy took from
    it: while the module's attributes (but its training flag) and children are the same
    objects, the copy is right (`holds`)."""

    def __init__(self, original: nn.Module) -> None:
        self.original = original
        self.copy = mine = copy.copy(original)
        mine.__dict__["_modules"] = OrderedDict(original._modules)
        for name in _HOOK_DICTS:
            if name in original.__dict__:
                mine.__dict__[name] = OrderedDict()
        for key, hook in original._forward_hooks.items():  # transformers' recorders
            if _permanent(hook):
                mine._forward_hooks[key] = hook
                for flags in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                    if key in original.__dict__.get(flags, {}):
                        mine.__dict__[flags][key] = True
        self.size = len(original.__dict__)
        self.shared = tuple((k, v) for k, v in original.__dict__.items() if k not in _OWN)
        self.children = tuple(original._modules.items())
        self._snapshot()

    def _snapshot(self) -> None:
        # The ids of every attribute and child, of both: compared at C speed on each call
        # (the objects are held in `shared` and `children`, so the ids stay theirs).
        self.ids = (
            tuple(map(id, self.original.__dict__.values())),
            tuple(map(id, self.original._modules.values())),
        )
        self.copy_ids = tuple(map(id, self.copy.__dict__.values()))

    def holds(self) -> bool:
        """Whether the copy is still right, its training flag made the original's."""
        original = self.original
        if (
            tuple(map(id, original.__dict__.values())),
            tuple(map(id, original._modules.values())),
        ) == self.ids:
            return True
        attributes = original.__dict__
        if len(attributes) != self.size:
            return False
        for key, value in self.shared:
            if attributes.get(key) is not value:
                return False
        children = self.original._modules
        if len(children) != len(self.children):
            return False
        for name, child in self.children:
            if children.get(name) is not child:
                return False
        if self.copy.training is not self.original.training:
            self.copy.training = self.original.training
        self._snapshot()
        return True

    def write_back(self) -> None:
        """Attributes the forward set on the copy (``self.last = ...``), set on the
        original as an eager call would have."""
        mine = self.copy.__dict__
        if tuple(map(id, mine.values())) == self.copy_ids:
            return
        if len(mine) == self.size and all(mine.get(k) is v for k, v in self.shared):
            self._snapshot()
            return
        attributes = self.original.__dict__
        for key, value in list(mine.items()):
            if key not in _OWN and attributes.get(key, _MISSING) is not value:
                attributes[key] = value
        self.size = len(attributes)
        self.shared = tuple((k, v) for k, v in attributes.items() if k not in _OWN)
        self._snapshot()


def path_clone(model: nn.Module, names: list[str]) -> tuple[nn.Module, dict[str, _Copied]]:
    """A shallow copy of `model` whose modules on the paths to `names` are copies with hook
    dicts of their own (every other module, parameter and buffer is the model's), and the
    copies by path."""
    made: dict[int, _Copied] = {}

    def copied(module: nn.Module) -> _Copied:
        entry = made.get(id(module))
        if entry is None:
            entry = made[id(module)] = _Copied(module)
        return entry

    root = copied(model)
    by_path: dict[str, _Copied] = {"": root}
    for name in names:
        parent, path = root, ""
        for part in name.split(".") if name else ():
            child = parent.original._modules[part]
            if child is None:
                raise PurelensError(f"site {name!r}: the module at {part!r} is None.")
            entry = copied(child)
            parent.copy._modules[part] = entry.copy
            path = f"{path}.{part}" if path else part
            by_path[path] = parent = entry
    return root.copy, by_path

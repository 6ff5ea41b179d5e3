"""pl.compile: a handle on which `pl.run` runs interventions at compiled speed.

Hooks and `torch.compile` do not mix: dynamo does not guard hooks added after
a model was compiled (they are silently skipped), and hooks cannot be added
inside a compiled region. So a handle compiles, once per intervention
*structure* (node kinds, sites, functions by identity, names, selectors: what
`_tree.structure` keys), a function of its own over a **path clone** of the
model: a shallow copy of the modules on the paths from the root to the
structure's sites, with hooks of their own that stay for the clone's lifetime,
and every parameter, buffer and other module shared with the model. The
user's model never gets a hook. The hooks read the call's interventions from
the compiled function's argument, so their tensors (steering vectors,
factors; Python numbers are made tensors first) are graph inputs: new ones
reuse the compiled code. Each structure's function has a code object of its
own, since dynamo's recompile limit is per code object.

The first call of a structure runs eagerly (`pl.run` on the model: purelens's
own errors, and its result), then runs the clone eagerly once to check that
every hook fires (a forward bound to the original module, as `pl.edit` and
accelerate make, would bypass the clone). What the clone cannot do (`stop`,
`skip`, gradients of sites, `step=`/`call=`, attention ports and op sites,
`params=`, `loss=`, a model with hooks of its own, a batch with padding) runs as
eager `pl.run`,
with a warning once per handle and reason. Before each compiled call the
handle checks that the paths still lead to the same modules (a replaced
submodule or a rebound attribute of a copied module builds anew), copies the
modules' training flags, and looks for
hooks added anywhere in the model since (they would be skipped: that call runs
eagerly).
"""

from __future__ import annotations

import copy
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._errors import PurelensError, PurelensWarning
from ._grads import PatchGrad, SaveGrad
from ._inputs import call_arguments, padding_of
from ._interventions import Add, Intervention, Save, Scale, Skip, Stop, Writer
from ._plan import Plan, SitePlan
from ._primary import primary_input, primary_output
from ._record import Record
from ._tree import structure

__all__ = ["Compiled", "compile"]

_MAX_STRUCTURES = 64  # per handle, least recently used first out
_NEW_FUNCTIONS = 4  # structures that differ in function objects only, before a warning
_MAX_REBUILDS = 4  # clones of one structure made anew because the model changed

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_FALLBACK = "pl.compile: {why}, so pl.run runs such calls eagerly (as pl.run on the model)."
_NOT_A_MODULE = "pl.compile takes a torch.nn.Module, got {kind}."
_FRESH_FUNCTIONS = (
    "pl.compile: calls keep bringing new function objects (lambdas or pl.at made anew each "
    "call), and each is a new structure that compiles anew.\n"
    "  Define the function once and reuse it, or give the values as tensors (pl.add, "
    "pl.replace, pl.scale, pl.at with tensors): new tensors reuse the compiled code."
)


def compile(model: nn.Module, **compile_kwargs: Any) -> Compiled:
    """A handle on `model` that `pl.run` runs interventions on at compiled speed.

    Compiled once per intervention structure (node kinds, sites, functions,
    names, selectors); calls with new tensors in the same structure (a sweep
    of steering vectors) reuse the compiled code. The model itself is not
    changed and never gets a hook. The first call of each structure runs
    eagerly and checks the structure (purelens's own errors); what cannot
    be compiled runs eagerly, with a warning once.

    Args:
        model: any `torch.nn.Module` (a `torch.compile`-d one is unwrapped).
        **compile_kwargs: `torch.compile`'s arguments (``backend=``,
            ``mode=``, ``dynamic=``, ...).

    Returns:
        A `Compiled` handle; ``handle.model`` is the model.

    Example:
        >>> import torch, purelens as pl
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> cm = pl.compile(model, backend="eager")
        >>> x = torch.ones(5, 3)
        >>> for v in torch.randn(3, 4):  # one structure: compiled once
        ...     rec = pl.run(cm, x, [pl.add("0", v), pl.save("1")])
        >>> torch.allclose(rec.output, pl.run(model, x, [pl.add("0", v)]).output)
        True
    """
    return Compiled(model, **compile_kwargs)


class Compiled:
    """What `pl.compile` returns: a model and its compiled structures (see the module
    docstring). Thread-safe; it holds at most 64 structures."""

    def __init__(self, model: nn.Module, **compile_kwargs: Any) -> None:
        from ._eager import unwrapped

        model = unwrapped(model)
        if not isinstance(model, nn.Module):
            raise PurelensError(_NOT_A_MODULE.format(kind=type(model).__name__))
        self.model = model
        self._kwargs = compile_kwargs
        self._structures: OrderedDict[Hashable, _Traced | str] = OrderedDict()
        self._families: dict[Hashable, int] = {}  # structure without functions -> count
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._made = 0  # structures compiled, to name their code objects

    def __repr__(self) -> str:
        return f"pl.compile({type(self.model).__name__}, {len(self._structures)} structures)"

    def run(
        self,
        inputs: Any,
        interventions: tuple[Intervention, ...],
        *,
        params: Mapping[str, Tensor] | None,
        loss: Any,
        tokenizer: Any,
        validate: bool,
        model_kwargs: dict[str, Any],
    ) -> Record:
        """`pl.run` on this handle (`pl.run` calls it)."""
        from ._run import run

        def eager() -> Record:
            return run(
                self.model,
                inputs,
                interventions,
                params=params,
                loss=loss,
                tokenizer=tokenizer,
                validate=validate,
                **model_kwargs,
            )

        given = [name for name, v in (("params=", params), ("loss=", loss)) if v is not None]
        if given or validate:
            self._warn(f"{' and '.join(given) or 'validate=True'} is not compiled")
            return eager()
        key = structure(interventions, functions=True)
        if key is None:
            self._warn("these interventions hold values that cannot key a cache")
            return eager()
        with self._lock:
            traced = self._structures.get(key)
            if traced is not None:
                self._structures.move_to_end(key)
        if isinstance(traced, str):
            self._warn(traced)
            return eager()
        if traced is not None and traced.holds():
            args, kwargs = call_arguments(inputs, tokenizer, model_kwargs, self.model)
            real = padding_of(args, kwargs)
            if real is not None and not bool(real.all()):
                # What knows padding (pl.at, mean ablation) reads it from the pass.
                self._warn("batches with padding (an attention mask with zeros) are not compiled")
                return eager()
            if not _hooks_since(self.model, traced):
                return traced(args, kwargs, interventions)
            self._warn("the model has hooks of its own (the clone would skip them)")
            return eager()
        record = eager()  # the structure's first call: purelens's own checks, and its result
        args, kwargs = call_arguments(inputs, tokenizer, model_kwargs, self.model)
        built: _Traced | str
        if traced is not None and traced.builds >= _MAX_REBUILDS:
            built = "the model's modules keep changing (attributes rebound, children replaced)"
        else:
            built = self._build(interventions, args, kwargs)
            if traced is not None and not isinstance(built, str):
                built.builds = traced.builds + 1
        with self._lock:
            self._structures[key] = built
            if len(self._structures) > _MAX_STRUCTURES:
                self._structures.popitem(last=False)
        if isinstance(built, str):
            self._warn(built)
        elif traced is None:
            self._count_family(interventions)
        return record

    def _build(
        self, ivs: tuple[Intervention, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _Traced | str:
        plan = Plan.build(self.model, ivs)
        why = _unsupported(plan)
        if why is None:
            why = _has_hooks(self.model)
        if why is not None:
            return why
        with self._lock:
            self._made += 1
            number = self._made
        traced = _Traced(self.model, plan, number, self._kwargs)
        if not traced.fires(args, kwargs, ivs):
            return (
                "a module on the way to a site runs a forward of its own (pl.edit, "
                "accelerate's hooks), which a clone cannot intervene in"
            )
        return traced

    def _count_family(self, ivs: tuple[Intervention, ...]) -> None:
        family = structure(ivs, functions=False, code=True)
        if family is None:
            return
        with self._lock:
            self._families[family] = count = self._families.get(family, 0) + 1
            if len(self._families) > 4 * _MAX_STRUCTURES:
                self._families.clear()
        if count == _NEW_FUNCTIONS:
            warnings.warn(_FRESH_FUNCTIONS, PurelensWarning, stacklevel=5)

    def _warn(self, why: str) -> None:
        with self._lock:
            if why in self._warned:
                return
            self._warned.add(why)
        warnings.warn(_FALLBACK.format(why=why), PurelensWarning, stacklevel=5)


def _unsupported(plan: Plan) -> str | None:
    """Why the clone cannot run `plan`, or None."""
    if plan.skip_modules:
        return "pl.skip is not compiled"
    for iv in plan.interventions:
        if isinstance(iv, Stop | Skip):
            return f"pl.{type(iv).__name__.lower()} is not compiled"
        if isinstance(iv, SaveGrad | PatchGrad):
            return "gradients of sites (save_grad, patch_grad) are not compiled"
        if iv.step is not None or iv.call is not None:
            return "step= and call= are not compiled"
    for site in plan.sites:
        if site.inside:
            return "attention ports and op sites are not compiled"
    return None


def _has_hooks(model: nn.Module) -> str | None:
    from torch.nn.modules import module as torch_module

    global_hooks = (
        torch_module._global_forward_hooks,
        torch_module._global_forward_pre_hooks,
        torch_module._global_backward_hooks,
        torch_module._global_backward_pre_hooks,
    )
    if any(global_hooks):
        return "torch has global module hooks (the clone would skip them)"
    for module in model.modules():
        if any(getattr(module, name, None) for name in _HOOK_DICTS):
            return "the model has hooks of its own (the clone would skip them)"
    return None


def _hooks_since(model: nn.Module, traced: _Traced) -> bool:
    """Whether hooks were added to `model` (or globally) since `traced` last looked.

    Every hook torch registers anywhere takes a number from one counter, so the
    model is searched only when that counter moved (purelens's own eager runs move it).
    """
    now = RemovableHandle.next_id
    if now == traced.hooks_seen:
        return False
    if _has_hooks(model) is not None:
        return True  # looked for again next call: purelens's hooks of another run go
    traced.hooks_seen = now
    return False


class _State:
    """What the clone's hooks read: the call's interventions, and what they saved."""

    def __init__(self) -> None:
        self.nodes: tuple[Intervention, ...] | None = None
        self.saved: dict[str, Any] | None = None
        self.fired: set[int] | None = None  # while checking: the sites whose hooks ran


class _Traced:
    """One structure on a path clone, compiled (see the module docstring)."""

    def __init__(self, model: nn.Module, plan: Plan, number: int, kwargs: dict[str, Any]) -> None:
        self.lock = threading.Lock()
        self.builds = 1
        self.hooks_seen = RemovableHandle.next_id
        self.state = state = _State()
        self.clone, self.copies = _path_clone(model, [s.name for s in plan.sites])
        self.checked = list({id(c): c for c in self.copies.values()}.values())
        self.sites = len(plan.sites)
        for index, site in enumerate(plan.sites):
            _hook(self.copies[site.name].copy, site, index, state)
        clone = self.clone

        def body(args: tuple[Any, ...], kwargs: dict[str, Any], nodes: Any) -> Any:
            state.nodes = nodes
            state.saved = {}
            output = clone(*args, **kwargs)
            saved = state.saved
            state.nodes = state.saved = None
            return output, saved

        # Dynamo's cache and its recompile limit are per code object: one per structure.
        code = body.__code__.replace(co_name=f"purelens_structure_{number}")
        own = types.FunctionType(code, body.__globals__, code.co_name, None, body.__closure__)
        self.eager = own
        self.compiled = torch.compile(own, **kwargs)

    def holds(self) -> bool:
        """Whether the clone is still right for the model (see `_Copied.holds`)."""
        return all(entry.holds() for entry in self.checked)

    def fires(self, args: tuple[Any, ...], kwargs: dict[str, Any], ivs: Any) -> bool:
        """Run the clone eagerly once (the random state put back after): whether every
        site's hook ran."""
        state = self.state
        state.fired = set()
        devices = sorted({p.device.index or 0 for p in self.clone.parameters() if p.is_cuda})
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                self.eager(args, kwargs, _as_tensors(ivs))
            return len(state.fired) == self.sites
        except Exception:
            return False
        finally:
            state.fired = None
            state.nodes = state.saved = None

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any], ivs: Any) -> Record:
        nodes = _as_tensors(ivs)
        with self.lock:  # one call at a time: the hooks share the state between them
            output, saved = self.compiled(args, kwargs, nodes)
        return Record(saved, output)


def _hook(module: nn.Module, site: SitePlan, index: int, state: _State) -> None:
    entries = tuple(site.entries)

    def apply(value: Tensor) -> Tensor:
        nodes = state.nodes
        saved = state.saved
        assert nodes is not None and saved is not None
        if state.fired is not None:
            state.fired.add(index)
        for position, _ in entries:
            iv = nodes[position]
            if isinstance(iv, Writer):
                value = iv.write(value, saved)
            elif isinstance(iv, Save):
                saved[iv.name] = iv.record(value)
        return value

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

        module.register_forward_hook(post)


_OWN = frozenset(("_modules", "training", *_HOOK_DICTS))  # what a copy does not share


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
        self.size = len(original.__dict__)
        self.shared = tuple((k, v) for k, v in original.__dict__.items() if k not in _OWN)
        self.children = tuple(original._modules.items())

    def holds(self) -> bool:
        """Whether the copy is still right, its training flag made the original's."""
        attributes = self.original.__dict__
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
        return True


def _path_clone(model: nn.Module, names: list[str]) -> tuple[nn.Module, dict[str, _Copied]]:
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


def _as_tensors(ivs: tuple[Intervention, ...]) -> tuple[Intervention, ...]:
    """`ivs` with the Python numbers of `pl.add` and `pl.scale` made tensors, as those
    builders make them (`torch.as_tensor`), so that a new number does not recompile."""
    out = list(ivs)
    for i, iv in enumerate(ivs):
        name = "delta" if isinstance(iv, Add) else "factor" if isinstance(iv, Scale) else None
        if name is not None and type(getattr(iv, name)) in (int, float):
            iv = copy.copy(iv)
            object.__setattr__(iv, name, torch.as_tensor(getattr(iv, name)))
            out[i] = iv
    return tuple(out)

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
own errors, and its result); the next ones run compiled. A compiled call
counts how often each site's hook ran and raises as eager `pl.run` does for a
site that did not run, or a save at a site that ran twice; its saves are
copies (the model may change a value in place after it was saved, which
eager `pl.run` refuses). Attributes the forward sets on a copied module
(``self.last = ...``) are set on the model's module after the call.

What a clone cannot do runs as eager `pl.run`, with a warning once per handle
and reason: `stop`, `skip`, gradients of sites, `step=`/`call=`, attention
ports and op sites, `params=`, `loss=`, calls inside `torch.func` transforms
(dynamo would give up on the frame for good), a batch with padding, a nested
call of the structure, what dynamo cannot compile, and models a clone would
not follow: a module on the way to a site that is used at several places, has
a forward of its own (`pl.edit`, accelerate) or keeps modules in a plain list;
a model with hooks of its own (those runs only: the next call looks again).
Before each compiled call the handle checks that each copied module's
attributes and children are the same objects (else the structure is built
anew; after a few times it stays eager), copies the training flags, re-resolves
the sites when the module tree changed (`tree_version`), and looks for hooks
added since (through torch's hook counter).
"""

from __future__ import annotations

import copy
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._backend import module_of
from ._clone import has_hooks, path_clone, unclonable
from ._errors import PurelensError, PurelensWarning
from ._grads import PatchGrad, SaveGrad
from ._hooks import hold_at_site
from ._inputs import call_arguments, padding_of
from ._interventions import Add, Intervention, Replace, Save, Scale, Skip, Stop
from ._pass import _NEVER_RAN, _RAN_TWICE
from ._plan import Plan, SitePlan
from ._record import Record
from ._site import resolve, tree_version
from ._tree import structure

__all__ = ["Compiled", "compile"]

_MAX_STRUCTURES = 64  # per handle, least recently used first out
_NEW_FUNCTIONS = 4  # structures that differ in function objects only, before a warning
_MAX_REBUILDS = 4  # clones of one structure made anew because the model changed

_FALLBACK = "pl.compile: {why}, so pl.run runs such calls eagerly (as pl.run on the model)."
_BAD_ARGUMENTS = (
    "pl.compile: torch.compile refused its arguments ({error}).\n"
    "  pl.compile(model, **kwargs) passes kwargs to torch.compile (backend=, mode=, ...)."
)
_FRESH_FUNCTIONS = (
    "pl.compile: calls keep bringing new function objects (lambdas or pl.at made anew each "
    "call), and each is a new structure that compiles anew.\n"
    "  Define the function once and reuse it, or give the values as tensors (pl.add, "
    "pl.replace, pl.scale): new tensors reuse the compiled code (pl.at's positions are "
    "part of the structure)."
)


def _probe(x: Any) -> Any:
    return x


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

    Examples:
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
        model = module_of(model, "pl.compile")
        self.model = model
        try:  # torch.compile checks its arguments (and finds the backend) when called
            torch.compile(_probe, **compile_kwargs)
        except Exception as error:
            raise PurelensError(_BAD_ARGUMENTS.format(error=error)) from error
        self._kwargs = compile_kwargs
        self._structures: OrderedDict[Hashable, _Traced | str] = OrderedDict()
        self._families: dict[Hashable, set[Hashable]] = {}  # without functions -> structures
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
        if torch._C._functorch.peek_interpreter_stack() is not None:
            # Dynamo gives up on a frame first compiled inside a transform, for good.
            self._warn("inside torch.func transforms (grad, vmap, ...) it is not compiled")
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
        if traced is not None and traced.holds(self.model):
            args, kwargs = call_arguments(inputs, tokenizer, model_kwargs, self.model)
            real = padding_of(args, kwargs)
            why = None
            if real is not None and not bool(real.all()):
                # What knows padding (pl.at, mean ablation) reads it from the pass.
                why = "batches with padding (an attention mask with zeros) are not compiled"
            elif _hooks_since(self.model, traced):
                why = _HOOKED
            else:
                try:
                    record = traced(args, kwargs, interventions)
                except torch._dynamo.exc.TorchDynamoException as error:
                    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                    why = f"dynamo could not compile this call ({type(error).__name__}: {first})"
                    record = None
                if record is not None:
                    return record
                why = why or "a run inside a run of the same structure is not compiled"
            self._warn(why)
            return eager()
        record = eager()  # the structure's first call: purelens's own checks, and its result
        built: _Traced | str | None
        if traced is not None and traced.builds >= _MAX_REBUILDS:
            built = "the model's modules keep changing (attributes rebound, children replaced)"
        else:
            built = self._build(interventions)
            if traced is not None and isinstance(built, _Traced):
                built.builds = traced.builds + 1
        if built is None:  # not now (the model has hooks at the moment): the next call tries
            self._warn(_HOOKED)
            return record
        with self._lock:
            self._structures[key] = built
            if len(self._structures) > _MAX_STRUCTURES:
                self._structures.popitem(last=False)
        if isinstance(built, str):
            self._warn(built)
        elif traced is None:
            self._count_family(interventions, key)
        return record

    def _build(self, ivs: tuple[Intervention, ...]) -> _Traced | str | None:
        """The structure of `ivs` compiled; why it cannot be (str); None: not now."""
        plan = Plan.build(self.model, ivs)
        why = _unsupported(plan) or unclonable(self.model, plan)
        if why is not None:
            return why
        if has_hooks(self.model):
            return None
        with self._lock:
            self._made += 1
            number = self._made
        return _Traced(self.model, plan, number, self._kwargs)

    def _count_family(self, ivs: tuple[Intervention, ...], key: Hashable) -> None:
        """Warn once structures keep coming that differ in function objects only."""
        family = structure(ivs, functions=False, code=True)
        if family is None:
            return
        with self._lock:
            keys = self._families.setdefault(family, set())
            keys.add(key)  # distinct structures: one rebuilt after eviction counts once
            count = len(keys)
            if len(self._families) > 4 * _MAX_STRUCTURES or count > 4 * _MAX_STRUCTURES:
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


_HOOKED = "the model has hooks of its own (the clone would skip them)"


def _hooks_since(model: nn.Module, traced: _Traced) -> bool:
    """Whether hooks were added to `model` (or globally) since `traced` last looked.

    Every hook torch registers anywhere takes a number from one counter, so the
    model is searched only when that counter moved.
    """
    now = RemovableHandle.next_id
    if now == traced.hooks_seen:
        return False
    if has_hooks(model):
        return True  # looked for again next call: they may be gone
    traced.hooks_seen = now
    return False


class _State:
    """What the clone's hooks read: the call's interventions, what they saved, and how many
    times each site ran."""

    def __init__(self) -> None:
        self.nodes: tuple[Intervention, ...] | None = None
        self.saved: dict[str, Any] | None = None
        self.counts: list[int] | None = None


class _Traced:
    """One structure on a path clone, compiled (see the module docstring)."""

    def __init__(self, model: nn.Module, plan: Plan, number: int, kwargs: dict[str, Any]) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None  # the thread in a call (a nested call runs eagerly)
        self.builds = 1
        self.hooks_seen = RemovableHandle.next_id
        self.version = tree_version(model)
        self.state = state = _State()
        self.clone, self.copies = path_clone(model, [s.name for s in plan.sites])
        self.checked = list({id(c): c for c in self.copies.values()}.values())
        self.sites = [(s.site, s.module, plan.entries(s)) for s in plan.sites]
        for index, site in enumerate(plan.sites):
            _hook(self.copies[site.name].copy, site, plan.entries(site), index, state)
        clone = self.clone
        count = len(plan.sites)

        def body(args: tuple[Any, ...], kwargs: dict[str, Any], nodes: Any) -> Any:
            state.nodes = nodes
            state.saved = {}
            state.counts = [0] * count
            output = clone(*args, **kwargs)
            return output, state.saved, state.counts

        # Dynamo's cache and its recompile limit are per code object: one per structure.
        code = body.__code__.replace(co_name=f"purelens_structure_{number}")
        own = types.FunctionType(code, body.__globals__, code.co_name, None, body.__closure__)
        self.compiled = torch.compile(own, **kwargs)

    def holds(self, model: nn.Module) -> bool:
        """Whether the clone is still right for the model (see `_Copied.holds`), and every
        site still names the module it did (a module anywhere gaining a child may make a
        suffix site ambiguous)."""
        if not all(entry.holds() for entry in self.checked):
            return False
        version = tree_version(model)
        if version is not self.version:
            for site, module, _ in self.sites:
                try:
                    if resolve(model, site)[1] is not module:
                        return False
                except PurelensError:
                    return False
            self.version = version
        return True

    def __call__(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], ivs: tuple[Intervention, ...]
    ) -> Record | None:
        """The call's Record; None for a call inside a call of this structure (its state is
        the outer call's: such a call runs eagerly)."""
        nodes = _as_tensors(ivs)
        me = threading.get_ident()
        if self.owner == me:
            return None
        with self.lock:  # one call at a time: the hooks share the state between them
            self.owner = me
            try:
                output, saved, counts = self.compiled(args, kwargs, nodes)
            finally:
                self.owner = None
                state = self.state
                state.nodes = state.saved = state.counts = None
            for entry in self.checked:
                entry.write_back()
        ran_at: dict[int, int] = {}  # intervention -> calls of the sites it is at
        for (site, _, entries), ran in zip(self.sites, counts, strict=True):
            for position, _ in entries:
                ran_at[position] = ran_at.get(position, 0) + ran
            if ran > 1 and any(isinstance(iv, Save) for _, iv in entries):
                raise PurelensError(_RAN_TWICE.format(site=site))
        for position, ran in ran_at.items():
            if ran == 0:  # none of its sites ran (a wildcard's matches that ran suffice)
                iv = ivs[position]
                why = f"site {iv.site!r} did not run in this forward pass"
                raise PurelensError(_NEVER_RAN.format(what=repr(iv), why=why))
        return Record(saved, output)


def _hook(
    module: nn.Module,
    site: SitePlan,
    at_site: tuple[tuple[int, Intervention], ...],
    index: int,
    state: _State,
) -> None:
    # A save is the plan's own node (a wildcard's is renamed per module it matched); a
    # writer is the call's, whose tensors are this call's.
    entries = tuple((position, iv if isinstance(iv, Save) else None) for position, iv in at_site)

    def apply(value: Tensor) -> Tensor:
        nodes, saved, counts = state.nodes, state.saved, state.counts
        assert nodes is not None and saved is not None and counts is not None
        counts[index] = counts[index] + 1
        for position, save in entries:
            if save is None:
                # What a patch reads is read-only, as in eager runs (and a copy: dynamo
                # traces a write into a read-only view as a write into its dict).
                view = MappingProxyType(dict(saved))
                value = nodes[position].write(value, view)  # type: ignore[attr-defined]
            else:  # a copy: the model may change the value in place after (eager raises)
                saved[save.name] = torch_pytree.tree_map(
                    lambda x: x.clone() if isinstance(x, Tensor) else x, save.record(value)
                )
        return value

    hold_at_site(module, site, apply)


# Fields the builders make tensors with torch.as_tensor.
_NUMBER_FIELDS: dict[type, str] = {Add: "delta", Scale: "factor", Replace: "value"}


def _as_tensors(ivs: tuple[Intervention, ...]) -> tuple[Intervention, ...]:
    """`ivs` with the Python numbers of `pl.add`, `pl.scale` and `pl.replace` made tensors,
    as those builders make them (`torch.as_tensor`), so that a new number does not
    recompile."""
    out = list(ivs)
    for i, iv in enumerate(ivs):
        name = _NUMBER_FIELDS.get(type(iv))
        if name is not None and type(getattr(iv, name)) in (int, float):
            iv = copy.copy(iv)
            object.__setattr__(iv, name, torch.as_tensor(getattr(iv, name)))
            out[i] = iv
    return tuple(out)

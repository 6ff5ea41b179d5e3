"""run(): one forward pass of any module, with interventions, returning a Record."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._backend import is_vllm, module_of
from ._compile import Compiled
from ._eager import eagerly
from ._errors import PurelensError
from ._grads import by_call, call_loss, check_loss_allowed, detached, gradients
from ._hooks import installed
from ._inputs import call_arguments, padding_of
from ._interventions import describe, flatten_interventions
from ._params import replaced
from ._pass import Pass, StopPass
from ._plan import Plan
from ._record import Record
from ._remote import Remote
from ._validate import fake_pass

__all__ = ["forward_pass", "run"]

_OFFLOADED = (
    "`params` replaces {name!r}, which accelerate loads onto its module as the module runs "
    "(CPU or disk offload), over any replacement.\n"
    "  Load the model without offloading those weights to use params= on them."
)
_BAD_PARAMS = (
    "`params` must be a mapping from parameter or buffer names to tensors; "
    "{problem}.\n  Names are those of model.named_parameters() and model.named_buffers(), "
    "e.g. {example!r}."
)


def run(
    model: nn.Module,
    inputs: Any,
    interventions: Any = (),
    *,
    params: Mapping[str, Tensor] | None = None,
    loss: Any = None,
    tokenizer: Any = None,
    validate: bool = False,
    **model_kwargs: Any,
) -> Record:
    """Run `model` on `inputs` once, applying `interventions`, and return a `Record`.

    Interventions apply in list order (nested lists are flattened); several
    on one site compose. The model is never changed: hooks live for this call
    only and are removed in ``finally``, and they act only for this call, so
    runs are thread-safe and may nest (a `run` inside a patch function).

    Args:
        model: any `torch.nn.Module`, a model served elsewhere (`pl.remote`),
            or a vLLM engine from `pl.vllm.load` (one forward pass per prompt:
            a `Record` per prompt, whose output is its next-token logits).
        inputs: a tensor (first positional argument), a tuple (positional
            arguments), a dict (keyword arguments), or text with `tokenizer`.
        interventions: `pl.save`, `pl.patch`, ... or (nested) lists of them.
        params: names -> tensors used instead of the model's own parameters
            and buffers, as `torch.func.functional_call` does (tied weights
            included), so that `torch.func.grad` with respect to them
            composes; but seen by this call only, never by runs in other
            threads or by the functions of its interventions.
        loss: ``loss(output)`` or ``loss(output, saved)`` returning a scalar
            tensor (or a dict of named scalars). `run` then enables gradients
            for its pass, takes ``torch.autograd.grad`` of the loss with
            respect to the values `pl.save_grad` marks (``rec.grads[name]``,
            a dict by loss name when the loss is a dict), sets ``rec.loss``,
            and returns every tensor detached. It never calls ``.backward()``
            and never touches ``param.grad``. Not inside `torch.func`
            transforms: there, return the loss and let the transform
            differentiate.
        tokenizer: turns text `inputs` into a padded batch.
        validate: first run the whole plan on fake tensors (shapes, no data),
            so that a bad site or a patch of the wrong shape raises before
            any real compute. The model is not touched by that check.
        **model_kwargs: further keyword arguments of the model call.

    Returns:
        A `Record`: ``rec[name]`` for saved values, ``rec.output`` for what
        the model returned (None after `pl.stop`).

    Raises:
        SiteError: a site matches no module, or several.
        PurelensError: an intervention failed, never applied, or returned a
            value of the wrong shape or dtype.

    Examples:
        >>> import torch, purelens as pl
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.ones(5, 3)
        >>> rec = pl.run(model, x, [pl.save("1"), pl.ablate("1")])
        >>> rec["1"].shape, torch.allclose(rec.output, model[2].bias.expand(5, 2))
        (torch.Size([5, 4]), True)
    """
    if torch.compiler.is_compiling():  # called from code dynamo compiles: outside its graph
        return eagerly(run)(
            model,
            inputs,
            interventions,
            params=params,
            loss=loss,
            tokenizer=tokenizer,
            validate=validate,
            **model_kwargs,
        )
    known = _MODULE_TYPES.get(id(type(model)))
    if known is None or known() is not type(model):
        return _run_on(
            model, inputs, interventions, params, loss, tokenizer, validate, model_kwargs
        )
    plan = Plan.cached(model, flatten_interventions(interventions))
    check_loss_allowed(loss, list(plan.save_grads))
    args, kwargs = call_arguments(inputs, tokenizer, model_kwargs, model)
    if params is not None:
        _check_params(model, params)
    if validate:
        fake_pass(model, _pass(plan, model, args, kwargs), args, kwargs, params, forward_pass)
    pass_ = _pass(plan, model, args, kwargs)
    if loss is None:
        output = forward_pass(model, pass_, args, kwargs, params)
        pass_.check_finished()
        return Record.owning(pass_.saved, output)
    with torch.enable_grad():
        output = forward_pass(model, pass_, args, kwargs, params)
        pass_.check_finished()
        loss_value = call_loss(loss, output, pass_.saved_view)
        grads = by_call(gradients(loss_value, pass_.grad_targets))
    # Detached, so that no autograd graph outlives the call.
    return Record(detached(pass_.saved), detached(output), grads, detached(loss_value))


# The types of modules `run` has seen given as themselves (not a compile wrapper, a
# served model or an engine), held weakly by id: a call on one goes straight to its plan.
_MODULE_TYPES: dict[int, weakref.ReferenceType[type]] = {}


def _seen(kind: type) -> None:
    key = id(kind)

    def forget(ref: weakref.ReferenceType[type]) -> None:
        if _MODULE_TYPES.get(key) is ref:
            _MODULE_TYPES.pop(key, None)

    _MODULE_TYPES[key] = weakref.ref(kind, forget)


def _run_on(
    model: Any,
    inputs: Any,
    interventions: Any,
    params: Mapping[str, Tensor] | None,
    loss: Any,
    tokenizer: Any,
    validate: bool,
    model_kwargs: dict[str, Any],
) -> Record:
    """`run` on what is not a module seen before: a served model, a `pl.compile` handle,
    a vLLM engine, a compiled module, or a module of a type not seen yet."""
    if isinstance(model, Remote):
        return model.run(
            inputs,
            interventions,
            params=params,
            loss=loss,
            tokenizer=tokenizer,
            validate=validate,
            **model_kwargs,
        )
    if isinstance(model, Compiled):
        return model.run(
            inputs,
            flatten_interventions(interventions),
            params=params,
            loss=loss,
            tokenizer=tokenizer,
            validate=validate,
            model_kwargs=model_kwargs,
        )
    if is_vllm(model):
        from .vllm._engine import run_on

        _local_only(params=params, loss=loss)
        return run_on(  # type: ignore[return-value]
            model, inputs, interventions, tokenizer=tokenizer, validate=validate, **model_kwargs
        )
    module = module_of(model, "pl.run")
    if module is model:
        _seen(type(model))
    return run(
        module,
        inputs,
        interventions,
        params=params,
        loss=loss,
        tokenizer=tokenizer,
        validate=validate,
        **model_kwargs,
    )


def _local_only(**given: Any) -> None:
    """Refuse `params=` and `loss=` on a vLLM engine (no autograd, its own weights)."""
    for name, value in given.items():
        if value is not None:
            raise PurelensError(
                f"`{name}=` is not supported on vLLM: its engine runs without autograd, "
                "on weights of its own.\n  Use the HF model for gradients and params=."
            )


def _pass(plan: Plan, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pass:
    pass_ = Pass(plan, model)
    pass_.padding = padding_of(args, kwargs)
    return pass_


def forward_pass(
    model: nn.Module,
    pass_: Pass,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    params: Mapping[str, Tensor] | None,
) -> Any:
    with installed(pass_):
        try:
            if params is None:
                return model(*args, **kwargs)
            with replaced(model, params):
                return model(*args, **kwargs)
        except StopPass as stop:
            if stop.owner is not pass_:
                raise
            return None


def _check_not_offloaded(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    for name in params:
        owner = model.get_submodule(name.rpartition(".")[0])
        if getattr(getattr(owner, "_hf_hook", None), "offload", False):
            raise PurelensError(_OFFLOADED.format(name=name))


def _check_params(model: nn.Module, params: Any) -> None:
    if not isinstance(params, Mapping):
        problem = f"got {type(params).__name__}"
    else:
        known: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
        known.update(model.named_buffers(remove_duplicate=False))
        problem = ""
        for name, value in params.items():
            own = known.get(name)
            if own is None:
                problem = f"{name!r} is not one of the model's"
            elif not isinstance(value, Tensor):
                problem = f"{name!r} is {type(value).__name__}, not a tensor"
            elif value.shape != own.shape or value.dtype != own.dtype:
                problem = (
                    f"{name!r} is {describe(value)}, but the model's is {describe(own)} "
                    "(the same shape and dtype are needed)"
                )
            if problem:
                break
        if not problem:
            _check_not_offloaded(model, params)
            return
    example = next((name for name, _ in model.named_parameters()), "weight")
    raise PurelensError(_BAD_PARAMS.format(problem=problem, example=example))

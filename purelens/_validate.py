"""Fake passes: the whole plan on fake tensors, before any real compute (or instead of it).

Fake tensors (torch's ``FakeTensorMode``) carry shapes, dtypes and devices but
no data, so a pass over them checks every site and every intervention's
result for the price of shape propagation. `validate=True`, `pl.shapes` and
`pl.sweep`'s memory estimate use it.

The model is never touched: its parameters stay where they are, and the
mode turns each real tensor into a fake one as an operation reads it, in this
thread only. A run in another thread meanwhile sees the model as it is. The
conversion substitutes where the tensor read is not the one to use: a
tensor of `params=` for the parameter it replaces, and a fake CPU tensor for
anything on the ``meta`` device (the weights of a model built under
``accelerate.init_empty_weights()``, and what they compute), so that they
mix with the inputs.

A model dispatched by accelerate with disk offload loads real weights from
disk as each offloaded module runs, which cannot happen inside the mode; such
a model runs outside it, the fake inputs taking the mode along with them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConverter, FakeTensorMode

from ._errors import PurelensError
from ._pass import Pass

__all__ = ["fake_pass"]

_UNTRACEABLE = (
    "{what} could not run the model on fake tensors (shapes without data): "
    "{kind}: {error}\n"
    "  {advice}"
)
_COMPILED = (
    "{what} cannot run {name!r} on fake tensors: it was compiled in place "
    "(Module.compile()), and compiled code does not run on them.\n"
    "  Survey the model before compiling it, or compile with torch.compile(model), whose "
    "wrapper purelens runs eagerly."
)
_ADVICE = {
    "validate=True": (
        "An intervention or model that reads tensor values (.item(), data-dependent "
        "indexing) cannot be checked this way; run it with validate=False."
    ),
    "pl.shapes": (
        "A model that reads tensor values (.item(), data-dependent indexing, a Python branch "
        "on a tensor) cannot be surveyed without running it; use pl.run with pl.save on "
        "the sites you need."
    ),
}


def fake_pass(
    model: nn.Module,
    pass_: Pass,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    params: Mapping[str, Tensor] | None,
    forward: Callable[..., Any],
    *,
    check: bool = True,
    what: str = "validate=True",
) -> Any:
    """Run `forward` for `pass_` on fake copies of the inputs, and of `params`.

    Returns:
        The fake output.

    Raises:
        PurelensError: what the real pass would raise, before any real compute;
            or, naming `what`, that the model cannot run on fake tensors.
    """
    compiled = next((n for n, m in model.named_modules() if _compiled_in_place(m)), None)
    if compiled is not None:
        raise PurelensError(_COMPILED.format(what=what, name=compiled or "the model"))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    converter = _Converter()
    mode.fake_tensor_converter = converter

    def fake(value: Any) -> Any:
        return mode.from_tensor(value) if isinstance(value, Tensor) else value

    offloaded = _offloaded(model)
    before = _snapshot(model)
    try:
        with mode:
            for name, tensor in _named_tensors(model):
                if params is not None and name in params:
                    converter.substitute(tensor, fake(params[name]))
            fake_args, fake_kwargs = torch_pytree.tree_map(fake, (args, kwargs))
        with contextlib.nullcontext() if offloaded else mode:
            output = forward(model, pass_, fake_args, fake_kwargs, None)
        if check:
            pass_.check_finished()
        return output
    except PurelensError:
        raise
    except Exception as error:
        message = _UNTRACEABLE.format(
            what=what, kind=type(error).__name__, error=error, advice=_ADVICE[what]
        )
        raise PurelensError(message) from error
    finally:
        _undo_fakes(before)


def _compiled_in_place(module: nn.Module) -> bool:
    return module.__dict__.get("_compiled_call_impl") is not None


_State = list[tuple[dict[str, Any], dict[str, Any]]]


def _snapshot(model: nn.Module) -> _State:
    """Each module's attributes, buffers and parameters (the dicts' entries, copied)."""
    state: _State = []
    for module in model.modules():
        for store in (module.__dict__, module.__dict__["_buffers"], module.__dict__["_parameters"]):
            state.append((store, dict(dict.items(store))))
    return state


def _undo_fakes(state: _State) -> None:
    """Put back what the model stored during the fake pass that holds fake tensors.

    Models cache tensors they compute in their first forward (rotary tables,
    ``long_inv_freq``); cached in a fake pass, they would be fake ever after.
    """
    for store, before in state:
        for key, value in list(dict.items(store)):
            if _holds_fake(value) and value is not before.get(key):
                if key in before:
                    dict.__setitem__(store, key, before[key])
                else:
                    dict.__delitem__(store, key)


def _holds_fake(value: Any) -> bool:
    if isinstance(value, FakeTensor):
        return True
    if isinstance(value, list | tuple):
        return any(isinstance(v, FakeTensor) for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, FakeTensor) for v in value.values())
    return False


def _named_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    tensors: list[tuple[str, Tensor]] = list(model.named_parameters(remove_duplicate=False))
    tensors += model.named_buffers(remove_duplicate=False)
    return tensors


def _offloaded(model: nn.Module) -> bool:
    """Whether accelerate's hooks load some of the model's weights as their modules run."""
    return any(
        getattr(getattr(module, "_hf_hook", None), "offload", False) for module in model.modules()
    )


class _Converter(FakeTensorConverter):
    """Turns real tensors into fake ones, with substitutes for some, and CPU for meta."""

    def __init__(self) -> None:
        super().__init__()
        self._substitutes: dict[int, tuple[Tensor, FakeTensor]] = {}

    def substitute(self, real: Tensor, fake: FakeTensor) -> None:
        """Read `fake` wherever `real` is read (the real tensor is kept alive meanwhile)."""
        self._substitutes[id(real)] = (real, fake)

    def from_real_tensor(  # type: ignore[override]
        self, fake_mode: FakeTensorMode, t: Tensor, *args: Any, **kwargs: Any
    ) -> FakeTensor:
        found = self._substitutes.get(id(t))
        if found is not None:
            return found[1]
        if t.is_meta:  # no data to share: a CPU tensor of the same layout, allocating nothing
            with fake_mode:
                fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
            fake.requires_grad_(t.requires_grad)
            self.substitute(t, fake)  # type: ignore[arg-type]
            return fake  # type: ignore[return-value]
        return super().from_real_tensor(fake_mode, t, *args, **kwargs)

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
import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConverter, FakeTensorMode

from ._budget import stopped
from ._errors import PurelensError
from ._params import replaced
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
_UNCOPYABLE = (
    "{what} cannot copy the {kind} among the inputs for its fake pass ({error}), and the "
    "model would write fake tensors into it.\n  Run without it, or without the check."
)
_ADVICE = {
    "validate=True": (
        "An intervention or model that reads tensor values (.item(), data-dependent "
        "indexing) cannot be checked this way; run it with validate=False."
    ),
    "pl.sites": (
        "A model that reads tensor values cannot run on fake tensors; pl.sites(model) "
        "without inputs lists every module instead."
    ),
    "pl.skip": "A skip's value then goes through unchecked (see purelens._skipped).",
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
    undo_all: bool = False,
) -> Any:
    """Run `forward` for `pass_` on fake copies of the inputs, and of `params`.

    What the model stores on its modules that holds fakes is put back after (see
    `_undo_fakes`); with `undo_all`, everything it stores (a counter, for a module that
    a skip keeps from running).

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

    def fake_or_copy(value: Any) -> Any:
        """A fake of a tensor; a copy (holding fakes) of an object such as a KV cache."""
        if isinstance(value, Tensor):
            return mode.from_tensor(value)
        if value is None or isinstance(value, _PLAIN):
            return value
        # A copy whose tensors are fakes, so that the model (a KV cache's update, say)
        # writes nothing into the caller's object.
        memo: dict[int, Any] = {id(t): mode.from_tensor(t) for t in _tensors_in(value)}
        try:
            return copy.deepcopy(value, memo)
        except Exception as error:
            kind = type(value).__name__
            raise PurelensError(_UNCOPYABLE.format(what=what, kind=kind, error=error)) from None

    offloaded = _offloaded(model)
    before = _snapshot(model)
    try:
        named = _named_tensors(model)
        given = {}  # id(own tensor) -> its replacement (under every name it is tied to)
        if params is not None:
            own = dict(named)
            given = {id(own[name]): tensor for name, tensor in params.items()}
        with mode:
            # accelerate loads offloaded weights as their modules run (into this pass's
            # private parameters, outside the mode); the others are fakes from the start.
            loaded = _loaded_on_the_way(model) if offloaded else set()
            fakes = {name: fake(given.get(id(t), t)) for name, t in named if name not in loaded}
            fake_args, fake_kwargs = torch_pytree.tree_map(fake_or_copy, (args, kwargs))
        # The model reads fakes in place of its own tensors, and what it stores in its
        # parameters and buffers stays in this context (see `_params`).
        with replaced(model, fakes, private=True):
            with contextlib.nullcontext() if offloaded else mode:
                output = forward(model, pass_, fake_args, fake_kwargs, None)
        if check:
            pass_.check_finished()
        return output
    except PurelensError:
        raise
    except Exception as error:
        if stopped(error):  # a server's deadline, not the model's doing
            raise
        message = _UNTRACEABLE.format(
            what=what, kind=type(error).__name__, error=error, advice=_ADVICE[what]
        )
        raise PurelensError(message) from error
    finally:
        _undo_fakes(before, undo_all)


def _tensors_in(value: Any, depth: int = 0) -> list[Tensor]:
    """The tensors an object holds, in its attributes and containers (a few levels deep)."""
    if isinstance(value, Tensor):
        return [value]
    if depth > 6 or value is None or isinstance(value, _PLAIN):
        return []
    if isinstance(value, dict):
        children: Any = value.values()
    elif isinstance(value, list | tuple | set):
        children = value
    elif hasattr(value, "__dict__"):
        children = vars(value).values()
    else:
        return []
    return [t for child in children for t in _tensors_in(child, depth + 1)]


def _compiled_in_place(module: nn.Module) -> bool:
    return module.__dict__.get("_compiled_call_impl") is not None


_State = list[tuple[dict[str, Any], dict[str, Any]]]
_PLAIN = (bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _snapshot(model: nn.Module) -> _State:
    """Each module's attributes, and the dicts and lists they hold (a few levels deep).

    Its parameters and buffers need none: they are private to the pass.
    """
    state: _State = []

    def keep(container: Any, depth: int) -> None:
        if isinstance(container, dict):
            state.append((container, dict(container)))
            children: Any = container.values()
        elif isinstance(container, list):
            state.append((container, list(container)))  # type: ignore[arg-type]
            children = container
        else:
            return
        if depth < 3:
            for child in children:
                keep(child, depth + 1)

    for module in model.modules():
        state.append((module.__dict__, dict(module.__dict__)))
        for key, value in module.__dict__.items():
            if not key.startswith("_"):
                keep(value, 1)
    return state


def _undo_fakes(state: _State, everything: bool = False) -> None:
    """Put back what the model stored during the fake pass that holds fake tensors (or,
    with `everything`, all it stored).

    Models cache what they compute in their first forward (rotary tables,
    ``long_inv_freq``, a dict of tensors); cached in a fake pass, it would be
    fake ever after.
    """
    for store, before in state:
        if isinstance(store, list):
            if everything or any(_holds_fake(v) for v in store):
                store[:] = before  # type: ignore[assignment]
            continue
        for key, value in list(dict.items(store)):
            if (everything or _holds_fake(value)) and value is not before.get(key):
                if key in before:
                    dict.__setitem__(store, key, before[key])
                else:
                    dict.__delitem__(store, key)


def _holds_fake(value: Any, depth: int = 0) -> bool:
    """Whether `value` is, or holds in its containers, a fake tensor."""
    if isinstance(value, FakeTensor):
        return True
    if depth > 4:
        return False
    if isinstance(value, list | tuple | set):
        return any(_holds_fake(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_holds_fake(v, depth + 1) for v in value.values())
    return False


def _named_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    tensors: list[tuple[str, Tensor]] = list(model.named_parameters(remove_duplicate=False))
    tensors += model.named_buffers(remove_duplicate=False)
    return tensors


def _loaded_on_the_way(model: nn.Module) -> set[str]:
    """Names of the tensors that accelerate's hooks load (from disk) when their module runs."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if getattr(getattr(module, "_hf_hook", None), "offload", False):
            dot = f"{prefix}." if prefix else ""
            names.update(dot + n for n, _ in module.named_parameters(remove_duplicate=False))
            names.update(dot + n for n, _ in module.named_buffers(remove_duplicate=False))
    return names


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

"""The value at a site of vLLM's model, and how to put a new one back.

vLLM lays a step's requests out flat: a module inside the model sees
``[tokens, ...]`` for every scheduled token of every request, one after
another. Two kinds of module need more than `_primary`'s first tensor:

- **Fused residuals.** Llama-family decoder layers return
  ``(hidden, residual)`` and leave the add to the next layer's norm; the
  value at such a layer's output (and at its input, and at a norm's input
  when it is called with a residual) is the residual stream
  ``hidden + residual``, as in HF. A new value goes back as
  ``(value, zeros)``, which the next fused add turns into the value exactly.
- **Fused norms.** A norm called as ``norm(x, residual)`` adds the two and
  returns ``(normed, sum)``; its ``:input`` is the sum (HF's norm input). A
  new input goes in as ``(value, zeros)``, and the sum it passes on stays
  the old one: in HF, a norm's input feeds the norm only, not the residual
  branch beside it (`keeps_residual`).
- **Positions first.** A module whose first argument is ``positions`` takes
  the hidden states second: its ``:input`` is the hidden states, never the
  position ids.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import PurelensError
from .._primary import primary_input, primary_output

__all__ = ["input_value", "keeps_residual", "output_value", "with_residual"]

Rebuild = Callable[[Tensor], Any]

_POSITIONS = ("positions", "position_ids")
_NO_HIDDEN = (
    "site {site!r}: the first argument of this vLLM module ({kind}) is {name!r}, and it "
    "takes no `hidden_states`, so its ':input' has no value that HF's would be.\n"
    "  Intervene on the output of the module before it."
)


_signatures: dict[type, tuple[str, ...]] = {}


def _parameters(cls: type) -> tuple[str, ...]:
    """The names of the parameters of `cls`'s forward, without ``self`` (cached per class).

    vLLM's custom ops (RMSNorm, ...) take ``forward(*args, **kwargs)`` and dispatch to
    a ``forward_native`` with the real parameters.
    """
    names = _signatures.get(cls)
    if names is None:
        names = ()
        for method in ("forward", "forward_native"):
            try:
                params = list(inspect.signature(getattr(cls, method)).parameters.values())[1:]
            except (AttributeError, TypeError, ValueError):
                continue
            if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
                names = tuple(p.name for p in params)
                break
        _signatures[cls] = names
    return names


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _fused(module: nn.Module) -> bool:
    """Whether `module` returns ``(hidden, residual)`` whose sum is its real output."""
    return "residual" in _parameters(type(module)) and not _is_norm(module)


def keeps_residual(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether `module` is a norm called with a residual (see the module docstring)."""
    if not _is_norm(module):
        return False
    names = _parameters(type(module))
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return isinstance(bound.get("residual"), Tensor)


def with_residual(output: Any, residual: Tensor) -> Any:
    """A fused norm's output ``(normed, sum)`` with the sum it passes on replaced."""
    if isinstance(output, tuple) and len(output) == 2:
        return output[0], residual
    return output


def output_value(module: nn.Module, output: Any, site: str) -> tuple[Tensor, Rebuild] | None:
    """The value at `module`'s output site and a function putting a new one back."""
    if (
        _fused(module)
        and isinstance(output, tuple)
        and len(output) == 2
        and all(isinstance(x, Tensor) for x in output)
    ):
        hidden, residual = output
        return hidden + residual, lambda v: (v, torch.zeros_like(residual))
    return primary_output(output)


def input_value(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], site: str
) -> tuple[Tensor, Callable[[Tensor], tuple[tuple[Any, ...], dict[str, Any]]]] | None:
    """The value at `module`'s ``:input`` site and a function giving the new arguments."""
    names = _parameters(type(module))
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    first = next((n for n in names if isinstance(bound.get(n), Tensor)), None)
    if first not in _POSITIONS:
        if "residual" not in bound or not isinstance(bound.get("residual"), Tensor):
            return primary_input(args, kwargs)
        first = next(n for n in names if n != "residual" and isinstance(bound.get(n), Tensor))
    else:
        first = "hidden_states" if isinstance(bound.get("hidden_states"), Tensor) else None
        if first is None:
            raise PurelensError(
                _NO_HIDDEN.format(site=site, kind=type(module).__name__, name=names[0])
            )
    hidden = bound[first]
    residual = bound.get("residual")

    def rebuild(value: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        new = dict(bound)
        new[first] = value
        if isinstance(residual, Tensor):
            new["residual"] = torch.zeros_like(residual)
        return (), new

    if isinstance(residual, Tensor):
        return hidden + residual, rebuild
    return hidden, rebuild

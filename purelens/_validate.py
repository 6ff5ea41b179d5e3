"""validate=True: run the whole plan on fake tensors before any real compute.

Fake tensors (torch's ``FakeTensorMode``) carry shapes, dtypes and devices but
no data, so a pass over them checks every site and every intervention's
result for the price of shape propagation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ._errors import PurelensError
from ._pass import Pass

__all__ = ["fake_pass"]

_UNTRACEABLE = (
    "validate=True could not run the plan on fake tensors (shapes without data): "
    "{kind}: {error}\n"
    "  An intervention that reads tensor values (.item(), data-dependent indexing) "
    "cannot be checked this way; run it with validate=False."
)


def fake_pass(
    model: nn.Module,
    pass_: Pass,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    params: Mapping[str, Tensor] | None,
    forward: Callable[..., Any],
    *,
    check: bool = True,
) -> Any:
    """Run `forward` for `pass_` on fake copies of the inputs and parameters.

    Weights on the ``meta`` device (a model built under
    ``accelerate.init_empty_weights()``, or offloaded to disk) become fake
    CPU tensors, so they mix with the inputs and with whatever accelerate
    loads on the way.

    Returns:
        The fake output.

    Raises:
        PurelensError: what the real pass would raise, before any real compute.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    tensors: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    tensors.update(params or {})
    for name in _loaded_on_the_way(model):
        if tensors[name].is_meta:
            del tensors[name]  # accelerate loads it from disk at forward time

    def fake(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        if value.is_meta:  # inside the mode, this allocates nothing
            return torch.empty(value.shape, dtype=value.dtype, device="cpu")
        return mode.from_tensor(value)

    try:
        with mode:
            memo: dict[int, Tensor] = {}  # tied weights must stay one tensor
            fake_params = {name: memo.setdefault(id(t), fake(t)) for name, t in tensors.items()}
            fake_args, fake_kwargs = torch_pytree.tree_map(fake, (args, kwargs))
        # The forward runs outside the mode: fake tensors carry it with them,
        # and code that loads real weights on the way (accelerate's disk
        # offload) can still create real tensors.
        output = forward(model, pass_, fake_args, fake_kwargs, fake_params)
        if check:
            pass_.check_finished()
        return output
    except PurelensError:
        raise
    except Exception as error:
        raise PurelensError(_UNTRACEABLE.format(kind=type(error).__name__, error=error)) from error


def _loaded_on_the_way(model: nn.Module) -> list[str]:
    """Names of the tensors that accelerate's hooks load (from disk) when their module runs."""
    names = []
    for prefix, module in model.named_modules():
        if getattr(getattr(module, "_hf_hook", None), "offload", False):
            dot = f"{prefix}." if prefix else ""
            names += [dot + n for n, _ in module.named_parameters(remove_duplicate=False)]
            names += [dot + n for n, _ in module.named_buffers(remove_duplicate=False)]
    return names

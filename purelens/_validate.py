"""validate=True: run the whole plan on fake tensors before any real compute.

Fake tensors (torch's ``FakeTensorMode``) carry shapes, dtypes and devices but
no data, so a pass over them checks every site and every intervention's
result for the price of shape propagation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

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
) -> None:
    """Run `forward` for `pass_` on fake copies of the inputs and parameters.

    Raises:
        PurelensError: what the real pass would raise, before any real compute.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(value: Any) -> Any:
        return mode.from_tensor(value) if isinstance(value, Tensor) else value

    tensors: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    tensors.update(params or {})
    try:
        with mode:
            fake_params = {name: fake(t) for name, t in tensors.items()}
            fake_args, fake_kwargs = torch_pytree.tree_map(fake, (args, kwargs))
            forward(model, pass_, fake_args, fake_kwargs, fake_params)
            pass_.check_finished()
    except PurelensError:
        raise
    except Exception as error:
        raise PurelensError(_UNTRACEABLE.format(kind=type(error).__name__, error=error)) from error

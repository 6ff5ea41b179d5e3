"""Whether the forward pass is inside gradient checkpointing (`torch.utils.checkpoint`).

Checkpointing keeps no activations of a region and reruns it in the backward
pass. purelens's hooks live for one call, so that rerun would not see the
interventions: the gradients would be those of the model without them. A
run therefore refuses an intervention that changes values inside a
checkpointed region while gradients are recorded (see `_pass`), and hooks
stay inert while autograd reruns a region inside the run (``loss=``).

Both of torch's checkpoints are recognised while they run. The non-reentrant
one pushes saved-tensor hooks of its own, for the forward and for the rerun:
when no such hooks are active at all, it is not running, which is the cheap
common case. The reentrant one runs its forward under ``no_grad`` and its
rerun inside the backward pass; only then are the frames looked at.
"""

from __future__ import annotations

import inspect
import sys
from types import CodeType, FrameType
from typing import Literal

import torch
import torch.utils.checkpoint as checkpoint

__all__ = ["checkpointed"]

Where = Literal["forward", "rerun"]

_FORWARD_HOOK = "_checkpoint_hook."
_RERUN_HOOK = "_recomputation_hook."


def _codes() -> dict[CodeType, Where]:
    """The code of checkpoint's frames: where each is found on the stack."""
    codes: dict[CodeType, Where] = {
        inspect.unwrap(checkpoint.checkpoint).__code__: "forward",
        checkpoint.CheckpointFunction.forward.__code__: "forward",
        checkpoint.CheckpointFunction.backward.__code__: "rerun",
    }
    for const in checkpoint._checkpoint_hook.__init__.__code__.co_consts:
        if isinstance(const, CodeType) and const.co_name.startswith("unpack_hook"):
            codes[const] = "rerun"  # the non-reentrant rerun starts in the unpack hook
    return codes


_CODES = _codes()


def checkpointed() -> Where | None:
    """Whether the caller runs inside a checkpointed region's forward or its backward rerun."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    if hooks is not None:
        name = getattr(hooks[0], "__qualname__", "")
        if name.startswith(_FORWARD_HOOK):
            return "forward"
        if name.startswith(_RERUN_HOOK):
            return "rerun"
    elif torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
        return None  # no saved-tensor hooks, gradients on, not in a backward pass
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        where = _CODES.get(frame.f_code)
        if where is not None:
            return where
        frame = frame.f_back
    return None

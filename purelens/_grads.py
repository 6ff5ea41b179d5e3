"""Gradients: `save_grad`, `patch_grad`, and what `run(..., loss=)` computes.

`patch_grad` is an autograd tap: an identity in the forward pass whose
backward applies `fn` to the gradient, so it works under plain autograd and
under `torch.func.grad` alike. `save_grad` marks the value at its site; with
``loss=``, `run` takes ``torch.autograd.grad`` of the loss with respect to
exactly those values (never ``.backward()``, never ``param.grad``).

On one site, the taps sit after the forward interventions, the `patch_grad`
taps downstream of them and the `save_grad` marks downstream of those: so
`save_grad` reports the gradient as it arrives at the site, before any
`patch_grad` there rewrites it, and several `patch_grad` apply in list order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor

from . import _select
from ._builders import check_name, selectors
from ._errors import PurelensError
from ._interventions import Intervention, rewrite, takes_saved
from ._select import Calls, Rows, Steps
from ._site import parse_site
from ._tree import pytree_node, static_field

__all__ = [
    "PatchGrad",
    "SaveGrad",
    "by_call",
    "call_loss",
    "check_loss_allowed",
    "detached",
    "gradients",
    "mark",
    "patch_grad",
    "save_grad",
    "tap",
]

_NEEDS_LOSS = (
    "{what} needs `loss=` in run: the gradient is d(loss)/d(value at {site!r}).\n"
    "  Example: pl.run(model, x, [pl.save_grad('h.3')], loss=lambda out: out.logits[0, -1, 7])"
)
_IN_TRANSFORM = (
    "`loss=` cannot be used inside torch.func transforms (vmap, grad, jacrev, ...): "
    "it differentiates with torch.autograd, which they do not support.\n"
    "  Let the transform differentiate instead: return the loss from your function, "
    "e.g. torch.func.grad(lambda v: my_loss(pl.run(model, x, [pl.add(site, v)]).output))."
)
_IN_INFERENCE = (
    "`loss=` cannot work under torch.inference_mode(): inference tensors have no "
    "gradients.\n  Use torch.no_grad() instead; run enables gradients for its own pass."
)
_REENTRANT = (
    "`loss=` takes gradients with torch.autograd.grad, which torch's reentrant gradient "
    "checkpointing (use_reentrant=True) does not support.\n"
    "  Use non-reentrant checkpointing (model.gradient_checkpointing_enable("
    "{'use_reentrant': False})), or turn checkpointing off for the run."
)
_BAD_LOSS = "`loss` must return a scalar tensor, or a dict of named scalar tensors; {problem}."
_NOT_DIFFERENTIABLE = (
    "{what}: the value at site {site!r} is {kind}, which has no gradient.\n"
    "  Gradients exist for floating-point values; for token ids, save the gradient "
    "at the embedding's output instead."
)


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class SaveGrad(Intervention):
    """Record d(loss)/d(value at the site) under `name` in ``rec.grads``."""

    site: str = static_field()
    name: str = static_field(default="")
    step: Steps = static_field(default=None)
    batch: Rows = static_field(default=None)
    call: Calls = static_field(default=None)


@pytree_node
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class PatchGrad(Intervention):
    """Replace the gradient flowing back through the site with `fn(grad)`."""

    site: str = static_field()
    fn: Callable[[Tensor], Tensor] = static_field(default=None)  # type: ignore[assignment]
    step: Steps = static_field(default=None)
    batch: Rows = static_field(default=None)
    call: Calls = static_field(default=None)

    def patched(self, grad: Tensor) -> Tensor:
        return rewrite(self, grad, self.fn, noun="gradient")


class _GradTap(torch.autograd.Function):
    """Identity forward; the backward hands the gradient to `node.patched`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, node: PatchGrad) -> Tensor:  # type: ignore[override]
        return value.view_as(value)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.node = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.node.patched(grad), None


def tap(value: Tensor, patches: list[PatchGrad]) -> Tensor:
    """`value` behind the `patch_grad` taps, the first in the list nearest the loss."""
    for node in reversed(patches):
        value = _GradTap.apply(value, node)  # type: ignore[assignment]
    return value


def mark(value: Tensor, node: SaveGrad, *, own: bool = False) -> Tensor:
    """`value`, made a tensor that gradients reach (a leaf when nothing upstream needs one).

    With `own` (an ``:input`` port), the result is always a tensor of its own,
    which only the module consumes: the gradient is the one flowing into the
    module, whether or not anything upstream requires gradients (a pre-hook
    cannot reach the value's other consumers, such as a residual connection).
    """
    if not (value.is_floating_point() or value.is_complex()):
        raise PurelensError(
            _NOT_DIFFERENTIABLE.format(what=repr(node), site=node.site, kind=f"{value.dtype}")
        )
    if not value.requires_grad:
        return value.detach().requires_grad_(True)
    return value.view_as(value) if own else value


def save_grad(
    site: str, *, name: str | None = None, batch: Any = None, step: Any = None, call: Any = None
) -> SaveGrad:
    """Record d(loss)/d(value at `site`) in ``rec.grads[name]``; needs `loss=` in `run`.

    The gradient is the one arriving at the site, before any `patch_grad` on
    the same site rewrites it. On an ``:input`` port it is the gradient
    flowing into the module through that input (not through the input's
    other consumers, such as a residual connection). With `batch=`, only
    those rows are kept.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> rec = pl.run(model, torch.ones(4, 2), [pl.save_grad("0")], loss=lambda out: out.sum())
        >>> torch.allclose(rec.grads["0"], model[1].weight.expand(4, 3))
        True
    """
    parse_site(site)
    check_name(name, site, "pl.save_grad")
    return SaveGrad(site, site if name is None else name, *selectors(step, batch, call))


def patch_grad(
    site: str,
    fn: Callable[[Tensor], Tensor],
    *,
    batch: Any = None,
    step: Any = None,
    call: Any = None,
) -> PatchGrad:
    """Replace the gradient flowing back through `site` with `fn(grad)`.

    It changes what every site upstream (and the inputs and parameters)
    receives, under `loss=` and under `torch.func.grad` alike. The result must
    keep the gradient's shape and dtype.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> ivs = [pl.save_grad("0:input"), pl.patch_grad("1", torch.zeros_like)]
        >>> rec = pl.run(model, torch.ones(4, 2), ivs, loss=lambda out: out.sum())
        >>> bool((rec.grads["0:input"] == 0).all())
        True
    """
    parse_site(site)
    if not callable(fn):
        raise PurelensError(f"`fn` of pl.patch_grad({site!r}, ...) must be callable, got {fn!r}.")
    return PatchGrad(site, fn, *selectors(step, batch, call))


def check_loss_allowed(loss: Any, save_grads: list[SaveGrad]) -> None:
    """Raise if `loss=` and the context (or a `save_grad` without loss) cannot work."""
    if loss is None:
        if save_grads:
            node = save_grads[0]
            raise PurelensError(_NEEDS_LOSS.format(what=repr(node), site=node.site))
        return
    if not callable(loss):
        raise PurelensError(f"`loss` must be callable, got {loss!r}.")
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise PurelensError(_IN_TRANSFORM)
    if torch.is_inference_mode_enabled():
        raise PurelensError(_IN_INFERENCE)


def call_loss(
    loss: Callable[..., Any], output: Any, saved: Mapping[str, Any]
) -> Tensor | dict[str, Tensor]:
    """`loss(output)` or `loss(output, saved)`, checked to be scalars."""
    value = loss(output, saved) if takes_saved(loss) else loss(output)
    items = value.items() if isinstance(value, Mapping) else [("loss", value)]
    for key, item in items:
        if not isinstance(item, Tensor) or item.numel() != 1:
            what = describe_loss(item)
            where = f"`{key}` is {what}" if isinstance(value, Mapping) else f"got {what}"
            raise PurelensError(_BAD_LOSS.format(problem=where))
    return dict(value) if isinstance(value, Mapping) else value


def describe_loss(item: Any) -> str:
    if isinstance(item, Tensor):
        return f"a tensor of shape {list(item.shape)}"
    return repr(item)


def gradients(
    loss: Tensor | dict[str, Tensor], targets: dict[str, tuple[Tensor, SaveGrad]]
) -> dict[str, Any]:
    """d(loss)/d(target) for every target (a dict by loss name when `loss` is a dict)."""
    if not targets:
        return {}
    names = list(targets)
    tensors = [targets[n][0] for n in names]
    losses = loss if isinstance(loss, dict) else {"": loss}
    per_loss: dict[str, list[Tensor]] = {}
    for i, (key, value) in enumerate(losses.items()):
        found: tuple[Tensor | None, ...]
        if value.requires_grad:
            try:
                found = torch.autograd.grad(
                    value, tensors, allow_unused=True, retain_graph=i < len(losses) - 1
                )
            except RuntimeError as error:
                if "use_reentrant=True" not in str(error):
                    raise
                raise PurelensError(_REENTRANT) from None
        else:  # the loss does not depend on anything differentiable
            found = (None,) * len(tensors)
        per_loss[key] = [
            _select.take_rows(
                torch.zeros_like(t) if g is None else g, targets[n][1].batch, targets[n][1].site
            )
            for n, t, g in zip(names, tensors, found, strict=True)
        ]
    if not isinstance(loss, dict):
        return dict(zip(names, per_loss[""], strict=True))
    return {n: {key: per_loss[key][j] for key in losses} for j, n in enumerate(names)}


def by_call(grads: dict[Any, Any]) -> dict[str, Any]:
    """`grads` with the per-call gradients of a ``save_grad(call=slice)`` (keyed
    ``(name, call)``) gathered into one tuple per name, in call order."""
    out: dict[str, Any] = {}
    calls: dict[str, list[tuple[int, Any]]] = {}
    for key, grad in grads.items():
        if isinstance(key, tuple):
            calls.setdefault(key[0], []).append((key[1], grad))
        else:
            out[key] = grad
    for name, found in calls.items():
        out[name] = tuple(grad for _, grad in sorted(found, key=lambda item: item[0]))
    return out


def detached(tree: Any) -> Any:
    """`tree` with every tensor detached, so that no autograd graph outlives the run."""
    return torch_pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)

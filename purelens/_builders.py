"""The builders users call: `pl.save`, `pl.patch`, ... each checks its arguments
and returns a frozen intervention node (see `_interventions`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from . import _select
from ._errors import PurelensError
from ._interventions import (
    Ablate,
    Add,
    Patch,
    Replace,
    Save,
    Scale,
    Skip,
    Stop,
    Transplant,
    takes_saved,
)
from ._site import is_wildcard, parse_site

__all__ = [
    "ablate",
    "add",
    "check_name",
    "patch",
    "replace",
    "save",
    "scale",
    "selectors",
    "skip",
    "stop",
    "transplant",
]

_NOT_CALLABLE = "`{arg}` of {builder}({site!r}, ...) must be callable, got {value!r}."
_BAD_ABLATE = "`how` of pl.ablate({site!r}) must be 'zero' or 'mean', got {how!r}."
_BAD_VALUE = (
    "`{arg}` of {builder}({site!r}, ...) must be a tensor or a number, got {value}.\n"
    "  E.g. {builder}({site!r}, torch.ones(d)) or {builder}({site!r}, 2.0); a list of "
    "numbers is made a tensor."
)


def selectors(step: Any, batch: Any, call: Any) -> tuple[Any, Any, Any]:
    """`step=`, `batch=` and `call=` checked, in the order the nodes take them."""
    return _select.check_steps(step), _select.check_rows(batch), _select.check_calls(call)


def check_name(name: Any, site: str, builder: str) -> None:
    """Raise for a `name` that is not a string, or given with a wildcard site."""
    if name is None:
        return
    if not isinstance(name, str):
        raise PurelensError(f"`name` of {builder}({site!r}) must be a string, got {name!r}.")
    if name != site and is_wildcard(site):
        raise PurelensError(
            f"{builder}({site!r}, name={name!r}): a site with '*' saves each match under "
            "its own name (the site with '*' filled in), so `name` cannot be given.\n"
            "  Leave out `name`, or save each site by itself."
        )


def _check_callable(fn: Any, arg: str, builder: str, site: str) -> None:
    if not callable(fn):
        raise PurelensError(_NOT_CALLABLE.format(arg=arg, builder=builder, site=site, value=fn))


def _check_value(value: Any, arg: str, builder: str, site: str) -> Tensor | int | float | complex:
    """A tensor or a number as given; a (nested) list of numbers or an array as a tensor."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, int | float | complex) and not isinstance(value, bool):
        return value
    if not isinstance(value, str | bytes | bool | dict) and value is not None:
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            pass
        else:
            if tensor.dtype != torch.bool:
                return tensor
    shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
    raise PurelensError(_BAD_VALUE.format(arg=arg, builder=builder, site=site, value=shown))


def save(
    site: str,
    fn: Callable[[Tensor], Any] | None = None,
    *,
    name: str | None = None,
    step: Any = None,
    batch: Any = None,
    call: Any = None,
) -> Save:
    """Record the value at `site` (or `fn(value)`) under `name` in the `Record`.

    Args:
        site: where, e.g. ``"h.5"``, ``"h.5:input"``, ``"h.-1.attn"``.
        fn: applied to the value before it is kept (e.g. ``lambda v: v[:, -1]``).
        name: the key in the `Record`; default the site as written.
        step: generation steps to save at (default every step).
        batch: rows to keep (int, slice or list of ints; an int keeps the dim).
        call: for a module the model calls several times in one step, which
            calls to save (counted from 0): an int gives the tensor, a slice
            or list a tuple in call order. Without it, a save on a module
            that runs twice is an error.

    With a ``*`` in `site` (``"h.*"``), every match is saved under the site
    with ``*`` filled in (``rec["h.0"]``, ``rec["h.1"]``, ...); `name` cannot
    be given then.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> rec = pl.run(model, torch.ones(2, 3), [pl.save("0"), pl.save("1", name="act")])
        >>> rec["0"].shape, rec["act"].shape
        (torch.Size([2, 4]), torch.Size([2, 4]))
    """
    parse_site(site)
    if fn is not None:
        _check_callable(fn, "fn", "pl.save", site)
    check_name(name, site, "pl.save")
    return Save(site, fn, site if name is None else name, *selectors(step, batch, call))


def patch(
    site: str, fn: Callable[..., Tensor], *, step: Any = None, batch: Any = None, call: Any = None
) -> Patch:
    """Replace the value at `site` with `fn(value)` or `fn(value, saved)`.

    `saved` is a read-only mapping of what was saved earlier in the same pass;
    it is passed when `fn` has a second positional parameter without a
    default. The result must have the value's shape and dtype.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> rec = pl.run(model, torch.ones(2, 3), [pl.patch("0", lambda v: -v.abs())])
        >>> bool((rec.output == 0).all())
        True
    """
    parse_site(site)
    _check_callable(fn, "fn", "pl.patch", site)
    return Patch(
        site,
        fn,
        _select.check_steps(step),
        _select.check_rows(batch),
        takes_saved(fn),
        _select.check_calls(call),
    )


def replace(
    site: str, value: Tensor | float, *, step: Any = None, batch: Any = None, call: Any = None
) -> Replace:
    """Replace the value at `site` with `value` (broadcast to its shape).

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Identity())
        >>> pl.run(model, torch.ones(2, 3), [pl.replace("0", torch.arange(4.0))]).output[1]
        tensor([0., 1., 2., 3.])
    """
    parse_site(site)
    checked = _check_value(value, "value", "pl.replace", site)
    return Replace(site, checked, *selectors(step, batch, call))  # type: ignore[arg-type]


def add(
    site: str, delta: Tensor | float, *, step: Any = None, batch: Any = None, call: Any = None
) -> Add:
    """Add `delta` to the value at `site` (a steering vector, broadcast).

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
        >>> pl.run(model, torch.zeros(1, 2), [pl.add("0", torch.tensor([1.0, 2.0]))]).output
        tensor([[1., 2.]])
    """
    parse_site(site)
    checked = _check_value(delta, "delta", "pl.add", site)
    return Add(site, checked, *selectors(step, batch, call))  # type: ignore[arg-type]


def scale(
    site: str, factor: Tensor | float, *, step: Any = None, batch: Any = None, call: Any = None
) -> Scale:
    """Multiply the value at `site` by `factor`.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Identity())
        >>> pl.run(model, torch.ones(1, 2), [pl.scale("0", 3.0)]).output
        tensor([[3., 3.]])
    """
    parse_site(site)
    checked = _check_value(factor, "factor", "pl.scale", site)
    return Scale(site, checked, *selectors(step, batch, call))  # type: ignore[arg-type]


def ablate(
    site: str,
    how: Literal["zero", "mean"] = "zero",
    *,
    step: Any = None,
    batch: Any = None,
    call: Any = None,
) -> Ablate:
    """Zero the value at `site`, or replace it with its mean over batch and position.

    ``"mean"`` averages over every dimension but the last (over the selected
    rows when `batch=` is given).

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Identity())
        >>> pl.run(model, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), [pl.ablate("0", "mean")]).output
        tensor([[2., 3.],
                [2., 3.]])
    """
    parse_site(site)
    if how not in ("zero", "mean"):
        raise PurelensError(_BAD_ABLATE.format(site=site, how=how))
    return Ablate(site, how, *selectors(step, batch, call))


def transplant(
    site: str,
    *,
    src: int | list[int],
    dst: int | list[int],
    step: Any = None,
    call: Any = None,
) -> Transplant:
    """Copy the value at `site` from batch rows `src` into rows `dst`, in one pass.

    The common case of cross-prompt patching: run clean and corrupted prompts
    as one batch and move the clean activation into the corrupted row. `src`
    may be one row copied into every `dst` row.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
        >>> x = torch.tensor([[1.0], [2.0], [3.0]])
        >>> pl.run(model, x, [pl.transplant("0", src=0, dst=[1, 2])]).output
        tensor([[1.],
                [1.],
                [1.]])
    """
    parse_site(site)
    srcs, dsts = _transplant_rows(src, "src", site), _transplant_rows(dst, "dst", site)
    if len(srcs) == 1:
        srcs = srcs * len(dsts)
    if len(srcs) != len(dsts):
        raise PurelensError(
            f"pl.transplant({site!r}): {len(srcs)} `src` rows for {len(dsts)} `dst` rows; "
            "give one src row, or one per dst row."
        )
    return Transplant(site, srcs, dsts, _select.check_steps(step), call=_select.check_calls(call))


def _transplant_rows(rows: Any, arg: str, site: str) -> tuple[int, ...]:
    """`src` or `dst` as a tuple of rows; checked by type before anything else is done with it."""
    if _select.is_int(rows):
        return (rows,)
    if isinstance(rows, list | tuple | range) and rows and all(_select.is_int(r) for r in rows):
        return tuple(rows)
    plain = isinstance(rows, int | float | str | list | tuple)
    shown = repr(rows) if plain else type(rows).__name__
    raise PurelensError(
        f"`{arg}` of pl.transplant({site!r}, ...) must be a row (an int) or a non-empty list "
        f"of rows, got {shown[:80]}."
    )


def stop(site: str, *, step: Any = None, call: Any = None) -> Stop:
    """End the forward pass right after `site` has run; `rec.output` is then None.

    Everything saved up to that point is kept; modules after the site do not run.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> rec = pl.run(model, torch.ones(1, 2), [pl.save("0"), pl.stop("0")])
        >>> rec.output is None, rec["0"].shape
        (True, torch.Size([1, 2]))
    """
    parse_site(site)
    return Stop(site, _select.check_steps(step), _select.check_calls(call))


def skip(
    site: str, fn: Callable[[Tensor], Any] | None = None, *, step: Any = None, call: Any = None
) -> Skip:
    """Do not run the module at `site`; its output is `fn(input)` (default: the input).

    `input` is the module's first positional tensor argument. When the module
    returns a tuple or a ``ModelOutput`` (transformers' attention modules return
    ``(output, weights)``), `fn` must return the same structure, e.g.
    ``lambda x: (x, None)``: the module's callers would read a lone tensor's rows
    as the tuple's items. The structure is checked (the module runs once on
    fake tensors for each kind of call), and a mismatch is an error.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> pl.run(model, -torch.ones(1, 2), [pl.skip("0"), pl.skip("1")]).output
        tensor([[-1., -1.]])
    """
    path, port, op = parse_site(site)
    if port != "output" or op is not None:
        raise PurelensError(
            f"pl.skip({site!r}): skip replaces a whole module, so its site names a module "
            f"without a port; use pl.skip({path!r})."
        )
    if fn is not None:
        _check_callable(fn, "fn", "pl.skip", site)
    return Skip(site, fn, _select.check_steps(step), _select.check_calls(call))

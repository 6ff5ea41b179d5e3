"""The `batch=`, `step=` and `call=` selectors: check them once, apply them per call.

`step=` picks generation steps and `call=` the calls of the site's module
within one step (a module the model calls several times per pass); both
count from 0. `batch=` picks rows of the site's first dimension. An int keeps that
dimension (size 1), so functions see the layout the model uses. Rows are
written back out of place, so selection composes with `vmap` and `grad`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._errors import PurelensError

__all__ = [
    "Calls",
    "Rows",
    "Steps",
    "check_calls",
    "check_rows",
    "check_steps",
    "is_int",
    "put_rows",
    "row_indices",
    "step_selected",
    "take_rows",
]

Rows = int | slice | tuple[int, ...] | None
Steps = int | slice | frozenset[int] | None
Calls = Steps

_BAD_ROWS = (
    "`batch` must be an int, a slice or a list of ints, got {value!r}.\n"
    "  Example: batch=0, batch=slice(0, 4) or batch=[0, 2]."
)
_BAD_STEPS = (
    "`step` must be an int, a slice or an iterable of ints, got {value!r}.\n"
    "  Example: step=0 (the prompt pass; in a pipeline, the first denoising step), "
    "step=slice(3, None) or step=[1, 2]."
)
_BAD_CALLS = (
    "`call` must be an int, a slice or an iterable of ints, got {value!r}.\n"
    "  Example: call=0 (the module's first call in the step), call=slice(None) (every "
    "call) or call=[1, 2]."
)
_CALLS_FROM_ZERO = (
    "\n  Calls are the module's calls within one step, counted from 0 (negative calls are "
    "not counted from the end); select at least one."
)
_NO_ROWS = (
    "`batch=[]` selects no rows, so the intervention would never act.\n"
    "  Leave `batch` out to act on every row, or list at least one."
)
_FROM_ZERO = (
    "\n  Steps are generation steps counted from 0 (the prompt pass), or a pipeline's "
    "denoising steps from 0; select at least one."
)
_ROWS_OUT_OF_RANGE = (
    "`batch={rows!r}` at site {site!r} selects rows outside the batch of size {size} "
    "(or none of its rows)."
)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _slice_problem(s: slice, *, negative: bool) -> str | None:
    """Why `s` is not a selector slice (None when it is one)."""
    if not all(v is None or is_int(v) for v in (s.start, s.stop, s.step)):
        return "its bounds must be ints or None"
    if s.step is not None and s.step <= 0:
        return "its step must be positive (rows and steps are selected in order)"
    if not negative and any(v is not None and v < 0 for v in (s.start, s.stop)):
        return "steps and calls count from 0, so its bounds cannot be negative"
    return None


def check_rows(batch: Any) -> Rows:
    """Validate a `batch=` selector and make it hashable (a list becomes a tuple)."""
    if batch is None or is_int(batch):
        return batch
    if isinstance(batch, slice):
        problem = _slice_problem(batch, negative=True)
        if problem is None:
            return batch
        raise PurelensError(_BAD_ROWS.format(value=batch) + f"\n  The slice is refused: {problem}.")
    if isinstance(batch, list | tuple | range) and all(is_int(b) for b in batch):
        if not batch:
            raise PurelensError(_NO_ROWS)
        return tuple(batch)
    raise PurelensError(_BAD_ROWS.format(value=batch))


def check_steps(step: Any) -> Steps:
    """Validate a `step=` selector; an iterable becomes a frozenset."""
    return _check_counts(step, _BAD_STEPS, _FROM_ZERO)


def check_calls(call: Any) -> Calls:
    """Validate a `call=` selector; an iterable becomes a frozenset."""
    return _check_counts(call, _BAD_CALLS, _CALLS_FROM_ZERO)


def _check_counts(value: Any, bad: str, advice: str) -> Steps:
    if value is None:
        return value
    if is_int(value):
        if value < 0:
            raise PurelensError(bad.format(value=value) + advice)
        return value
    if isinstance(value, slice):
        problem = _slice_problem(value, negative=False)
        if problem is None:
            return value
        raise PurelensError(bad.format(value=value) + f"\n  The slice is refused: {problem}.")
    if isinstance(value, Iterable) and not isinstance(value, str | bytes | dict):
        try:
            counts = tuple(value)
        except TypeError:  # iterable in name only (a purelens.ops expression)
            counts = ()
        if counts and all(is_int(s) and s >= 0 for s in counts):
            return frozenset(counts)
    raise PurelensError(bad.format(value=value) + advice)


def step_selected(steps: Steps, step: int) -> bool:
    """Whether generation step `step` (0 is the prompt pass), or call `step`, is selected."""
    if steps is None:
        return True
    if isinstance(steps, int):
        return steps == step
    if isinstance(steps, slice):
        start, stop, stride = steps.start or 0, steps.stop, steps.step or 1
        return step >= start and (stop is None or step < stop) and (step - start) % stride == 0
    return step in steps


def row_indices(rows: Rows, size: int, site: str) -> list[int]:
    """The rows `rows` selects in a batch of `size`, as non-negative indices (checked)."""
    if isinstance(rows, slice):
        indices = list(range(size))[rows]
        if not indices:
            raise PurelensError(_ROWS_OUT_OF_RANGE.format(rows=rows, site=site, size=size))
        return indices
    picked = (rows,) if isinstance(rows, int) else rows
    assert picked is not None
    if any(not -size <= r < size for r in picked):
        raise PurelensError(_ROWS_OUT_OF_RANGE.format(rows=rows, site=site, size=size))
    return [r % size for r in picked]


def take_rows(value: Tensor, rows: Rows, site: str) -> Tensor:
    """The selected rows of `value` (all of it when `rows` is None)."""
    if rows is None:
        return value
    if isinstance(rows, slice):
        if not range(value.shape[0])[rows]:
            raise PurelensError(
                _ROWS_OUT_OF_RANGE.format(rows=rows, site=site, size=value.shape[0])
            )
        return value[rows]
    return value[row_indices(rows, value.shape[0], site)]


def put_rows(value: Tensor, rows: Rows, new: Tensor, site: str) -> Tensor:
    """`value` with the selected rows replaced by `new`, out of place."""
    if rows is None:
        return new
    index = torch.tensor(row_indices(rows, value.shape[0], site), device=value.device)
    return value.index_put((index,), new)

"""sweep(): many experiments on one input, in as few batched passes as memory allows.

A sweep is a list of *cells*, each a list of interventions (patch layer l at
position p; add steering vector v). Written as a loop it costs one forward
pass per cell. Because interventions are values, purelens batches them in
one of two ways:

* **vmap**, when the cells differ only in their tensors (64 steering vectors
  at one site): `torch.func.vmap` over the stacked tensors. Everything before
  the first site they touch is computed once, unbatched, which makes it the
  fastest path for such sweeps (benchmarks/RESULTS.md).
* **fold**, for any cells whose interventions act on rows (patches at
  different sites and positions): the input is repeated once per cell, and
  each cell's interventions act on its own rows (``batch=``).

`method="auto"` takes vmap when it applies and folds otherwise, also when
the model cannot run under vmap.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import optree
import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor, nn

from ._backend import module_of
from ._eager import eager_under_compile
from ._errors import PurelensError
from ._inputs import call_arguments
from ._interventions import (
    Intervention,
    Patch,
    Save,
    Transplant,
    Writer,
    describe,
    flatten_interventions,
)
from ._record import Record
from ._remote import check_local
from ._run import run
from ._select import row_indices
from ._tree import NAMESPACE

__all__ = ["sweep"]

Method = Literal["auto", "fold", "vmap"]

_NO_CELLS = (
    "`cells` must be a non-empty list of cells (each a list of interventions), got {value!r}."
)
_NO_BATCH = (
    "pl.sweep needs a batch to repeat: `inputs` holds no tensor with a batch dimension "
    "(got {kind})."
)
_WHOLE_PASS = (
    "cell {k} holds {iv!r}, which acts on the whole pass, not on the cell's rows, so cells "
    "cannot be folded into one batch.\n  Put it in `base=` (it then applies to every cell), "
    "or use method='vmap' when the cells differ only in their tensors."
)
_NOT_SAME_SAVES = (
    "every cell must save the same names, to stack them: cell 0 saves {first}, cell {k} "
    "saves {other}."
)
_NOT_VMAPPABLE = (
    "method='vmap' needs cells that differ only in their tensors (the same interventions, "
    "sites and functions, with tensors of one shape); cell {k} differs from cell 0: {why}.\n"
    "  Use method='fold' (the default), which takes any cells whose interventions act on rows."
)
_BAD_METHOD = "`method` must be 'auto', 'fold' or 'vmap', got {value!r}."
_BAD_CHUNK = "`chunk` must be a positive int (cells per pass) or None, got {value!r}."
_UNSPLITTABLE = (
    "the model's output{where} has shape {shape}, with no row per example of the folded "
    "batch (a loss reduced over it, say), so it cannot be split into the cells' values: "
    "each cell would get the value of all cells together.\n"
    "  Keep only per-row outputs (output=lambda out: out.logits) and compute such values "
    "from them, or use method='vmap' (cells that differ only in their tensors)."
)
_ROWS_MIX = (
    "a cell folded into a batch with others gives other values than alone: the "
    "model mixes the rows of its batch (batch norm in training mode, a sequence-first "
    "layout such as nn.GRU(batch_first=False)), so folded cells would see each other.\n"
    "  Use method='vmap' (cells that differ only in their tensors), chunk=1, or model.eval()."
)
_CELL = "\x00cell{k}\x00"
_FALLBACK_BYTES = 2**26  # per cell, when no estimate can be made


@eager_under_compile
def sweep(
    model: nn.Module,
    inputs: Any,
    cells: Sequence[Any],
    *,
    base: Any = (),
    output: Callable[[Any], Any] | None = None,
    chunk: int | None = None,
    max_memory: int = 2**30,
    method: Method = "auto",
    progress: bool = True,
    tokenizer: Any = None,
    **model_kwargs: Any,
) -> Record:
    """Run one experiment per cell on the same `inputs`, batched, and stack the results.

    The result equals stacking ``pl.run(model, inputs, [base, cell])`` over
    the cells (up to float rounding), at the cost of a few batched passes.

    Args:
        model: any `torch.nn.Module` whose rows do not mix (batch norm in
            training mode does; an eval-mode transformer does not).
        inputs: as for `pl.run`; every tensor whose first dimension is the
            batch is repeated once per cell of a pass.
        cells: a list of cells, each an intervention or a list of them. With
            folding, each cell's interventions act on its own rows (a
            ``batch=`` given in a cell counts within the cell); every cell
            must save the same names.
        base: interventions applied to every cell (e.g. `pl.stop` after the
            last site you need, or a patch shared by all cells).
        output: applied to each cell's model output before it is kept, e.g.
            ``lambda out: out.logits[:, -1]``; keeping only what you need
            saves memory on large sweeps. Default: the whole output (cache
            objects such as ``past_key_values`` are dropped).
        chunk: cells per pass; default as many as fit `max_memory`.
        max_memory: bytes of activations one pass may use, estimated from
            the shapes of every site (`pl.shapes`) for one cell.
        method: ``"vmap"`` (`torch.func.vmap` over the cells' tensors,
            which needs cells that differ only in them), ``"fold"`` (cells
            folded into the batch, which needs interventions that act on
            rows), or ``"auto"``: vmap where it applies, else fold.
        progress: show a progress bar when the sweep takes several passes.
        tokenizer: for text `inputs`.
        **model_kwargs: further keyword arguments of the model call.

    Returns:
        A `Record` whose saved values and output have the cells as their
        first dimension: ``rec[name][k]`` is what cell ``k`` saved, and
        ``rec.output`` stacks ``output(out)`` over the cells.

    Raises:
        PurelensError: an empty sweep, cells that save different names, or
            an intervention that cannot act on one cell's rows (`pl.stop`,
            `pl.skip`, gradients), which belongs in `base`.

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> x = torch.randn(3, 4)
        >>> vectors = torch.randn(10, 4)
        >>> rec = pl.sweep(model, x, [pl.add("0", v) for v in vectors], base=[pl.save("0")])
        >>> rec.output.shape, rec["0"].shape
        (torch.Size([10, 3, 4]), torch.Size([10, 3, 4]))
        >>> torch.allclose(rec.output[7], pl.run(model, x, [pl.add("0", vectors[7])]).output)
        True
    """
    check_local(model, "pl.sweep")
    model = module_of(model, "pl.sweep")
    if method not in ("auto", "fold", "vmap"):
        raise PurelensError(_BAD_METHOD.format(value=method))
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise PurelensError(_BAD_CHUNK.format(value=chunk))
    if isinstance(cells, Intervention) or not isinstance(cells, Sequence) or not cells:
        raise PurelensError(_NO_CELLS.format(value=cells))
    cell_ivs = [flatten_interventions(cell) for cell in cells]
    base_ivs = flatten_interventions(base)
    args, kwargs = call_arguments(inputs, tokenizer, model_kwargs, model)
    size = _batch_size((args, kwargs))
    stacked: tuple[Any, list[Tensor]] | None = None
    if method != "fold":
        try:
            stacked = _stack_cells(cell_ivs)
        except PurelensError:
            if method == "vmap":
                raise
    keep = output if output is not None else (lambda out: out)
    if chunk is None:
        chunk = _cells_per_pass(model, args, kwargs, max_memory, len(cell_ivs))
    chunks = [range(i, min(i + chunk, len(cell_ivs))) for i in range(0, len(cell_ivs), chunk)]
    parts = []
    for ks in _progress(chunks, len(cell_ivs), progress):
        if stacked is not None:
            spec, leaves = stacked
            cell_leaves = [leaf[ks.start : ks.stop] for leaf in leaves]
            try:
                parts.append(
                    _vmap_chunk(model, args, kwargs, size, base_ivs, spec, cell_leaves, keep)
                )
                continue
            except RuntimeError:
                # Under "auto", a model that vmap cannot batch (an in-place write
                # into an unbatched tensor, dropout) is folded instead.
                if method == "vmap" or parts:
                    raise
                stacked = None
        cells_here = [cell_ivs[k] for k in ks]
        parts.append(_fold_chunk(model, args, kwargs, size, base_ivs, cells_here, keep))
        if len(ks) > 1 and len(parts) == 1:
            _check_alone(model, args, kwargs, size, base_ivs, cells_here[-1], keep, parts[0])
    return _concat(parts)


def _check_alone(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    size: int,
    base: tuple[Intervention, ...],
    cell: tuple[Intervention, ...],
    keep: Callable[[Any], Any],
    folded: Record,
) -> None:
    """Raise unless the last cell, folded after the others, gives what it gives alone.

    Folding assumes rows that do not mix: a model that mixes them (batch norm in
    training mode, a sequence-first layout) would give cells the others' rows. One
    more pass, for the last cell alone (which a causal mix reaches too), tells.
    """
    alone = run(model, args, [*base, *cell], **kwargs)
    pairs = [(folded[name][-1], alone[name]) for name in folded]
    if folded.output is not None and alone.output is not None:
        mine = keep(_cell_output(alone.output, 0, 1, size))
        flat_folded = torch_pytree.tree_leaves(folded.output)
        flat_alone = torch_pytree.tree_leaves(mine)
        pairs += [(a[-1], b) for a, b in zip(flat_folded, flat_alone, strict=False)]
    for a, b in pairs:
        if isinstance(a, Tensor) and isinstance(b, Tensor) and not _close(a, b):
            raise PurelensError(_ROWS_MIX)


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not (a.is_floating_point() or a.is_complex()) or not a.numel():
        return bool(torch.equal(a, b))
    low = a.dtype in (torch.float16, torch.bfloat16)
    a, b = a.detach(), b.detach()
    gap = float((a - b).abs().max())
    return gap <= (5e-2 if low else 1e-3) * float(b.abs().max()) + (1e-2 if low else 1e-4)


# Folding -------------------------------------------------------------------


def _foldable(iv: Intervention) -> bool:
    return isinstance(iv, Save | Writer)


def _fold_chunk(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    size: int,
    base: tuple[Intervention, ...],
    cells: list[tuple[Intervention, ...]],
    keep: Callable[[Any], Any],
) -> Record:
    n = len(cells)
    # Base interventions that act on rows go into every cell, so that their
    # tensors and functions see one cell's rows, as in a loop; the others
    # (stop, skip) act on the whole pass once.
    rowwise = tuple(iv for iv in base if _foldable(iv))
    whole = [iv for iv in base if not _foldable(iv)]
    ivs = [iv for k, cell in enumerate(cells) for iv in _in_cell((*rowwise, *cell), k, size)]
    folded_args, folded_kwargs = _repeat((args, kwargs), size, n)
    rec = run(model, tuple(folded_args), [*whole, *ivs], **folded_kwargs)
    names = [_save_names(cell) for cell in cells]
    for k, other in enumerate(names):
        if other != names[0]:
            raise PurelensError(_NOT_SAME_SAVES.format(first=names[0], k=k, other=other))
    saved = {
        name: torch.stack([rec[_CELL.format(k=k) + name] for k in range(n)])
        for name in _save_names(rowwise) + names[0]
    }
    outputs = None
    if rec.output is not None:
        outputs = _stack([keep(_cell_output(rec.output, k, n, size)) for k in range(n)])
    return Record(saved, outputs)


def _in_cell(cell: tuple[Intervention, ...], k: int, size: int) -> Iterator[Intervention]:
    """The cell's interventions, acting on rows ``k * size ...`` of the folded batch."""
    for iv in cell:
        if not _foldable(iv):
            raise PurelensError(_WHOLE_PASS.format(k=k, iv=iv))
        if isinstance(iv, Transplant):
            src, dst = _shift_rows(iv.src, k, size, iv), _shift_rows(iv.dst, k, size, iv)
            yield dataclasses.replace(iv, src=src, dst=dst)  # type: ignore[type-var]
            continue
        changes: dict[str, Any] = {"batch": _shift_rows(iv.batch, k, size, iv)}  # type: ignore[attr-defined]
        if isinstance(iv, Save):
            changes["name"] = _CELL.format(k=k) + iv.name
        if isinstance(iv, Patch) and iv.takes_saved:
            changes["fn"] = _with_cell_view(iv.fn, k)
        yield dataclasses.replace(iv, **changes)  # type: ignore[type-var]


def _shift_rows(rows: Any, k: int, size: int, iv: Intervention) -> Any:
    """A row selection within one cell, as rows of the folded batch."""
    if rows is None:
        return slice(k * size, (k + 1) * size)
    return tuple(k * size + r for r in row_indices(rows, size, iv.site))


def _with_cell_view(fn: Callable[..., Tensor], k: int) -> Callable[..., Tensor]:
    def in_cell(value: Tensor, saved: Mapping[str, Any]) -> Tensor:
        return fn(value, _CellView(saved, k))

    return in_cell


class _CellView(Mapping[str, Any]):
    """What one cell's patch function sees as `saved`: that cell's saves, by their names."""

    def __init__(self, saved: Mapping[str, Any], k: int) -> None:
        self._saved, self._prefix = saved, _CELL.format(k=k)

    def __getitem__(self, name: str) -> Any:
        return self._saved[self._prefix + name]

    def __iter__(self) -> Iterator[str]:
        return (n.removeprefix(self._prefix) for n in self._saved if n.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _save_names(cell: tuple[Intervention, ...]) -> list[str]:
    return [iv.name for iv in cell if isinstance(iv, Save)]


def _repeat(tree: Any, size: int, n: int) -> Any:
    """Every tensor whose first dimension is the batch, repeated `n` times along it."""

    def rep(x: Any) -> Any:
        if isinstance(x, Tensor) and x.ndim and x.shape[0] == size:
            return x.repeat(n, *([1] * (x.ndim - 1)))
        return x

    return torch_pytree.tree_map(rep, tree)


def _cell_output(output: Any, k: int, n: int, size: int) -> Any:
    """Cell `k`'s rows of the folded output; leaves that are not tensors (caches) dropped.

    A tensor without a row per example of the folded batch (a loss reduced
    over it) cannot be told apart by cell: it becomes an `_Unsplittable`, an
    error as soon as it is used or kept.
    """

    def rows(path: Any, x: Any) -> Any:
        if isinstance(x, Tensor):
            if x.ndim and x.shape[0] == n * size:
                return x[k * size : (k + 1) * size]
            return x if n == 1 else _Unsplittable(torch_pytree.keystr(path), x)
        return None if x is not None and not isinstance(x, int | float | bool | str) else x

    return torch_pytree.tree_map_with_path(rows, output)


class _Unsplittable:
    """A part of a folded output that holds no row per cell: using it is an error."""

    def __init__(self, where: str, value: Tensor) -> None:
        self._message = _UNSPLITTABLE.format(where=where or "output", shape=list(value.shape))

    def fail(self, *args: Any, **kwargs: Any) -> Any:
        raise PurelensError(self._message)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        self.fail()

    def __iter__(self) -> Any:
        raise TypeError(self._message)  # as for any value that is not iterable

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        leaves = torch_pytree.tree_leaves((args, kwargs))
        next(a for a in leaves if isinstance(a, cls)).fail()

    __getitem__ = __float__ = __int__ = __bool__ = __len__ = fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = fail
    __truediv__ = __rtruediv__ = __matmul__ = __rmatmul__ = __neg__ = __pow__ = fail


def _join(trees: list[Any], join: Callable[[list[Tensor]], Tensor]) -> Any:
    """Trees of one structure joined leafwise (`torch.stack` or `torch.cat`)."""
    flat = [torch_pytree.tree_flatten(t) for t in trees]
    for leaf in flat[0][0]:
        if isinstance(leaf, _Unsplittable):
            leaf.fail()
    columns = zip(*(leaves for leaves, _ in flat), strict=True)
    joined = [join(list(col)) if isinstance(col[0], Tensor) else col[0] for col in columns]
    return torch_pytree.tree_unflatten(joined, flat[0][1])


def _stack(trees: list[Any]) -> Any:
    return _join(trees, torch.stack)


def _concat(parts: list[Record]) -> Record:
    if len(parts) == 1:
        return parts[0]
    saved = _join([dict(p) for p in parts], torch.cat)
    if parts[0].output is None:
        return Record(saved)
    return Record(saved, _join([p.output for p in parts], torch.cat))


# vmap ----------------------------------------------------------------------


def _stack_cells(cells: list[tuple[Intervention, ...]]) -> tuple[Any, list[Tensor]]:
    """The cells' common structure and their tensors stacked along a new first dimension."""
    flat: list[Any] = [optree.tree_flatten(cell, namespace=NAMESPACE) for cell in cells]  # type: ignore[arg-type]
    leaves, spec = flat[0]
    if not leaves:
        raise PurelensError(_NOT_VMAPPABLE.format(k=0, why="it holds no tensor to batch over"))
    for k, (other, other_spec) in enumerate(flat):
        if other_spec != spec:
            raise PurelensError(_NOT_VMAPPABLE.format(k=k, why="other interventions or functions"))
        for i, (a, b) in enumerate(zip(leaves, other, strict=True)):
            if not (isinstance(b, Tensor) and isinstance(a, Tensor) and a.shape == b.shape):
                why = f"its tensor {i} is {describe(b)}, cell 0's is {describe(a)}"
                raise PurelensError(_NOT_VMAPPABLE.format(k=k, why=why))
    return spec, [torch.stack(column) for column in zip(*(ls for ls, _ in flat), strict=True)]


def _vmap_chunk(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    size: int,
    base: tuple[Intervention, ...],
    spec: Any,
    leaves: list[Tensor],
    keep: Callable[[Any], Any],
) -> Record:
    def one(*cell_leaves: Tensor) -> Record:
        ivs = [*base, *optree.tree_unflatten(spec, cell_leaves)]
        rec = run(model, args, ivs, **kwargs)
        return Record(dict(rec), keep(_cell_output(rec.output, 0, 1, size)))

    return torch.func.vmap(one)(*leaves)


# Sizes ---------------------------------------------------------------------


def _batch_size(inputs: Any) -> int:
    leaves = [x for x in torch_pytree.tree_leaves(inputs) if isinstance(x, Tensor) and x.ndim]
    if not leaves:
        raise PurelensError(_NO_BATCH.format(kind=type(inputs).__name__))
    return int(leaves[0].shape[0])


_ESTIMATES: weakref.WeakKeyDictionary[nn.Module, dict[Any, int]] = weakref.WeakKeyDictionary()


def _cells_per_pass(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int, n: int
) -> int:
    """How many cells one pass may hold: `budget` over the estimated bytes of one cell."""
    signature = (
        torch.is_grad_enabled(),
        tuple(
            (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x)
            for x in torch_pytree.tree_leaves((args, kwargs))
        ),
        tuple(kwargs),
    )
    known = _ESTIMATES.setdefault(model, {})
    if signature not in known:  # a fake pass costs about a fifth of a real one: once per shape
        known[signature] = _cell_bytes(model, args, kwargs)
    return max(1, min(n, budget // known[signature]))


def _cell_bytes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Estimated bytes of activations one cell adds to a pass, from `pl.shapes`.

    With autograd recording, every activation is kept: one cell costs the
    sum over all sites. Without, a pass holds a few at a time, plus the output.
    """
    from ._shapes import shapes

    try:
        survey = shapes(model, args, **kwargs)
    except PurelensError:  # no estimate (the model reads tensor values): moderate passes
        return _FALLBACK_BYTES
    sizes = [math.prod(s) * survey.dtypes[name].itemsize for name, s in survey.items()]
    if not sizes:
        return 1
    root = survey.get("")
    output = math.prod(root) * survey.dtypes[""].itemsize if root is not None else max(sizes)
    return max(1, sum(sizes) if torch.is_grad_enabled() else output + 4 * max(sizes))


def _progress(chunks: list[range], total: int, show: bool) -> Iterator[range]:
    if not show or len(chunks) == 1:
        yield from chunks
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="sweep", unit="cell", leave=False) as bar:
        for ks in chunks:
            yield ks
            bar.update(len(ks))

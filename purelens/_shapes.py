"""shapes(): the shape and dtype at every site, with no real compute.

The model runs once on fake tensors (shapes without data), so planning an
experiment costs a fraction of a forward pass and no activation memory. It
works on a model built under ``accelerate.init_empty_weights()``, whose
weights are not in memory at all.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._backend import module_of
from ._eager import eager_under_compile
from ._errors import MissingSaveError, PurelensError, SiteError
from ._inputs import call_arguments
from ._interventions import Save, describe
from ._pass import Pass
from ._plan import Plan, hookable
from ._remote import check_local
from ._run import forward_pass
from ._site import module_names as all_sites
from ._site import resolve
from ._validate import fake_pass

__all__ = ["Shapes", "shapes"]

_NOT_SURVEYED = "{site!r} is not among the sites surveyed. Surveyed: {some}{more}."


class Shapes(Mapping[str, torch.Size]):
    """``{site: torch.Size}`` for the sites of one pass, with ``.dtypes`` beside it.

    Examples:
        >>> import torch, purelens as pl
        >>> s = pl.shapes(torch.nn.Sequential(torch.nn.Linear(3, 5)), torch.ones(2, 3))
        >>> s["0"], s.dtypes["0"]
        (torch.Size([2, 5]), torch.float32)
    """

    def __init__(
        self,
        shapes: Mapping[str, torch.Size],
        dtypes: Mapping[str, torch.dtype],
        model: nn.Module | None = None,
    ) -> None:
        self._shapes = dict(shapes)
        self.dtypes: Mapping[str, torch.dtype] = _Dtypes(self, dict(dtypes))
        self._model = weakref.ref(model) if model is not None else None

    def _key(self, site: str) -> str:
        """`site` as surveyed: as written, or resolved like any site (``"h.1"``)."""
        if site in self._shapes:
            return site
        model = self._model() if self._model is not None else None
        if model is not None:
            try:
                name, _, port = resolve(model, site)
            except SiteError:
                pass
            else:
                if port == "output" and name in self._shapes:
                    return name
        some = ", ".join(repr(s) for s in list(self._shapes)[:8])
        more = ", ..." if len(self._shapes) > 8 else ""
        raise MissingSaveError(_NOT_SURVEYED.format(site=site, some=some, more=more))

    def __getitem__(self, site: str) -> torch.Size:
        return self._shapes[self._key(site)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __repr__(self) -> str:
        width = max((len(s) for s in self._shapes), default=0) + 2
        rows = [
            f"  {site!r:<{width}} {str(self.dtypes[site]).removeprefix('torch.'):>9} {list(shape)}"
            for site, shape in self._shapes.items()
        ]
        return "Shapes(\n" + "\n".join(rows) + "\n)"


class _Dtypes(Mapping[str, torch.dtype]):
    """``Shapes.dtypes``: the same keys, and the same site lookup."""

    def __init__(self, owner: Shapes, dtypes: dict[str, torch.dtype]) -> None:
        self._owner, self._dtypes = owner, dtypes

    def __getitem__(self, site: str) -> torch.dtype:
        return self._dtypes[self._owner._key(site)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dtypes)

    def __len__(self) -> int:
        return len(self._dtypes)


@eager_under_compile
def shapes(
    model: nn.Module,
    inputs: Any,
    sites: Iterable[str] | None = None,
    *,
    tokenizer: Any = None,
    **model_kwargs: Any,
) -> Shapes:
    """The shape (and dtype) of the value at each site for `inputs`, with no real compute.

    Args:
        model: any module, also one built under ``accelerate.init_empty_weights()``.
        inputs: as for `pl.run`.
        sites: the sites to report (with ports, if you like); default every
            module that runs, at its output (modules whose output holds no
            tensor are left out).
        tokenizer: for text `inputs`.
        **model_kwargs: further keyword arguments of the model call.

    Returns:
        `Shapes`: a mapping ``{site: torch.Size}`` in the order the model
        runs them, and ``.dtypes`` ``{site: torch.dtype}``. Surveyed sites
        are full module paths; any site that resolves to one (``"h.1"``)
        looks it up.

    Raises:
        SiteError: a site given in `sites` matches no module, or several.
        PurelensError: a site given in `sites` does not run, or the model
            cannot run on fake tensors (it reads tensor values).

    Examples:
        >>> import torch, purelens as pl
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU())
        >>> dict(pl.shapes(model, torch.ones(2, 3), sites=["0:input", "1"]))
        {'0:input': torch.Size([2, 3]), '1': torch.Size([2, 5])}
    """
    check_local(model, "pl.shapes")
    model = module_of(model, "pl.shapes")
    survey = sites is None
    if sites is None:  # every module that can run, at its output
        names = [s for s in all_sites(model) if hookable(model.get_submodule(s))]
    else:
        names = list(sites)
    plan = Plan.build(model, tuple(Save(site, None, site) for site in names))
    args, kwargs = call_arguments(inputs, tokenizer, model_kwargs, model)
    pass_ = Pass(plan, model, lenient=survey)
    fake_pass(model, pass_, args, kwargs, None, forward_pass, check=not survey, what="pl.shapes")
    values = pass_.saved
    order = list(values) if survey else names
    missing = [s for s in order if not isinstance(values.get(s), torch.Tensor)]
    if missing and not survey:
        raise PurelensError(
            f"site {missing[0]!r} gave {describe(values.get(missing[0]))}, not a tensor."
        )
    kept = [s for s in order if s not in missing]
    return Shapes({s: values[s].shape for s in kept}, {s: values[s].dtype for s in kept}, model)

"""sites(): what a model offers to intervene on, as site strings.

Module paths come from the module tree. For a transformers model (or with
example `inputs`) the model first runs once on fake tensors (shapes, no
compute), so that modules that never run, such as GPT-2's ``attn_dropout``,
are left out, and op sites can be listed. Attention modules also list their
attention ports.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from ._attention import has_attention
from ._backend import is_pipeline, is_vllm, module_of
from ._errors import PurelensError
from ._hooks import calling
from ._inputs import call_arguments
from ._interventions import Save
from ._opsites import OpSurvey
from ._pass import Pass
from ._plan import Plan, hookable
from ._remote import Remote
from ._run import forward_pass
from ._site import ATTENTION_PORTS, module_names, tree_version
from ._validate import fake_pass

__all__ = ["sites"]


def sites(
    model: nn.Module, inputs: Any = None, *, ops: bool = False, tokenizer: Any = None
) -> list[str]:
    """Every site of `model` (local or `pl.remote`): module paths, ports, op sites.

    Each module path (``""`` is the root) can be used as a site as it is, or
    with ``":input"`` or ``":output"``; any unique dot-boundary suffix works
    too. Attention modules add their ports (``"h.0.attn:pattern"``, ...).

    Args:
        model: the model.
        inputs: an example input, as for `pl.run`. With it (or, for a
            transformers model, with its ``dummy_inputs``), the model runs
            once on fake tensors, and modules that never run are left out.
        ops: also list op sites (``"h.0.attn#softmax.0"``), found by that
            run: every torch operation each module's own code makes.
        tokenizer: for text `inputs`.

    Examples:
        >>> import torch, purelens as pl
        >>> pl.sites(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        ['', '0', '1']
        >>> pl.sites(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.ones(1, 2), ops=True)
        ['', '0', '0#linear.0']
    """
    if isinstance(model, Remote):
        return list(model.sites)
    if is_vllm(model):
        from .vllm._engine import sites_of

        return sites_of(model)
    if is_pipeline(model):
        from ._pipeline import sites_of as of_pipeline

        if inputs is not None or ops:
            raise PurelensError(
                "pl.sites(pipe) lists the module paths of a pipeline's components and takes "
                "no inputs or ops=.\n  For op sites, list one component's: "
                "pl.sites(pipe.unet, (latents, t, text_embeddings), ops=True)."
            )
        return of_pipeline(model)
    model = module_of(model, "pl.sites")
    example = inputs is not None
    if not example:  # the same answer until the module tree changes
        cached = _listed.get(model)
        if cached is not None and cached[0] == (tree_version(model), ops):
            return list(cached[1])
    names = module_names(model)
    if inputs is None:
        inputs = _dummy_inputs(model)
    ran: set[str] | None = None
    found: dict[str, list[str]] = {}
    if inputs is not None:
        try:
            ran, found = _survey(model, names, inputs, tokenizer, ops)
        except PurelensError:
            if example:
                raise
    if ops and ran is None:
        raise PurelensError(
            "pl.sites(model, ops=True) lists op sites by running the model once on fake "
            "tensors, and needs an example input: pl.sites(model, inputs, ops=True)."
        )
    out: list[str] = []
    for name in names:
        if ran is not None and name and name not in ran:
            continue
        out.append(name)
        if has_attention(model.get_submodule(name)):
            out.extend(f"{name}:{port}" for port in ATTENTION_PORTS)
        out.extend(found.get(name, ()))
    if not example:
        _listed[model] = ((tree_version(model), ops), tuple(out))
    return out


_listed: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, bool], tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _dummy_inputs(model: nn.Module) -> Any:
    try:
        inputs = getattr(model, "dummy_inputs", None)
    except Exception:  # a property that needs more than the model has
        return None
    return inputs if isinstance(inputs, dict) and inputs else None


def _survey(
    model: nn.Module, names: list[str], inputs: Any, tokenizer: Any, ops: bool
) -> tuple[set[str], dict[str, list[str]]]:
    """Which modules run on `inputs` (on fake tensors), and their op sites if `ops`."""
    runnable = [n for n in names if hookable(model.get_submodule(n))]
    plan = Plan.build(model, tuple(Save(n, None, n) for n in runnable))
    args, kwargs = call_arguments(inputs, tokenizer, {}, model)
    pass_ = Pass(plan, model, lenient=True)
    paths = {model.get_submodule(n): n for n in runnable}
    survey = OpSurvey(paths)

    def forward(*a: Any) -> Any:
        if not ops:
            return forward_pass(*a)
        with calling(list(paths), survey.enter, survey.leave), survey:
            return forward_pass(*a)

    fake_pass(model, pass_, args, kwargs, None, forward, check=False, what="pl.sites")
    ran = {site.name for site in plan.sites if pass_.most_calls.get(id(site))}
    found: dict[str, list[str]] = {}
    for op_site in survey.found:
        found.setdefault(op_site.partition("#")[0], []).append(op_site)
    return ran, found

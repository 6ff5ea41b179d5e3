"""Which kind of model a call was given, for the entry points that dispatch on it.

`pl.run`, `pl.generate` and `pl.sites` take a module, a remote model
(`pl.remote`), a vLLM engine (`pl.vllm.load`) or (`pl.generate`, `pl.sites`) a diffusers
pipeline; vLLM and diffusers are recognised without importing them, so that purelens
loads where they are not installed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._eager import unwrapped
from ._errors import PurelensError

__all__ = ["is_pipeline", "is_vllm", "module_of"]


def is_vllm(model: Any) -> bool:
    """Whether `model` is a `vllm.LLM`."""
    return type(model).__module__.startswith("vllm.") and hasattr(model, "llm_engine")


def is_pipeline(model: Any) -> bool:
    """Whether `model` is a diffusers pipeline."""
    return any(
        c.__name__ == "DiffusionPipeline" and c.__module__.startswith("diffusers")
        for c in type(model).__mro__
    )


def module_of(model: Any, what: str) -> nn.Module:
    """The eager module `what` (``"pl.run"``, ...) works on: `model` out of a compile
    wrapper (`unwrapped`); anything else than a module is an error, which for a pipeline
    names the component to give instead."""
    module = unwrapped(model)
    if isinstance(module, nn.Module):
        return module
    if is_pipeline(module):
        from ._pipeline import refused

        raise refused(module, what)
    raise PurelensError(f"{what}: `model` must be a torch.nn.Module, got {type(module).__name__}.")

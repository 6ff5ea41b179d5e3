"""Which kind of model a call was given, for the entry points that dispatch on it.

`pl.run`, `pl.generate` and `pl.sites` take a module, a remote model
(`pl.remote`), a vLLM engine (`pl.vllm.load`) or (`pl.generate`, `pl.sites`) a diffusers
pipeline; vLLM and diffusers are recognised without importing them, so that purelens
loads where they are not installed.
"""

from __future__ import annotations

from typing import Any

from ._errors import PurelensError

__all__ = ["is_pipeline", "is_vllm", "not_a_module"]


def is_vllm(model: Any) -> bool:
    """Whether `model` is a `vllm.LLM`."""
    return type(model).__module__.startswith("vllm.") and hasattr(model, "llm_engine")


def is_pipeline(model: Any) -> bool:
    """Whether `model` is a diffusers pipeline."""
    return any(
        c.__name__ == "DiffusionPipeline" and c.__module__.startswith("diffusers")
        for c in type(model).__mro__
    )


def not_a_module(model: Any, what: str) -> PurelensError:
    """The error for `what` (``"pl.run"``, ...) given `model`, which is not a torch.nn.Module:
    for a pipeline, with the component to give it instead."""
    kind = type(model).__name__
    if is_pipeline(model):
        from ._pipeline import refused

        return refused(model, what)
    return PurelensError(f"{what}: `model` must be a torch.nn.Module, got {kind}.")

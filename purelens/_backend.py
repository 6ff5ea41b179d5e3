"""Which kind of model a call was given, for the entry points that dispatch on it.

`pl.run`, `pl.generate` and `pl.sites` take a module, a remote model
(`pl.remote`) or a vLLM engine (`pl.vllm.load`); vLLM is recognised
without importing it, so that purelens loads where vLLM is not installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_vllm"]


def is_vllm(model: Any) -> bool:
    """Whether `model` is a `vllm.LLM`."""
    return type(model).__module__.startswith("vllm.") and hasattr(model, "llm_engine")

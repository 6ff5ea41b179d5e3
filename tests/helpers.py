"""Small real models and hand-written hooks that tests compare purelens against."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Two layers with named submodules, the smallest model that has depth."""

    def __init__(self, d_in: int = 4, d_hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def tiny_gpt2(n_layer: int = 3, attn: str = "sdpa", seed: int = 0, init: float = 0.02) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=32,
        n_head=4,
        vocab_size=97,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
        initializer_range=init,
    )
    return GPT2LMHeadModel(config).eval()


@contextmanager
def raw_saves(model: nn.Module, names: list[str]) -> Iterator[dict[str, Any]]:
    """Hand-written forward hooks saving the output of modules by full name."""
    saved: dict[str, Any] = {}
    handles = []

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            saved[name] = output

        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
    try:
        yield saved
    finally:
        for h in handles:
            h.remove()


def hooks_on(model: nn.Module) -> int:
    """How many hooks of any kind sit on any module of `model`."""
    total = 0
    for module in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
        ):
            total += len(getattr(module, attr))
        total += "forward" in module.__dict__
    return total

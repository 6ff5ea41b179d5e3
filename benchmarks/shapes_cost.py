"""The cost of `pl.shapes` (fake tensors) against a real forward: time and memory.

Memory is what torch's profiler sees allocated by tensor operations during
the call (activations, not weights). Prints one Markdown table.

    python benchmarks/shapes_cost.py          # GPT-2-small shape, batch 8 x 32
    python benchmarks/shapes_cost.py --quick  # seconds: a smoke run
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from _common import gpt2_and_tokens, machine, measure, start
from accelerate import init_empty_weights
from torch.profiler import ProfilerActivity, profile
from transformers import GPT2LMHeadModel

import purelens as pl


def allocated_mib(fn: Callable[[], Any]) -> float:
    """MiB allocated by tensor operations while `fn` runs (freed or not)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events()) / 2**20


def main(argv: list[str] | None = None) -> str:
    quick = start(__doc__, argv)
    logging.getLogger("torch.profiler").setLevel(logging.ERROR)
    model, x = gpt2_and_tokens(quick)
    repeats, shape = (3 if quick else 9), tuple(x.shape)
    with init_empty_weights():
        empty = GPT2LMHeadModel(model.config).eval()

    def real() -> Any:
        with torch.no_grad():
            return model(x)

    cases = {
        "real forward (no grad)": real,
        "pl.shapes, every site": lambda: pl.shapes(model, x),
        "pl.shapes, every site, no weights (init_empty_weights)": lambda: pl.shapes(empty, x),
        "pl.shapes, one site": lambda: pl.shapes(model, x, ["h.-1"]),
    }
    assert dict(pl.shapes(empty, x)) == dict(pl.shapes(model, x))
    times = measure(cases, repeats, inner=1)
    memory = {name: allocated_mib(fn) for name, fn in cases.items()}
    base = times["real forward (no grad)"]
    lines = [
        machine(),
        "",
        f"### `pl.shapes` vs a real forward, GPT-2 shape ({len(model.transformer.h)} layers, "
        f"d={model.config.n_embd}), batch {shape[0]} x {shape[1]}",
        "",
        "| case | median (ms) | fraction of a real forward | allocated by ops (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for name, t in times.items():
        lines.append(f"| {name} | {t * 1e3:.1f} | {t / base:.3f} | {memory[name]:.3f} |")
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()

"""The cost of `pl.generate` with a per-step save against HF `generate` with a raw hook.

Prints one Markdown table: median wall time per generation over interleaved
repeats, and the ratio to HF `generate` with a hand-written forward hook.

    python benchmarks/generate_overhead.py          # GPT-2-small shape, 8 x 32 tokens, 8 new
    python benchmarks/generate_overhead.py --quick  # seconds: a smoke run
"""

from __future__ import annotations

from typing import Any

import torch
from _common import gpt2_and_tokens, machine, measure, start, table
from torch import nn

import purelens as pl


def hf_with_hook(
    model: nn.Module, x: torch.Tensor, block: nn.Module, new: int
) -> tuple[Any, list[Any]]:
    saved: list[Any] = []
    handle = block.register_forward_hook(lambda m, a, o: saved.append(o))
    try:
        return model.generate(x, max_new_tokens=new, do_sample=False, pad_token_id=0), saved
    finally:
        handle.remove()


def main(argv: list[str] | None = None) -> str:
    quick = start(__doc__, argv)
    model, x = gpt2_and_tokens(quick)
    new, repeats = (3, 3) if quick else (8, 9)
    shape = tuple(x.shape)
    middle = len(model.transformer.h) // 2
    block, ivs = model.transformer.h[middle], [pl.save(f"h.{middle}")]

    out, raw = hf_with_hook(model, x, block, new)
    rec = pl.generate(model, x, ivs, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(rec.output, out) and len(rec[f"h.{middle}"]) == len(raw) == new
    assert all(torch.equal(a, b) for a, b in zip(rec[f"h.{middle}"], raw, strict=True))

    medians = measure(
        {
            "HF generate, no hook": lambda: model.generate(
                x, max_new_tokens=new, do_sample=False, pad_token_id=0
            ),
            "HF generate + raw hook (save every step)": lambda: hf_with_hook(model, x, block, new),
            "pl.generate + pl.save (every step)": lambda: pl.generate(
                model, x, ivs, max_new_tokens=new, do_sample=False, pad_token_id=0
            ),
        },
        repeats,
        inner=1,
    )
    out_table = "\n\n".join(
        [
            machine(),
            table(
                f"Greedy generation of {new} tokens, GPT-2 shape "
                f"({len(model.transformer.h)} layers, d={model.config.n_embd}), "
                f"{shape[0]} prompts x {shape[1]} tokens",
                medians,
                {"pl.generate + pl.save (every step)": "HF generate + raw hook (save every step)"},
                "ms",
            ),
        ]
    )
    print(out_table)
    return out_table


if __name__ == "__main__":
    main()

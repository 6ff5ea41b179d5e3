"""The cost of `run(..., loss=)` with N `save_grad` sites against hand-written hooks.

The hand-written version captures the block outputs with forward hooks and
calls ``torch.autograd.grad`` on them, as one would without purelens. Prints
one Markdown table: median wall time per call over interleaved repeats.

    python benchmarks/grads_overhead.py            # GPT-2-small shape, batch 8 x 32
    python benchmarks/grads_overhead.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

from typing import Any

import torch
from _common import gpt2_and_tokens, machine, measure, start, table
from torch import nn

import purelens as pl


def metric(output: Any) -> torch.Tensor:
    return output.logits[:, -1, 0].sum()


def raw_grads(model: nn.Module, x: torch.Tensor, blocks: list[nn.Module]) -> list[torch.Tensor]:
    values: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: values.append(o)) for b in blocks]
    try:
        with torch.enable_grad():
            loss = metric(model(x))
            return list(torch.autograd.grad(loss, values))
    finally:
        for h in handles:
            h.remove()


def main(argv: list[str] | None = None) -> str:
    quick = start(__doc__, argv)
    model, x = gpt2_and_tokens(quick)
    repeats, shape = (3 if quick else 9), tuple(x.shape)
    n_layer = len(model.transformer.h)
    medians: dict[str, float] = {}
    pairs: dict[str, str] = {}
    for n in sorted({1, max(1, n_layer // 3), n_layer}):
        blocks = list(model.transformer.h)[-n:]
        ivs = [pl.save_grad(f"h.{i}") for i in range(n_layer - n, n_layer)]
        rec = pl.run(model, x, ivs, loss=metric)
        for i, g in zip(range(n_layer - n, n_layer), raw_grads(model, x, blocks), strict=True):
            assert torch.allclose(rec.grads[f"h.{i}"], g, atol=1e-6), (
                "purelens and raw hooks disagree"
            )
        raw_name, pl_name = f"raw hooks + autograd.grad, {n} sites", f"pl.run(loss=), {n} save_grad"
        times = measure(
            {
                raw_name: lambda blocks=blocks: raw_grads(model, x, blocks),
                pl_name: lambda ivs=ivs: pl.run(model, x, ivs, loss=metric),
            },
            repeats,
            inner=1,
        )
        medians.update(times)
        pairs[pl_name] = raw_name
    out = "\n\n".join(
        [
            machine(),
            table(
                f"Gradients at the last N blocks, GPT-2 shape ({n_layer} layers, "
                f"d={model.config.n_embd}), batch {shape[0]} x {shape[1]}",
                medians,
                pairs,
                "ms",
            ),
        ]
    )
    print(out)
    return out


if __name__ == "__main__":
    main()

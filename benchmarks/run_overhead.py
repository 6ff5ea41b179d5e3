"""The cost of `pl.run` against hand-written hooks and a bare forward.

Prints one Markdown table: median wall time per call over interleaved repeats,
and the ratio to hand-written raw hooks doing the same thing.

    python benchmarks/run_overhead.py            # GPT-2-small shape, batch 8 x 32
    python benchmarks/run_overhead.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

from typing import Any

import torch
from _common import gpt2_and_tokens, machine, measure, start, table
from torch import nn

import purelens as pl


def raw_save(module: nn.Module, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    saved: dict[str, Any] = {}
    handle = module.register_forward_hook(lambda m, a, o: saved.__setitem__("h", o))
    try:
        saved["out"] = model(x)
    finally:
        handle.remove()
    return saved


def raw_patch(module: nn.Module, model: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> Any:
    handle = module.register_forward_hook(lambda m, a, o: o + delta)
    try:
        return model(x)
    finally:
        handle.remove()


def main(argv: list[str] | None = None) -> str:
    quick = start(__doc__, argv)
    model, x = gpt2_and_tokens(quick)
    repeats, inner, shape = (3 if quick else 15), 2, tuple(x.shape)
    block = model.transformer.h[len(model.transformer.h) // 2]
    site = f"h.{len(model.transformer.h) // 2}"
    delta = torch.randn(model.config.n_embd) * 0.01
    save, add = [pl.save(site)], [pl.add(site, delta)]

    with torch.no_grad():
        assert torch.equal(pl.run(model, x, save)[site], raw_save(block, model, x)["h"])
        assert torch.allclose(
            pl.run(model, x, add).output.logits, raw_patch(block, model, x, delta).logits
        )
        big = measure(
            {
                "bare forward": lambda: model(x),
                "raw hook: save 1 block": lambda: raw_save(block, model, x),
                "pl.run: save 1 block": lambda: pl.run(model, x, save),
                "raw hook: add to 1 block": lambda: raw_patch(block, model, x, delta),
                "pl.run: add to 1 block": lambda: pl.run(model, x, add),
            },
            repeats,
            inner,
        )

        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
        xs = torch.randn(4, 16)
        mlp_delta = torch.ones(16)
        mlp_save, mlp_add = [pl.save("1")], [pl.add("1", mlp_delta)]
        small = measure(
            {
                "bare forward": lambda: mlp(xs),
                "raw hook: save": lambda: raw_save(mlp[1], mlp, xs),
                "pl.run: save": lambda: pl.run(mlp, xs, mlp_save),
                "raw hook: add": lambda: raw_patch(mlp[1], mlp, xs, mlp_delta),
                "pl.run: add": lambda: pl.run(mlp, xs, mlp_add),
            },
            repeats=5 if quick else 25,
            inner=20 if quick else 400,
        )

    n = len(model.transformer.h)
    out = "\n\n".join(
        [
            machine(),
            table(
                f"GPT-2 shape ({n} layers, d={model.config.n_embd}), batch {shape[0]} x {shape[1]}",
                big,
                {
                    "pl.run: save 1 block": "raw hook: save 1 block",
                    "pl.run: add to 1 block": "raw hook: add to 1 block",
                },
                "ms",
            ),
            table(
                "Per-call overhead: 2-layer MLP (16 wide), batch 4",
                small,
                {"pl.run: save": "raw hook: save", "pl.run: add": "raw hook: add"},
                "us",
            ),
        ]
    )
    print(out)
    return out


if __name__ == "__main__":
    main()

"""pl.compile against the compiled model itself: per-call cost, compile cost, recompiles.

    python benchmarks/compiled.py            # a tiny MLP and a GPT-2 (4 layers, d 256)
    python benchmarks/compiled.py --quick    # seconds: a smoke run

For each model and set of interventions, interleaved in every repeat: the
eager model, `torch.compile(model)` (inductor), eager `pl.run`, and `pl.run`
on `pl.compile(model)`; ratios are the median of per-repeat ratios to the
compiled model (this machine's speed drifts over seconds). Each `pl.compile`
result is checked against eager `pl.run` first. Then the seconds the first
compiled call of a structure takes, and the graphs compiled over a sweep of 64
steering vectors through one structure (counted by a backend that wraps
inductor: 1 means no recompile).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _common import gpt2, machine, start, timings
from torch import Tensor, nn

import purelens as pl


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64)
        self.act2, self.out = nn.ReLU(), nn.Linear(64, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act2(self.fc2(self.act(self.fc1(x)))))


def interventions(kind: str, d: int, sites: list[str]) -> dict[str, list[Any]]:
    """Two sets per model: a save and an add; six of the kinds pl.compile compiles."""
    v = torch.randn(d)
    return {
        "save + add": [pl.add(sites[0], v), pl.save(sites[1])],
        "6 interventions": [
            pl.add(sites[0], v),
            pl.save(sites[0], name="a"),
            pl.scale(sites[1], 0.9),
            pl.save(sites[1], name="b"),
            pl.ablate(sites[2], "mean"),
            pl.patch(sites[2], torch.tanh),
        ],
    }


def paired(cases: dict[str, Callable[[], Any]], repeats: int, inner: int) -> dict[str, Any]:
    """Each case's median seconds per call and median per-repeat ratio to the compiled model."""
    times = timings(cases, repeats, inner)
    base = times["compiled bare"]
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        out[name] = (statistics.median(ts), statistics.median(ratios))
    return out


def close(a: Any, b: Any) -> bool:
    if not isinstance(a, Tensor):  # a HF model's output
        a, b = a.logits, b.logits
    return bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4))


def rows_for(
    name: str, model: nn.Module, x: Tensor, d: int, sites: list[str], repeats: int, inner: int
) -> tuple[list[str], list[str]]:
    compiled = torch.compile(model)
    timing, costs = [], []
    for label, ivs in interventions(name, d, sites).items():
        cm = pl.compile(model)
        pl.run(cm, x, ivs)  # eager: its checks, and the clone's
        begin = time.perf_counter()
        got = pl.run(cm, x, ivs)  # the structure's compile
        costs.append(f"| {name} | {label} | {time.perf_counter() - begin:.1f} |")
        want = pl.run(model, x, ivs)
        agree = close(got.output, want.output) and all(close(got[k], want[k]) for k in want)
        cases = {
            "eager bare": lambda: model(x),
            "compiled bare": lambda: compiled(x),
            "eager pl.run": lambda ivs=ivs: pl.run(model, x, ivs),
            "pl.compile": lambda cm=cm, ivs=ivs: pl.run(cm, x, ivs),
        }
        for case, (median, ratio) in paired(cases, repeats, inner).items():
            shown = f"{median * 1e6:.1f} us" if median < 1e-3 else f"{median * 1e3:.2f} ms"
            check = ("all agree" if agree else "DIFFER") if case == "pl.compile" else ""
            timing.append(f"| {name} | {label} | {case} | {shown} | {ratio:.3f} | {check} |")
    return timing, costs


def sweep_graphs(model: nn.Module, x: Tensor, d: int, site: str, n: int) -> int:
    from torch._inductor.compile_fx import compile_fx

    graphs = [0]

    def counting(gm: torch.fx.GraphModule, example: Any) -> Any:
        graphs[0] += 1
        return compile_fx(gm, example)

    cm = pl.compile(model, backend=counting)
    for v in torch.randn(n, d):
        pl.run(cm, x, [pl.add(site, v), pl.save(site, name="steered")])
    return graphs[0]


def main(argv: list[str] | None = None) -> None:
    quick = start(__doc__ or "", argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    mlp = MLP().eval()
    models: list[tuple[str, nn.Module, Tensor, int, list[str], int]] = [
        ("tiny MLP (32-64-64-8)", mlp, torch.randn(32, 32), 64, ["act", "fc2", "act2"], 200),
    ]
    if not quick:  # a GPT-2 compile takes seconds per structure
        big = gpt2(4, 256, 4, 8192)
        models.append(("GPT-2 (4 x 256, vocab 8192)", big, torch.randint(0, 8192, (8, 32)), 256,
                       ["h.1", "h.2", "h.3.mlp"], 3))  # fmt: skip
    repeats = 3 if quick else 21
    timing, costs, sweeps = [], [], []
    with torch.no_grad():
        for name, model, x, d, sites, inner in models:
            rows, cost = rows_for(name, model, x, d, sites, repeats, 5 if quick else inner)
            timing += rows
            costs += cost
            n = 4 if quick else 64
            sweeps.append(f"| {name} | {n} | {sweep_graphs(model, x, d, sites[0], n)} |")
    text = "\n".join(
        [
            f"{machine()}, {sys.platform}; inductor (torch.compile's default backend).\n",
            "### Per call (median; ratio: median of per-repeat ratios to the compiled model)\n",
            "| model | interventions | case | median | ratio to compiled bare | check |",
            "|---|---|---|---:|---:|---|",
            *timing,
            "",
            "### Compile cost: the first compiled call of a structure (seconds)\n",
            "| model | interventions | seconds |",
            "|---|---|---:|",
            *costs,
            "",
            "### Graphs compiled over a steering sweep through one structure (1: no recompile)\n",
            "| model | vectors | graphs |",
            "|---|---:|---:|",
            *sweeps,
        ]
    )
    print(text)


if __name__ == "__main__":
    main()

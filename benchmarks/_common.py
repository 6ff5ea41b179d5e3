"""Helpers shared by the benchmark scripts: models, timing, tables."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def start(doc: str, argv: list[str] | None) -> bool:
    """Parse the one flag every benchmark takes; set two threads. Returns `--quick`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats")
    quick = parser.parse_args(argv).quick
    torch.set_num_threads(2)  # this machine's cores
    warnings.filterwarnings("ignore", message="There is a performance drop")
    return bool(quick)


def gpt2_and_tokens(quick: bool) -> tuple[nn.Module, torch.Tensor]:
    """GPT-2-small shape (random weights) and a batch of 8 x 32 tokens; tiny when `quick`."""
    model = gpt2(2, 64, 4, 500) if quick else gpt2(12, 768, 12, 50257)
    shape = (2, 8) if quick else (8, 32)
    return model, torch.randint(0, model.config.vocab_size, shape)


def machine() -> str:
    threads = torch.get_num_threads()
    return f"Machine: {platform.machine()}, {threads} threads, torch {torch.__version__}"


def gpt2(n_layer: int, n_embd: int, n_head: int, vocab: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab)
    return GPT2LMHeadModel(config).eval()


def timings(
    cases: dict[str, Callable[[], Any]], repeats: int, inner: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each case in each repeat, the cases interleaved in every repeat
    (after one warm-up call each), in an order that turns by one each repeat: a case that
    always ran right after another could pay for what that one leaves behind (measured
    on vLLM here: the second of two identical calls ran 10-15% slower, every time)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm up
        fn()
    order = list(cases.items())
    for repeat in range(repeats):
        turn = repeat % len(order)
        for name, fn in order[turn:] + order[:turn]:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def measure(cases: dict[str, Callable[[], Any]], repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each case, the cases interleaved in every repeat."""
    return {name: statistics.median(ts) for name, ts in timings(cases, repeats, inner).items()}


def table(title: str, medians: dict[str, float], raw: dict[str, str], unit: str) -> str:
    scale = 1e6 if unit == "us" else 1e3
    lines = [
        f"### {title}",
        "",
        f"| case | median ({unit}) | ratio to raw hooks | difference ({unit}) |",
        "|---|---:|---:|---:|",
    ]
    for name, t in medians.items():
        base = raw.get(name)
        ratio = f"{t / medians[base]:.3f}" if base else "-"
        diff = f"{(t - medians[base]) * scale:+.1f}" if base else "-"
        lines.append(f"| {name} | {t * scale:.2f} | {ratio} | {diff} |")
    return "\n".join(lines)

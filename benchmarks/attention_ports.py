"""The cost of attention ports (`:pattern`) against eager `output_attentions` and plain sdpa.

Two GPT-2 models with the same random weights, one loaded with eager attention
and one with sdpa. Before timing, the patterns that purelens saves on the sdpa
model are checked against the eager model's `output_attentions` (printing
DIFFER above 1e-5). Prints one Markdown table: median wall time per call over
interleaved repeats, and each case's ratio to its baseline.

    python benchmarks/attention_ports.py            # GPT-2-small shape, batch 1 x 128
    python benchmarks/attention_ports.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

import torch
from _common import machine, measure, start
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import purelens as pl

TOLERANCE = 1e-5


def models(quick: bool) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """GPT-2-small shape (tiny when `quick`), eager and sdpa, same weights; a batch of tokens."""
    n_layer, n_embd, n_head, vocab = (2, 64, 4, 500) if quick else (12, 768, 12, 50257)
    built = []
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = GPT2Config(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            vocab_size=vocab,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
            attn_implementation=implementation,
        )
        built.append(GPT2LMHeadModel(config).eval())
    eager, sdpa = built
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    torch.manual_seed(1)
    return eager, sdpa, torch.randint(0, vocab, (1, 32 if quick else 128))


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> str:
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    verdict = "agree" if diff <= TOLERANCE else "DIFFER"
    return f"- {name}: max abs diff {diff:.2e} ({verdict})"


def main(argv: list[str] | None = None) -> str:
    quick = start(__doc__, argv)
    eager, sdpa, x = models(quick)
    n_layer = len(sdpa.transformer.h)
    one = 0 if quick else 5
    repeats, inner = (7, 5) if quick else (15, 3)
    every, single, block = (
        [pl.save("h.*.attn:pattern")],
        [pl.save(f"h.{one}.attn:pattern")],
        [pl.save(f"h.{one}")],
    )

    with torch.no_grad():
        want = eager(x, output_attentions=True)
        plain = sdpa(x)
        all_rec = pl.run(sdpa, x, every)
        one_rec = pl.run(sdpa, x, single)
        block_rec = pl.run(sdpa, x, block)
        names = [f"h.{i}.attn:pattern" for i in range(n_layer)]
        assert sorted(all_rec.keys()) == sorted(names), list(all_rec.keys())
        pairs = [
            (f"`{name}` (of `h.*.attn:pattern`)", all_rec[name], a)
            for name, a in zip(names, want.attentions, strict=True)
        ]
        pairs += [
            (f"`h.{one}.attn:pattern` (saved alone)", one_rec[names[one]], want.attentions[one]),
            ("logits, every pattern saved vs eager", all_rec.output.logits, want.logits),
            (f"logits, `h.{one}` saved vs plain sdpa", block_rec.output.logits, plain.logits),
        ]
        lines = ["Cross-checks against the eager model's `output_attentions`:", ""]
        lines += [check(name, got, expected) for name, got, expected in pairs]
        # every run, ports or not, gives the config back its implementation (sdpa)
        assert sdpa.config._attn_implementation == "sdpa", sdpa.config._attn_implementation

        eager_attn, plain_sdpa = "eager, output_attentions=True", "sdpa, plain"
        all_ports = "pl.run(sdpa): save `h.*.attn:pattern`"
        one_port = f"pl.run(sdpa): save `h.{one}.attn:pattern`"
        no_port = f"pl.run(sdpa): save `h.{one}` (no port)"
        again = f"{no_port}, again"
        cases = {
            eager_attn: lambda: eager(x, output_attentions=True),
            all_ports: lambda: pl.run(sdpa, x, every),
            plain_sdpa: lambda: sdpa(x),
            one_port: lambda: pl.run(sdpa, x, single),
            no_port: lambda: pl.run(sdpa, x, block),
            again: lambda: pl.run(sdpa, x, block),
        }
        times = measure(cases, repeats, inner)

    rows = [  # case, its baseline, the target for the ratio
        (all_ports, eager_attn, "<= 1.05"),
        (one_port, plain_sdpa, "<= 1.10"),
        (no_port, plain_sdpa, "-"),
        (again, no_port, "~1.00 (noise)"),
    ]
    lines += [
        "",
        f"### Attention ports, GPT-2 shape ({n_layer} layers, d={sdpa.config.n_embd}, "
        f"{sdpa.config.n_head} heads), batch {x.shape[0]} x {x.shape[1]}",
        "",
        "| case | median (ms) | baseline | ratio | difference (us) | target |",
        "|---|---:|---|---:|---:|---|",
        f"| {eager_attn} | {times[eager_attn] * 1e3:.2f} | - | - | - | - |",
        f"| {plain_sdpa} | {times[plain_sdpa] * 1e3:.2f} | - | - | - | - |",
    ]
    for name, base, target in rows:
        t, b = times[name], times[base]
        lines.append(
            f"| {name} | {t * 1e3:.2f} | {base} | {t / b:.3f} | {(t - b) * 1e6:+.0f} | {target} |"
        )
    out = "\n".join([machine(), "", *lines])
    print(out)
    return out


if __name__ == "__main__":
    main()

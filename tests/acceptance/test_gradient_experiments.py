"""Whole experiments differentiated end to end: attribution patching, integrated
gradients, and training a low-rank adapter through an intervention."""

from __future__ import annotations

from functools import partial

import torch
from torch.func import grad, grad_and_value, vmap

import purelens as pl
from tests.helpers import tiny_gpt2

ANSWER, DISTRACTOR = 11, 23


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, ANSWER] - logits[0, -1, DISTRACTOR]


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    corrupt = clean.clone()
    corrupt[0, 2] = (clean[0, 2] + 40) % 97
    corrupt[0, 5] = (clean[0, 5] + 17) % 97
    return clean, corrupt


def test_attribution_patching_tracks_activation_patching() -> None:
    model = tiny_gpt2(n_layer=4, attn="eager", seed=1).double()
    clean, corrupt = prompts()
    blocks = [f"h.{i}" for i in range(4)]

    clean_rec = pl.run(model, clean, [pl.save(b) for b in blocks])
    corrupt_rec = pl.run(
        model,
        corrupt,
        [pl.save(b) for b in blocks] + [pl.save_grad(b) for b in blocks],
        loss=lambda out: logit_diff(out.logits),
    )
    base = corrupt_rec.loss
    estimate = torch.stack(
        [((clean_rec[b] - corrupt_rec[b]) * corrupt_rec.grads[b]).sum(-1)[0] for b in blocks]
    )

    # Real activation patching, every position of a block in one vmapped pass.
    masks = torch.eye(clean.shape[1], dtype=torch.bool)[:, None, :, None]

    def patched_metric(block: str, mask: torch.Tensor) -> torch.Tensor:
        fn = lambda v: torch.where(mask, clean_rec[block], v)  # noqa: E731
        return logit_diff(pl.run(model, corrupt, [pl.patch(block, fn)]).output.logits)

    actual = torch.stack([vmap(partial(patched_metric, b))(masks) - base for b in blocks])

    assert estimate.shape == actual.shape == (4, 8)
    assert torch.allclose(
        actual[:, :2], torch.zeros(4, 2, dtype=torch.float64)
    )  # before the change
    correlation = torch.corrcoef(torch.stack([estimate.flatten(), actual.flatten()]))[0, 1]
    print(f"attribution vs activation patching: correlation {correlation:.4f}")
    assert correlation > 0.9


def test_integrated_gradients_satisfy_completeness() -> None:
    model = tiny_gpt2(n_layer=3, attn="eager", seed=2, init=0.2).double()
    clean, corrupt = prompts()
    site = "h.0"
    h1 = pl.run(model, clean, [pl.save(site)])[site]
    h0 = pl.run(model, corrupt, [pl.save(site)])[site]

    def f(h: torch.Tensor) -> torch.Tensor:
        return logit_diff(pl.run(model, clean, [pl.replace(site, h)]).output.logits)

    steps = 64
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps  # midpoint rule
    path = h0 + alphas[:, None, None, None] * (h1 - h0)
    grads = vmap(grad(f))(path)
    attributions = (h1 - h0) * grads.mean(0)

    total, difference = attributions.sum(), f(h1) - f(h0)
    print(f"integrated gradients: sum {total:.6f}, output difference {difference:.6f}")
    assert torch.allclose(total, difference, rtol=1e-3, atol=1e-6)
    assert attributions[0, :2].abs().max() == 0  # identical tokens, zero attribution


def test_training_a_low_rank_adapter_through_an_intervention() -> None:
    model = tiny_gpt2(n_layer=2, seed=3, init=0.2)  # logits large enough to learn from
    model.requires_grad_(False)
    xs = torch.randint(0, 97, (16, 6), generator=torch.Generator().manual_seed(4))
    target = torch.full((16,), 7)
    torch.manual_seed(5)
    adapter = {
        "A": (torch.randn(32, 2) * 0.1).requires_grad_(),
        "B": torch.zeros(2, 32, requires_grad=True),
        "bias": torch.zeros(32, requires_grad=True),  # an intervention leaf, steering
    }

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        ivs = [
            pl.patch("h.0.mlp", lambda v: v + (v @ p["A"]) @ p["B"]),
            pl.add("h.1", p["bias"]),
        ]
        logits = pl.run(model, xs, ivs).output.logits[:, -1]
        return torch.nn.functional.cross_entropy(logits, target)

    optimizer = torch.optim.Adam(adapter.values(), lr=0.05)
    losses = []
    for _ in range(40):
        grads, value = grad_and_value(loss)({k: v.detach() for k, v in adapter.items()})
        for k, v in adapter.items():
            v.grad = grads[k]
        optimizer.step()
        losses.append(value.item())
    print(f"adapter training: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.25 * losses[0]
    assert all(p.grad is None for p in model.parameters())

"""Gradient checkpointing: purelens gives the gradients without it, or refuses (issue 13, item 1).

Checkpointing reruns a block in the backward pass, after a run's hooks are
gone, so an intervention inside the block would be missing from the
gradients. Interventions that only read, and interventions outside the
checkpointed forward (an HF block's own output), are fine.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import purelens as pl
from tests.helpers import hooks_on

X = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))


def gpt2(checkpointing: bool | None, reentrant: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).train()
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": reentrant})
    return model


def weight_grads(model: nn.Module, ivs: list[pl.Intervention]) -> list[torch.Tensor]:
    model.zero_grad()
    pl.run(model, X, ivs).output.logits.square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(
    "iv",
    [pl.scale("h.0.mlp", 2.0), pl.ablate("h.1.attn"), pl.patch_grad("h.0.mlp", torch.zeros_like)],
)
def test_a_writer_inside_a_checkpointed_block_is_refused(
    iv: pl.Intervention, reentrant: bool
) -> None:
    model = gpt2(checkpointing=True, reentrant=reentrant)
    hooks = hooks_on(model)  # HF's own hook, to make the embeddings' output need gradients
    with pytest.raises(pl.PurelensError, match="inside gradient checkpointing") as info:
        pl.run(model, X, [iv])
    assert "gradient_checkpointing_disable()" in str(info.value)
    with pytest.raises(pl.PurelensError, match="inside gradient checkpointing"):
        pl.run(model, X, [iv], loss=lambda out: out.logits.sum())  # a raw error before
    assert hooks_on(model) == hooks


def test_an_edited_model_trained_with_checkpointing_is_refused() -> None:
    edited = pl.edit(gpt2(checkpointing=True), [pl.scale("h.0.mlp", 2.0)])
    with pytest.raises(pl.PurelensError, match="inside gradient checkpointing"):
        edited(X).logits.sum().backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_what_checkpointing_cannot_spoil_gives_the_gradients_without_it(reentrant: bool) -> None:
    plain, checkpointed = gpt2(checkpointing=False), gpt2(checkpointing=True, reentrant=reentrant)
    # A block's own output is outside its checkpointed forward; saves only read.
    ivs = [pl.scale("h.0", 2.0), pl.add("h.1", 0.5), pl.save("h.1.attn"), pl.save("h.0.mlp")]
    for a, b in zip(weight_grads(plain, ivs), weight_grads(checkpointed, ivs), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    losses = [
        pl.run(m, X, [pl.save("h.0.mlp"), pl.save_grad("h.1")], loss=lambda o: o.logits.sum())
        for m in (plain, checkpointed)
    ]
    assert torch.allclose(losses[0].grads["h.1"], losses[1].grads["h.1"], atol=1e-6)
    assert torch.allclose(losses[0]["h.0.mlp"], losses[1]["h.0.mlp"])


def test_without_gradients_checkpointing_is_no_concern() -> None:
    model = gpt2(checkpointing=True)
    plain = gpt2(checkpointing=False)
    with torch.no_grad():
        a = pl.run(model, X, [pl.scale("h.0.mlp", 2.0)]).output.logits
        b = pl.run(plain, X, [pl.scale("h.0.mlp", 2.0)]).output.logits
    assert torch.allclose(a, b, atol=1e-6)
    model.eval()  # HF checkpoints in training mode only
    pl.run(model, X, [pl.scale("h.0.mlp", 2.0)]).output.logits.sum().backward()


class Checkpointed(nn.Module):
    """torch.utils.checkpoint written by hand, not by HF."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.offloaded, x, use_reentrant=self.reentrant)

    def offloaded(self, x: torch.Tensor) -> torch.Tensor:
        # Saved-tensor hooks of another kind, on top of the checkpoint's own.
        with torch.autograd.graph.save_on_cpu():
            return self.inner(x)


@pytest.mark.parametrize("reentrant", [False, True])
def test_any_torch_checkpoint_is_recognised(reentrant: bool) -> None:
    model = Checkpointed(reentrant)
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(pl.PurelensError, match="inside gradient checkpointing"):
        pl.run(model, x, [pl.scale("inner.0", 2.0)])
    rec = pl.run(model, x, [pl.save("inner.1"), pl.scale("", 2.0)], loss=lambda out: out.sum())
    assert rec["inner.1"].shape == (3, 4)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("reentrant", [False, True])
def test_params_read_inside_a_checkpointed_block_are_refused(reentrant: bool) -> None:
    # The backward rerun reads the model's own tensors, not the run's params=.
    model = Checkpointed(reentrant)
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4)
    with pytest.raises(pl.PurelensError, match="`params=` replaces 'weight'"):
        pl.run(model, x, params={"inner.0.weight": w})
    with pytest.raises(pl.PurelensError, match="gradient checkpointing"):
        pl.run(model, x, params={"inner.0.weight": w}, loss=lambda out: out.sum())
    with torch.no_grad():
        got = pl.run(model, x, params={"inner.0.weight": w}).output
        assert torch.allclose(got, torch.func.functional_call(model, {"inner.0.weight": w}, (x,)))
    hf = gpt2(checkpointing=True, reentrant=reentrant)
    inside = {"transformer.h.0.mlp.c_fc.weight": torch.randn(16, 64, requires_grad=True)}
    with pytest.raises(pl.PurelensError, match="gradient checkpointing"):
        pl.run(hf, X, params=inside)
    grads = []
    for model in (hf, gpt2(checkpointing=False)):  # outside the blocks (and tied to lm_head)
        wte = torch.randn(50, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = pl.run(model, X, params={"transformer.wte.weight": wte}).output
        out.logits.square().sum().backward()
        grads.append(wte.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_loss_under_reentrant_checkpointing_says_what_torch_cannot_do() -> None:
    model = gpt2(checkpointing=True, reentrant=True)
    with pytest.raises(pl.PurelensError, match="reentrant gradient checkpointing"):
        pl.run(model, X, [pl.save_grad("wte")], loss=lambda out: out.logits.sum())

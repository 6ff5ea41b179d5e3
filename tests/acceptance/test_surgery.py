"""nnsight-style model surgery and planning, the pure way."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import purelens as pl
from tests.helpers import raw_saves, tiny_gpt2


def test_an_edit_zeroing_block_1_shows_in_the_edited_model_only() -> None:
    model = tiny_gpt2(n_layer=3, seed=15)
    x = torch.randint(0, 97, (2, 5))
    edited = pl.edit(model, [pl.ablate("h.1")])
    assert torch.equal(pl.run(edited, x, [pl.save("h.1")])["h.1"], torch.zeros(2, 5, 32))
    assert pl.run(model, x, [pl.save("h.1")])["h.1"].abs().sum() > 0
    assert not torch.allclose(edited(x).logits, model(x).logits)


def test_a_module_called_inside_an_edit_is_addressable() -> None:
    model = tiny_gpt2(n_layer=2, seed=16)
    x = torch.randint(0, 97, (2, 5))

    class Autoencoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return self.decoder(torch.relu(self.encoder(v)))

    sae = Autoencoder()
    edited = pl.edit(model, [pl.patch("h.0", sae)])
    edited.sae = sae  # attached to the edited module only
    assert "sae.encoder" in pl.sites(edited) and "sae.encoder" not in pl.sites(model)
    rec = pl.run(edited, x, [pl.save("sae.encoder"), pl.save("h.0")])
    h0 = pl.run(model, x, [pl.save("h.0")])["h.0"]
    assert torch.allclose(rec["sae.encoder"], sae.encoder(h0), atol=1e-6)
    assert torch.allclose(rec["h.0"], sae(h0), atol=1e-6)


def test_batch_size_does_not_narrow_in_an_edit_built_for_one_input() -> None:
    model = tiny_gpt2(n_layer=2, seed=17)
    one = torch.randint(0, 97, (1, 5))
    clean_h0 = pl.run(model, one, [pl.save("h.0")])["h.0"]  # (1, 5, 32)
    edited = pl.edit(model, [pl.replace("h.0", clean_h0)])
    many = torch.randint(0, 97, (4, 5))
    out = edited(many).logits
    assert out.shape == (4, 5, 97)
    assert all(torch.allclose(out[i], model(one).logits[0], atol=1e-5) for i in range(4))


def first_tensor(output: object) -> torch.Tensor:
    items = output.values() if isinstance(output, dict) else output
    if isinstance(items, torch.Tensor):
        return items
    return next(t for t in items if isinstance(t, torch.Tensor))  # type: ignore[union-attr]


def every_module_output(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Size]:
    """The shape of every module's first output tensor in a real run, by hand-written hooks."""
    with raw_saves(model, [s for s in pl.sites(model) if ":" not in s]) as raw:
        model(x)
    return {name: first_tensor(output).shape for name, output in raw.items()}


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_shapes_equal_a_real_run_at_every_site(kind: str) -> None:
    if kind == "gpt2":
        model: nn.Module = tiny_gpt2(n_layer=3, seed=18)
        x = torch.randint(0, 97, (3, 7))
    else:
        config = BertConfig(
            vocab_size=120,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
        )
        model = BertModel(config).eval()
        x = torch.randint(0, 120, (3, 7))
    real = every_module_output(model, x)
    planned = pl.shapes(model, x)
    assert set(planned) == set(real) and len(real) > 20
    for site, shape in real.items():
        assert planned[site] == shape, site

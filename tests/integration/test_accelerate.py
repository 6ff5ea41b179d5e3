"""accelerate: models dispatched with CPU and disk offload, and models with no weights at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

import purelens as pl
from tests.helpers import hooks_on, tiny_gpt2

DEVICE_MAP = {
    "transformer.wte": "cpu",
    "transformer.wpe": "cpu",
    "transformer.drop": "cpu",
    "transformer.h.0": "cpu",
    "transformer.h.1": "disk",
    "transformer.h.2": "disk",
    "transformer.ln_f": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    """The same GPT-2-shaped weights: in memory, and dispatched with disk offload."""
    root: Path = tmp_path_factory.mktemp("gpt2")
    plain = tiny_gpt2(n_layer=3, seed=13, init=0.2)
    plain.save_pretrained(root / "model")
    dispatched = AutoModelForCausalLM.from_pretrained(
        root / "model", device_map=DEVICE_MAP, offload_folder=root / "offload"
    ).eval()
    assert dispatched.transformer.h[1].attn.c_attn.weight.is_meta  # really on disk
    return plain, dispatched


X = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(14))

EXPERIMENTS = {
    "save": [pl.save("h.0"), pl.save("h.1.attn"), pl.save("h.2:input")],
    "patch": [pl.patch("h.1.mlp", lambda v: v * 0.5), pl.save("h.2")],
    "replace, add, scale": [
        pl.replace("h.1.attn", torch.ones(32)),
        pl.add("h.2", torch.ones(32)),
        pl.scale("h.0", 2.0),
    ],
    "ablate, batch": [pl.ablate("h.1", "mean", batch=[1]), pl.save("h.2", batch=0)],
    "skip": [pl.skip("h.1"), pl.save("h.2:input")],
    "stop": [pl.save("h.1"), pl.stop("h.1")],
}


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_intervention_on_a_disk_offloaded_model(
    pair: tuple[nn.Module, nn.Module], name: str
) -> None:
    plain, dispatched = pair
    hooks_before = hooks_on(dispatched)
    expected = pl.run(plain, X, EXPERIMENTS[name])
    got = pl.run(dispatched, X, EXPERIMENTS[name])
    assert hooks_on(dispatched) == hooks_before  # accelerate's own hooks, none of ours
    assert list(got) == list(expected)
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-5), key
    if expected.output is not None:
        assert torch.allclose(got.output.logits, expected.output.logits, atol=1e-5)


def test_gradients_on_a_disk_offloaded_model(pair: tuple[nn.Module, nn.Module]) -> None:
    plain, dispatched = pair
    ivs = [pl.save_grad("h.0"), pl.save_grad("h.2.attn"), pl.patch_grad("h.1", lambda g: -g)]
    expected = pl.run(plain, X, ivs, loss=lambda out: out.logits[:, -1, 5].sum())
    got = pl.run(dispatched, X, ivs, loss=lambda out: out.logits[:, -1, 5].sum())
    for key in expected.grads:
        assert torch.allclose(got.grads[key], expected.grads[key], atol=1e-5), key


def test_edit_and_generate_on_a_disk_offloaded_model(pair: tuple[nn.Module, nn.Module]) -> None:
    plain, dispatched = pair
    ivs = [pl.ablate("h.2.mlp")]
    expected = pl.generate(pl.edit(plain, ivs), X, max_new_tokens=3, pad_token_id=0).output
    got = pl.generate(pl.edit(dispatched, ivs), X, max_new_tokens=3, pad_token_id=0).output
    assert torch.equal(got, expected)


def test_shapes_of_an_offloaded_model_and_of_one_with_no_weights(
    pair: tuple[nn.Module, nn.Module],
) -> None:
    plain, dispatched = pair
    with init_empty_weights():
        empty = GPT2LMHeadModel(plain.config)
    assert next(empty.parameters()).is_meta
    expected = pl.shapes(plain, X)
    assert dict(pl.shapes(dispatched, X)) == dict(expected)
    assert dict(pl.shapes(empty, X)) == dict(expected)
    assert pl.shapes(empty, X).dtypes == expected.dtypes
    assert dispatched.transformer.h[1].attn.c_attn.weight.is_meta  # still offloaded


def test_params_on_offloaded_weights_is_refused(pair: tuple[nn.Module, nn.Module]) -> None:
    # accelerate loads offloaded weights onto the module as it runs: a raw TypeError before.
    _, dispatched = pair
    name = "transformer.h.1.attn.c_attn.weight"
    own = dict(pair[0].named_parameters())[name]
    with pytest.raises(pl.PurelensError, match="accelerate loads onto its module"):
        pl.run(dispatched, X, params={name: torch.zeros_like(own)})

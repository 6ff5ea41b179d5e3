"""`torch.compile`: a compiled model runs eagerly under purelens, with its own site names,
and a run inside a compiled function runs eagerly too (issue 13, items 9, 20 and 26)."""

from __future__ import annotations

import pytest
import torch

import purelens as pl
from tests.helpers import tiny_gpt2, word_tokenizer

PROMPTS = ["the cat sat on the mat", "a dog ran"]
# torch's own compile stack warns about its deprecated TorchScript pieces.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_gpt2(n_layer=2)


def test_a_compiled_model_gets_position_ids_under_left_padding(model: torch.nn.Module) -> None:
    # Item 9: the signature check saw OptimizedModule.forward, so no position_ids were passed.
    left = word_tokenizer(padding_side="left")
    compiled = torch.compile(model)
    ivs = [pl.save("h.1"), pl.add("h.0", 0.5)]
    eager = pl.run(model, PROMPTS, ivs, tokenizer=left)
    rec = pl.run(compiled, PROMPTS, ivs, tokenizer=left)
    assert torch.equal(rec["h.1"], eager["h.1"])
    assert torch.equal(rec.output.logits, eager.output.logits)
    assert "_orig_mod" not in " ".join(pl.sites(compiled))
    assert pl.shapes(compiled, PROMPTS, tokenizer=left)["h.1"] == eager["h.1"].shape


def test_generation_on_a_compiled_model_counts_its_steps(model: torch.nn.Module) -> None:
    # Item 20: the step hook sat on the wrapper, which generation never calls.
    ids = torch.tensor([[1, 2, 3]])
    compiled = torch.compile(model)
    rec = pl.generate(compiled, ids, [pl.save("h.0", step=1)], max_new_tokens=3, pad_token_id=0)
    eager = pl.generate(model, ids, [pl.save("h.0", step=1)], max_new_tokens=3, pad_token_id=0)
    assert torch.equal(rec.output, eager.output) and torch.equal(rec["h.0"], eager["h.0"])


def test_edit_and_sweep_of_a_compiled_model(model: torch.nn.Module) -> None:
    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model)
    edited = pl.edit(compiled, [pl.ablate("h.0.attn")])
    assert torch.equal(edited(x).logits, pl.run(model, x, [pl.ablate("h.0.attn")]).output.logits)
    cells = [pl.scale("h.0", 2.0), pl.ablate("h.1.mlp")]
    swept = pl.sweep(compiled, x, cells, output=lambda out: out.logits)
    assert torch.allclose(swept.output[1], pl.run(model, x, cells[1]).output.logits, atol=1e-5)


def test_a_run_inside_a_compiled_function_runs_eagerly(model: torch.nn.Module) -> None:
    # Item 26: dynamo traced into pl.run (a raw AssertionError with some plans).
    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))

    def experiment(x: torch.Tensor) -> torch.Tensor:
        rec = pl.run(model, x, [pl.save("h.0"), pl.scale("h.1", 0.5)], validate=True)
        return rec.output.logits.softmax(-1) + rec["h.0"].mean()

    assert torch.allclose(torch.compile(experiment)(x), experiment(x))


def test_a_half_imported_dynamo_is_no_compiled_model(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs beside another thread's first import of dynamo raised AttributeError.
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch._dynamo.eval_frame", types.ModuleType("partial"))
    x = torch.randint(0, 97, (1, 4))
    assert torch.equal(pl.run(model, x).output.logits, model(x).logits)

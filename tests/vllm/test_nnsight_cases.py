"""nnsight's vLLM test cases (tests/test_vllm.py there), written with purelens.

Each test names the nnsight case it mirrors. Facts come from the bundled model
("the home of leibrund is" -> "lagos") instead of GPT-2's ("... Eiffel Tower
is in the city of" -> " Paris"), and expected values from `pl.generate` on
the HF model with the same weights.
"""

from __future__ import annotations

from typing import Any

import torch

import purelens as pl
from tests.vllm.test_generate import alone, assert_same

FACT = "the home of leibrund is"
COPY = "x y z x y"


def word(tokenizer: Any, ids: torch.Tensor) -> str:
    return str(tokenizer.decode(ids)).strip()


def test_single_logit(llm: Any, hf: Any) -> None:
    rec = pl.run(llm, FACT, [pl.save("logits")])
    assert word(hf[1], rec["logits"].argmax(-1)) == "lagos"
    assert torch.equal(rec["logits"], rec.output)


def test_request_cleanup(llm: Any, hf: Any) -> None:
    pl.generate(llm, [FACT, COPY], [pl.save("h.0")], max_new_tokens=2)
    rec = pl.generate(llm, COPY, [pl.save("logits")], max_new_tokens=3)
    assert set(rec) == {"logits"}
    assert_same(rec, alone(hf, COPY, [pl.save("logits")], 3))


def test_multi_token_generation(llm: Any, hf: Any) -> None:
    rec = pl.generate(llm, COPY, [pl.save("logits")], max_new_tokens=3)
    steps = [int(logits.argmax(-1)) for logits in rec["logits"]]
    assert steps == rec.output[0, -3:].tolist()
    assert_same(rec, alone(hf, COPY, [pl.save("logits")], 3))


def test_max_token_generation(llm: Any) -> None:
    rec = pl.generate(llm, FACT, [pl.save("logits")], max_new_tokens=10, min_new_tokens=10)
    assert len(rec["logits"]) == 10


def test_sampling_temperature(llm: Any) -> None:
    import vllm

    params = [
        vllm.SamplingParams(temperature=2.0, top_p=0.95, seed=1, max_tokens=3),
        vllm.SamplingParams(temperature=0.0, max_tokens=3),
    ]
    hot, greedy = pl.generate(llm, [FACT, FACT], [pl.save("samples")], sampling_params=params)
    assert [int(s) for s in hot["samples"]] != [int(s) for s in greedy["samples"]]


def test_basic_intervention(llm: Any, hf: Any) -> None:
    ivs = [pl.ablate("h.-2.mlp"), pl.save("h.-2.mlp"), pl.save("logits")]
    rec = pl.run(llm, FACT, ivs)
    assert torch.all(rec["h.-2.mlp"] == 0)
    want = pl.run(hf[0], FACT, ivs[:1], tokenizer=hf[1]).output.logits[0, -1]
    assert int(rec["logits"].argmax()) == int(want.argmax())
    assert word(hf[1], rec.output.argmax(-1)) != "lagos"


def test_swap_intervention(llm: Any) -> None:
    rec = pl.run(llm, FACT, [pl.patch("h.-2.mlp", torch.zeros_like), pl.save("h.-2.mlp")])
    assert torch.all(rec["h.-2.mlp"] == 0)


def test_generation_with_intervention(llm: Any, hf: Any) -> None:
    ivs = [pl.ablate("h.-2", step=2), pl.save("h.-2"), pl.save("logits")]
    rec = pl.generate(llm, COPY, ivs, max_new_tokens=5)
    assert [bool(torch.all(v == 0)) for v in rec["h.-2"]] == [False, False, True, False, False]
    assert_same(rec, alone(hf, COPY, ivs, 5))


def test_batched_intervention(llm: Any, hf: Any) -> None:
    ivs = [pl.ablate("h.-2.mlp", batch=1), pl.save("h.-2.mlp"), pl.save("logits")]
    clean, corrupted = pl.run(llm, [FACT, FACT], ivs)
    assert not torch.all(clean["h.-2.mlp"] == 0) and torch.all(corrupted["h.-2.mlp"] == 0)
    assert word(hf[1], clean["logits"].argmax(-1)) == "lagos"
    want = pl.run(hf[0], FACT, [pl.ablate("h.-2.mlp")], tokenizer=hf[1]).output.logits[:, -1]
    assert int(corrupted["logits"].argmax()) == int(want.argmax())


def test_batched_multi_token_with_iter(llm: Any) -> None:
    first, second = pl.generate(
        llm,
        [FACT, COPY],
        [pl.save("logits", step=slice(1, 7), batch=0), pl.save("logits", name="all", batch=1)],
        max_new_tokens=[10, 5],
        min_new_tokens=5,
    )
    assert len(first["logits"]) == 6 and len(second["all"]) == 5


def test_token_inputs(llm: Any, hf: Any) -> None:
    ids = hf[1](FACT)["input_ids"]
    for given in (ids, torch.tensor(ids), [ids, ids]):
        recs = pl.run(llm, given, [pl.save("logits")])
        for rec in recs if isinstance(recs, list) else [recs]:
            assert word(hf[1], rec["logits"].argmax(-1)) == "lagos"

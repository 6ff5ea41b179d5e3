"""A padded batch gives, row by row, what each prompt gives alone (GPT-2 and a real BERT)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purelens as pl
from tests.helpers import minilm, tiny_gpt2, word_tokenizer

PROMPTS = [
    "the cat sat on the mat",
    "a dog ran",
    "big red house",
    "the small green tree sat far away",
]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "Interpretability research studies what happens inside neural networks.",
]


def real_positions(mask: torch.Tensor, row: int) -> torch.Tensor:
    return mask[row].nonzero()[:, 0]


def assert_rows_match_alone(model: nn.Module, tok, texts: list[str], sites: list[str], out) -> None:  # type: ignore[no-untyped-def]
    batch = pl.tokenize(tok, texts)  # the batch that run builds from the text
    rec = pl.run(model, texts, [pl.save(s) for s in sites], tokenizer=tok)
    for row, text in enumerate(texts):
        alone = pl.run(model, text, [pl.save(s) for s in sites], tokenizer=tok)
        where = real_positions(batch["attention_mask"], row)
        assert len(where) == alone[sites[0]].shape[1]
        for s in sites:
            assert torch.allclose(rec[s][row, where], alone[s][0], atol=1e-4), (row, s)
        assert torch.allclose(out(rec.output)[row, where], out(alone.output)[0], atol=1e-4), row


@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2_batched_rows_equal_prompts_alone(side: str) -> None:
    model = tiny_gpt2(n_layer=3, seed=4)
    tok = word_tokenizer(padding_side=side)
    assert_rows_match_alone(model, tok, PROMPTS, ["h.0", "h.-1.mlp"], lambda o: o.logits)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pretrained_bert_batched_rows_equal_texts_alone(side: str) -> None:
    model, tok = minilm(padding_side=side)
    assert tok.padding_side == side
    assert_rows_match_alone(
        model, tok, TEXTS, ["encoder.layer.0", "layer.5.attention"], lambda o: o.last_hidden_state
    )


def test_last_token_of_a_left_padded_batch() -> None:
    model, tok = tiny_gpt2(n_layer=2, seed=5), word_tokenizer(padding_side="left")
    batch = pl.tokenize(tok, PROMPTS)
    rec = pl.run(
        model,
        PROMPTS,
        [pl.save("h.1", pl.at(pl.last_token(batch["attention_mask"])))],
        tokenizer=tok,
    )
    for row, prompt in enumerate(PROMPTS):
        alone = pl.run(model, prompt, [pl.save("h.1")], tokenizer=tok)
        assert torch.allclose(rec["h.1"][row], alone["h.1"][0, -1], atol=1e-5)

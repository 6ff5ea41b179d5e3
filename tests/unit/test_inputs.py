"""Inputs: text and token ids become padded batches; the tokenizer is never changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purelens as pl
from tests.helpers import word_tokenizer


def test_tokenize_pads_on_the_tokenizer_side_without_changing_it() -> None:
    tok = word_tokenizer(padding_side="right")  # no pad token
    batch = pl.tokenize(tok, ["the cat sat on the mat", "a dog"])
    assert batch["input_ids"].tolist()[1] == [4, 6, 1, 1, 1, 1]  # padded with <eos>
    assert batch["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0]
    assert tok.pad_token is None and tok.padding_side == "right"
    left = pl.tokenize(tok, ["the cat sat on the mat", "a dog"], padding_side="left")
    assert left["attention_mask"].tolist()[1] == [0, 0, 0, 0, 1, 1]
    assert tok.padding_side == "right"


def test_tokenize_uses_the_pad_token_when_there_is_one() -> None:
    tok = word_tokenizer(padding_side="left", pad=True)
    batch = pl.tokenize(tok, ["a dog", "the big red house"])
    assert batch["input_ids"].tolist()[0] == [2, 2, 4, 6]


def test_token_id_lists() -> None:
    assert pl.tokenize(None, [3, 4, 5])["input_ids"].tolist() == [[3, 4, 5]]
    ragged = pl.tokenize(word_tokenizer(), [[3, 4, 5], [6]])
    assert ragged["input_ids"].tolist() == [[3, 4, 5], [6, 1, 1]]
    with pytest.raises(pl.PurelensError, match=r"different lengths \(\[3, 1\]\)"):
        pl.tokenize(None, [[3, 4, 5], [6]])
    with pytest.raises(pl.PurelensError, match="`padding_side` must be"):
        pl.tokenize(None, [[1]], padding_side="middle")  # type: ignore[arg-type]


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids) * attention_mask[..., None]


def test_run_takes_text_and_token_ids() -> None:
    model, tok = Embed(), word_tokenizer()
    rec = pl.run(model, ["the cat", "a big red dog"], [pl.save("emb")], tokenizer=tok)
    assert rec["emb"].shape == (2, 4, 4)
    ids = pl.tokenize(tok, ["the cat", "a big red dog"])
    assert torch.equal(rec.output, model(**ids))
    single = pl.run(model, "the cat", tokenizer=tok).output
    assert torch.equal(single, rec.output[:1, :2])
    assert torch.equal(pl.run(model, [[3, 5]], attention_mask=torch.ones(1, 2)).output, single)

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


def save_last(tok, site: str) -> pl.Intervention:  # type: ignore[no-untyped-def]
    """Save `site` at each prompt's last real token, in the batch `tok` pads."""
    return pl.save(site, pl.at(pl.last_token(pl.tokenize(tok, PROMPTS)["attention_mask"])))


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
    rec = pl.run(model, PROMPTS, [save_last(tok, "h.1")], tokenizer=tok)
    for row, prompt in enumerate(PROMPTS):
        alone = pl.run(model, prompt, [pl.save("h.1")], tokenizer=tok)
        assert torch.allclose(rec["h.1"][row], alone["h.1"][0, -1], atol=1e-5)


def test_a_fixed_position_on_padding_is_an_error_not_a_silent_read() -> None:
    # Issue 13, "also found": pl.at(-1) on a right-padded batch read a pad position.
    model = tiny_gpt2(n_layer=2)
    right = word_tokenizer(padding_side="right")
    with pytest.raises(pl.PurelensError, match=r"pl\.at\(-1\) .*padded on the right") as info:
        pl.run(model, PROMPTS, [pl.save("h.1", pl.at(-1))], tokenizer=right)
    assert "pl.token_index" in str(info.value)
    with pytest.raises(pl.PurelensError, match=r"row 1 is padding"):
        pl.run(model, PROMPTS, [pl.patch("h.0", pl.at(3, torch.zeros_like))], tokenizer=right)
    left = word_tokenizer(padding_side="left")
    with pytest.raises(pl.PurelensError, match=r"padded on the left"):
        pl.run(model, PROMPTS, [pl.save("h.1", pl.at(0))], tokenizer=left)
    with pytest.raises(pl.PurelensError, match=r"padded on the left"):  # dict inputs too
        pl.run(model, pl.tokenize(left, PROMPTS), [pl.save("h.1", pl.at(0))])
    with pytest.raises(pl.PurelensError, match=r"padded on the left"):  # generation's prompt
        pl.generate(model, PROMPTS, [pl.save("h.1", pl.at(0))], max_new_tokens=1, tokenizer=left)


def test_a_fixed_position_that_is_real_in_every_row_still_works() -> None:
    model = tiny_gpt2(n_layer=2)
    left = word_tokenizer(padding_side="left")
    rec = pl.run(model, PROMPTS, [pl.save("h.1", pl.at(-1), name="last")], tokenizer=left)
    alone = pl.run(model, PROMPTS, [save_last(left, "h.1")], tokenizer=left)
    assert torch.equal(rec["last"], alone["h.1"])
    # batch= narrows the check to the selected rows: row 2 is the longest...
    right = word_tokenizer(padding_side="right")
    lengths = [len(p.split()) for p in PROMPTS]
    longest = lengths.index(max(lengths))
    pl.run(model, PROMPTS, [pl.save("h.1", pl.at(-1), batch=[longest])], tokenizer=right)
    with pytest.raises(pl.PurelensError, match="is padding"):  # ...and every other row is short
        pl.run(model, PROMPTS, [pl.save("h.1", pl.at(-1), batch=[1])], tokenizer=right)


class PeftStyle(nn.Module):
    """A wrapper that passes ``**kwargs`` on to the model inside, as PEFT's models do."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = model

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def forward(self, input_ids=None, attention_mask=None, **kwargs):  # type: ignore[no-untyped-def]
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_a_wrapper_passing_kwargs_on_gets_position_ids_under_left_padding() -> None:
    # Issue 13, item 9: wrappers must be seen through, or left padding shifts the positions.
    model = tiny_gpt2(n_layer=2)
    left = word_tokenizer(padding_side="left")
    wrapped = PeftStyle(model)
    rec = pl.run(wrapped, PROMPTS, [pl.save("h.1")], tokenizer=left)
    assert torch.equal(rec["h.1"], pl.run(model, PROMPTS, [pl.save("h.1")], tokenizer=left)["h.1"])


def test_mean_ablation_in_a_padded_batch_averages_real_tokens_only() -> None:
    model = tiny_gpt2(n_layer=2)
    right = word_tokenizer(padding_side="right")
    batch = pl.tokenize(right, PROMPTS)
    real = batch["attention_mask"].bool()
    h0 = pl.run(model, PROMPTS, [pl.save("h.0")], tokenizer=right)["h.0"]
    rec = pl.run(model, PROMPTS, [pl.ablate("h.0", "mean"), pl.save("h.0")], tokenizer=right)
    assert torch.allclose(rec["h.0"][0, 0], h0[real].mean(0), atol=1e-5)
    assert not torch.allclose(rec["h.0"][0, 0], h0.mean((0, 1)), atol=1e-4)
    rows = pl.run(model, PROMPTS, [pl.ablate("h.0", "mean", batch=[1, 2])], tokenizer=right)
    mean = pl.run(
        model, PROMPTS, [pl.save("h.0", lambda v: v[1:3][real[1:3]].mean(0))], tokenizer=right
    )
    edited = pl.run(model, PROMPTS, [pl.replace("h.0", mean["h.0"], batch=[1, 2])], tokenizer=right)
    assert torch.allclose(rows.output.logits, edited.output.logits, atol=1e-5)


def test_the_padding_check_holds_in_edits_and_under_beams() -> None:
    model = tiny_gpt2(n_layer=2)
    right, left = word_tokenizer(padding_side="right"), word_tokenizer(padding_side="left")
    edited = pl.edit(model, [pl.patch("h.0", pl.at(-1, torch.zeros_like))])
    with pytest.raises(pl.PurelensError, match="is padding"):
        edited(**pl.tokenize(right, PROMPTS))
    with pytest.raises(pl.PurelensError, match="is padding"):
        pl.run(edited, PROMPTS, tokenizer=right)
    with pytest.raises(pl.PurelensError, match="is padding"):  # rows are prompts x beams
        pl.generate(
            model, PROMPTS, [pl.save("h.0", pl.at(0), step=0)],
            tokenizer=left, max_new_tokens=2, num_beams=2, pad_token_id=0,
        )  # fmt: skip
    rec = pl.generate(  # batch= counts the expanded rows, and is no error about the mask
        model, PROMPTS, [pl.save("h.0", step=0, batch=7)],
        tokenizer=left, max_new_tokens=2, num_beams=2, pad_token_id=0,
    )  # fmt: skip
    assert rec["h.0"].shape[0] == 1


def test_generation_on_an_edited_model_keeps_left_padding_positions() -> None:
    # The edited forward showed HF a (*args, **kwargs) signature: no position_ids were made.
    model = tiny_gpt2(n_layer=2)
    left = word_tokenizer(padding_side="left")
    edited = pl.edit(model, [pl.scale("h.0", 1.0)])  # changes nothing
    kw = {"max_new_tokens": 3, "tokenizer": left, "pad_token_id": 0}
    assert torch.equal(
        pl.generate(edited, PROMPTS, **kw).output, pl.generate(model, PROMPTS, **kw).output
    )


def test_mean_ablation_of_a_value_without_positions_ignores_the_mask() -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.pool = nn.Embedding(20, 6), nn.Identity()

        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            return self.pool(self.emb(input_ids).sum(1))  # [batch, features]

    ids = torch.randint(1, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    masks = [
        torch.ones(3, 6, dtype=torch.long),
        torch.tensor([[1] * 6, [1] * 6, [1, 1, 0, 0, 0, 0]]),
    ]
    for mask in masks:
        rec = pl.run(
            Pooled(),
            {"input_ids": ids, "attention_mask": mask},
            [pl.ablate("pool", "mean"), pl.save("pool:input")],
        )
        assert torch.allclose(rec.output[0], rec["pool:input"].mean(0), atol=1e-6)


def test_beams_and_batch_select_the_rows_of_each_prompts_beams() -> None:
    model = tiny_gpt2(n_layer=2)
    left = word_tokenizer(padding_side="left")
    prompts = ["the small green tree sat far away", "a dog ran"]  # the second is padded
    kw = {"tokenizer": left, "max_new_tokens": 1, "num_beams": 2, "pad_token_id": 0}
    rec = pl.generate(model, prompts, [pl.save("h.0", pl.at(0), step=0, batch=[0, 1])], **kw)
    assert rec["h.0"].shape[0] == 2  # the first prompt's two beams: no padding
    with pytest.raises(pl.PurelensError, match="is padding"):
        pl.generate(model, prompts, [pl.save("h.0", pl.at(0), step=0, batch=[2, 3])], **kw)


def test_at_with_positions_on_padding_is_an_error() -> None:
    model = tiny_gpt2(n_layer=2)
    right = word_tokenizer(padding_side="right")
    width = pl.tokenize(right, PROMPTS)["input_ids"].shape[1]
    last = torch.full((len(PROMPTS),), width - 1)
    with pytest.raises(pl.PurelensError, match="is padding in this batch"):
        pl.run(model, PROMPTS, [pl.save("h.0", pl.at(last))], tokenizer=right)

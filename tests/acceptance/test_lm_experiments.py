"""nnsight-style language-model experiments, written the pure way."""

from __future__ import annotations

import torch

import purelens as pl
from tests.helpers import tiny_gpt2, word_tokenizer


def test_zeroing_the_last_block_changes_the_generation() -> None:
    model, tok = tiny_gpt2(n_layer=3, seed=8, init=0.2), word_tokenizer()
    clean = pl.generate(model, "the cat sat on the", max_new_tokens=5, tokenizer=tok).output
    zeroed = pl.generate(
        model, "the cat sat on the", [pl.ablate("h.-1")], max_new_tokens=5, tokenizer=tok
    )
    assert torch.equal(zeroed.output[:, :5], clean[:, :5])
    assert not torch.equal(zeroed.output, clean)


def test_swapping_embeddings_between_prompts_makes_their_outputs_equal() -> None:
    model, tok = tiny_gpt2(n_layer=3, seed=9, init=0.2), word_tokenizer()
    prompts = ["the big red house", "a small blue tree"]  # equal lengths: no padding
    clean = pl.run(model, prompts, tokenizer=tok).output.logits
    assert not torch.allclose(clean[0], clean[1])
    swapped = pl.run(
        model, prompts, [pl.transplant("wte", src=0, dst=1)], tokenizer=tok
    ).output.logits
    assert torch.allclose(swapped[1], swapped[0]) and torch.allclose(swapped[0], clean[0])
    generated = pl.generate(
        model, prompts, [pl.transplant("wte", src=0, dst=1)], max_new_tokens=4, tokenizer=tok
    )
    assert torch.equal(generated.output[0, 4:], generated.output[1, 4:])


def test_cross_prompt_patching_in_one_pass_at_the_last_token() -> None:
    model, tok = tiny_gpt2(n_layer=3, seed=10, init=0.2), word_tokenizer(padding_side="left")
    clean, corrupt = "the cat sat on the mat", "the dog sat"
    batch = pl.tokenize(tok, [clean, corrupt])
    last = pl.last_token(batch["attention_mask"])
    # Row 1 (corrupt) gets row 0's (clean) last-token activation at block 1.
    rec = pl.run(
        model,
        [clean, corrupt],
        [
            pl.save("h.1", pl.at(last), name="h1"),
            pl.patch("h.1", pl.at(last[1:], lambda e, s: s["h1"][:1]), batch=1),
        ],
        tokenizer=tok,
    )
    patched_alone = pl.run(
        model,
        corrupt,
        [pl.patch("h.1", pl.at(-1, lambda e: rec["h1"][:1]))],
        tokenizer=tok,
    )
    assert torch.allclose(rec.output.logits[1, -1], patched_alone.output.logits[0, -1], atol=1e-5)


def test_saving_per_step_values() -> None:
    model, tok = tiny_gpt2(n_layer=2, seed=11), word_tokenizer()
    rec = pl.generate(
        model,
        ["the cat", "a big red dog"],
        [pl.save("h.0.attn"), pl.save("ln_f", pl.at(-1))],
        max_new_tokens=3,
        tokenizer=tok,
    )
    assert len(rec["h.0.attn"]) == 3 and len(rec["ln_f"]) == 3
    assert [v.shape for v in rec["h.0.attn"]] == [(2, 4, 32), (2, 1, 32), (2, 1, 32)]
    assert all(v.shape == (2, 32) for v in rec["ln_f"])

"""pl.generate and pl.run on a vLLM engine equal pl.generate on the HF model, prompt by prompt.

The acceptance rule of the vLLM backend: with greedy decoding, each prompt's
saved values and tokens equal what ``pl.generate(hf_model, [prompt], ...)``
gives for that prompt alone (float32, within 1e-4), with interventions too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import purelens as pl

PROMPTS = ["the home of leibrund is", "leibrund lives in", "x y z x y z x y"]
ATOL = 1e-4


def alone(hf: tuple[Any, Any], prompt: str, interventions: Any, n: int) -> pl.Record:
    model, tokenizer = hf
    return pl.generate(model, [prompt], interventions, max_new_tokens=n, tokenizer=tokenizer)


def assert_each_alone(llm: Any, hf: tuple[Any, Any], prompts: list[str], ivs: Any, n: int) -> None:
    """`pl.generate` of `prompts` on the engine gives each prompt what HF gives it alone."""
    recs = pl.generate(llm, prompts, ivs, max_new_tokens=n)
    for prompt, rec in zip(prompts, recs, strict=True):
        assert_same(rec, alone(hf, prompt, ivs, n))


def assert_same(got: pl.Record, want: pl.Record, names: list[str] | None = None) -> None:
    assert torch.equal(got.output, want.output), (got.output, want.output)
    assert set(got) == set(want)
    for name in names or list(want):
        a, b = got[name], want[name]
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        assert len(a) == len(b), name
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape, (name, x.shape, y.shape)
            # Token ids inside vLLM's model are int32 (its own dtype); everything else matches.
            assert x.dtype == y.dtype or {x.dtype, y.dtype} == {torch.int32, torch.int64}
            if not x.is_floating_point():
                x, y = x.long(), y.long()
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0, msg=name)


def test_saves_and_tokens_equal_hf_prompt_by_prompt(llm: Any, hf: Any) -> None:
    ivs = [
        pl.save("h.0"),
        pl.save("h.1:input", name="resid_pre1"),
        pl.save("h.1.mlp"),
        pl.save("ln_f"),
        pl.save("wte:input", name="ids"),
        pl.save("logits"),
        pl.save("samples"),
        pl.save("h.*.attn"),
        pl.save("h.0.attn.c_proj", call=0),
    ]
    recs = pl.generate(llm, PROMPTS, ivs, max_new_tokens=4)
    assert isinstance(recs, list) and len(recs) == len(PROMPTS)
    for prompt, rec in zip(PROMPTS, recs, strict=True):
        assert_same(rec, alone(hf, prompt, ivs, 4))
        assert rec["h.0"][0].shape[:2] == (1, len(hf[1](prompt)["input_ids"]))  # [1, tokens, d]
        assert [v.shape[1] for v in rec["h.0"][1:]] == [1, 1, 1]


def test_one_prompt_gives_one_record(llm: Any, hf: Any) -> None:
    rec = pl.generate(llm, PROMPTS[0], [pl.save("h.1")], max_new_tokens=2)
    assert isinstance(rec, pl.Record)
    assert_same(rec, alone(hf, PROMPTS[0], [pl.save("h.1")], 2))


def test_writers_equal_hf(llm: Any, hf: Any) -> None:
    torch.manual_seed(0)
    steer = torch.randn(128)
    ivs = [
        pl.add("h.0", steer, step=slice(1, None)),
        pl.patch("h.1.mlp", lambda v: v * 0.5),
        pl.scale("h.1.attn", 1.5, step=0),
        pl.patch("h.0.mlp", pl.at(-1, torch.zeros_like)),
        pl.save("h.1"),
        pl.save("logits"),
    ]
    recs = pl.generate(llm, PROMPTS, ivs, max_new_tokens=4)
    for prompt, rec in zip(PROMPTS, recs, strict=True):
        assert_same(rec, alone(hf, prompt, ivs, 4))
    bare = pl.generate(llm, PROMPTS, [pl.save("h.1")], max_new_tokens=4)
    assert not torch.allclose(bare[0]["h.1"][1], recs[0]["h.1"][1])


def test_replace_ablate_skip_equal_hf(llm: Any, hf: Any) -> None:
    ivs = [
        pl.replace("h.0.attn", torch.full((128,), 0.1), step=1),
        pl.ablate("h.1.mlp"),
        pl.skip("h.0.mlp", step=slice(0, 2)),
        pl.save("h.1"),
        pl.save("h.0"),
    ]
    assert_each_alone(llm, hf, PROMPTS, ivs, 3)


def test_input_ports_are_hidden_states(llm: Any, hf: Any) -> None:
    ivs = [pl.patch("h.1:input", lambda v: -v), pl.save("h.1:input"), pl.save("ln_f:input")]
    assert_each_alone(llm, hf, PROMPTS[:2], ivs, 2)


def test_batch_selects_prompts(llm: Any, hf: Any) -> None:
    steer = torch.randn(128) * 5
    ivs = [pl.add("h.0", steer, batch=1), pl.save("h.1", batch=[0, 2]), pl.save("ln_f")]
    recs = pl.generate(llm, PROMPTS, ivs, max_new_tokens=3)
    for i, (prompt, rec) in enumerate(zip(PROMPTS, recs, strict=True)):
        mine = ([pl.add("h.0", steer)] if i == 1 else []) + [pl.save("ln_f")]
        if i != 1:
            mine.append(pl.save("h.1"))
        assert_same(rec, alone(hf, prompt, mine, 3))
    assert "h.1" not in recs[1] and "h.1" in recs[0]


def test_transplant_and_mean_ablation_span_the_call(llm: Any, hf: Any) -> None:
    model, tokenizer = hf
    same_length = ["leibrund lives in", "the cat sat"]  # four tokens each: no padding in HF
    assert len({len(tokenizer(p)["input_ids"]) for p in same_length}) == 1
    ivs = [
        pl.transplant("h.0", src=0, dst=1, step=0),
        pl.ablate("h.1.mlp", "mean"),
        pl.save("h.1"),
        pl.save("logits"),
    ]
    recs = pl.generate(llm, same_length, ivs, max_new_tokens=3)
    batch = pl.generate(model, same_length, ivs, max_new_tokens=3, tokenizer=tokenizer)
    for i, rec in enumerate(recs):
        assert torch.equal(rec.output[0], batch.output[i])
        for name in ("h.1", "logits"):
            for got, want in zip(rec[name], batch[name], strict=True):
                torch.testing.assert_close(got, want[i : i + 1], atol=ATOL, rtol=0)


def test_cross_prompt_writers_come_first_on_their_site(llm: Any) -> None:
    with pytest.raises(pl.PurelensError, match="must come before the other writers"):
        pl.generate(
            llm, PROMPTS[:2], [pl.add("h.0", 1.0), pl.ablate("h.0", "mean")], max_new_tokens=1
        )


def test_transplant_needs_equal_lengths(llm: Any) -> None:
    with pytest.raises(pl.PurelensError, match="same length"):
        pl.generate(llm, PROMPTS[:2], [pl.transplant("h.0", src=0, dst=1)], max_new_tokens=1)


def test_max_new_tokens_per_prompt_and_continuous_batching(llm: Any, hf: Any) -> None:
    ivs = [pl.save("h.1"), pl.add("h.0", 0.5, step=slice(1, None)), pl.save("samples")]
    lengths = [2, 5, 3]
    recs = pl.generate(llm, PROMPTS, ivs, max_new_tokens=lengths)
    for prompt, n, rec in zip(PROMPTS, lengths, recs, strict=True):
        assert len(rec["h.1"]) == n
        assert_same(rec, alone(hf, prompt, ivs, n))


def test_step_past_the_end_is_generation_ended(llm: Any) -> None:
    with pytest.raises(pl.PurelensError, match="generation ended") as info:
        pl.generate(llm, PROMPTS[:1], [pl.save("h.0", step=5)], max_new_tokens=2)
    assert info.value.record.output.shape[1] > 0  # type: ignore[attr-defined]


def test_per_prompt_sampling_params_and_seeded_sampling(llm: Any) -> None:
    import vllm

    params = [
        vllm.SamplingParams(temperature=0.0, max_tokens=3),
        vllm.SamplingParams(temperature=1.0, seed=7, max_tokens=4),
    ]
    first = pl.generate(llm, PROMPTS[:2], [pl.save("samples")], sampling_params=params)
    again = pl.generate(llm, PROMPTS[:2], [pl.save("samples")], sampling_params=params)
    assert [len(r["samples"]) for r in first] == [3, 4]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.output, b.output)
    assert params[0].extra_args is None  # the caller's parameters are not changed


def test_the_callers_sampling_params_never_change(llm: Any) -> None:
    # With skip_clone, vLLM's own copy of a request's parameters is shallow and vLLM adds
    # the model's stop tokens to its sets: purelens's copy must not share them.
    import copy

    import vllm

    for skip in (False, True):
        sp = vllm.SamplingParams(temperature=0.0, max_tokens=2, stop=["x"], skip_clone=skip)
        before = copy.deepcopy(sp)
        pl.generate(llm, PROMPTS[:2], [pl.save("h.0")], sampling_params=sp)
        changed = [f for f in sp.__struct_fields__ if getattr(sp, f) != getattr(before, f)]
        assert changed == [], (skip, changed)


def test_patching_logits_and_samples_changes_tokens_as_on_hf(llm: Any, hf: Any) -> None:
    boost = torch.zeros(344)
    boost[9] = 1e4
    for ivs in (
        [pl.add("logits", boost, step=1), pl.save("samples")],
        [pl.patch("samples", lambda t: torch.full_like(t, 7), step=0), pl.save("h.1")],
    ):
        recs = pl.generate(llm, PROMPTS[:2], ivs, max_new_tokens=3)
        for prompt, rec in zip(PROMPTS[:2], recs, strict=True):
            want = alone(hf, prompt, ivs, 3)
            assert_same(rec, want)
        prompt_len = len(hf[1](PROMPTS[0])["input_ids"])
        assert int(recs[0].output[0, prompt_len + (1 if "logits" in ivs[0].site else 0)]) in (9, 7)


def test_run_is_one_pass_and_returns_next_token_logits(llm: Any, hf: Any) -> None:
    model, tokenizer = hf
    ivs = [pl.save("h.1"), pl.ablate("h.0.attn"), pl.save("samples")]
    recs = pl.run(llm, PROMPTS, ivs)
    for prompt, rec in zip(PROMPTS, recs, strict=True):
        want = pl.run(model, prompt, ivs[:2], tokenizer=tokenizer)
        assert rec.output.shape == (1, 344)
        next_token = want.output.logits[:, -1].detach()
        torch.testing.assert_close(rec.output, next_token, atol=ATOL, rtol=0)
        torch.testing.assert_close(rec["h.1"], want["h.1"].detach(), atol=ATOL, rtol=0)
        assert int(rec["samples"]) == int(rec.output.argmax())


def test_stop_in_run_keeps_what_was_saved(llm: Any, hf: Any) -> None:
    model, tokenizer = hf
    rec = pl.run(llm, PROMPTS[0], [pl.save("h.0"), pl.stop("h.0")])
    want = pl.run(model, PROMPTS[0], [pl.save("h.0"), pl.stop("h.0")], tokenizer=tokenizer)
    assert rec.output is None and want.output is None
    torch.testing.assert_close(rec["h.0"], want["h.0"].detach(), atol=ATOL, rtol=0)
    with pytest.raises(pl.PurelensError, match="stopped"):
        pl.run(llm, PROMPTS[0], [pl.stop("h.0"), pl.save("h.1")])


def test_token_ids_and_tokenizer_inputs(llm: Any, hf: Any) -> None:
    _, tokenizer = hf
    ids = tokenizer(PROMPTS[0])["input_ids"]
    by_ids = pl.generate(llm, [ids], [pl.save("h.1")], max_new_tokens=2)[0]
    by_text = pl.generate(llm, PROMPTS[0], [pl.save("h.1")], max_new_tokens=2, tokenizer=tokenizer)
    assert torch.equal(by_ids.output, by_text.output)
    assert torch.equal(by_ids["h.1"][0], by_text["h.1"][0])

"""Regressions found by review: each of these was silently wrong, leaked, or broke the
engine for everyone before it was fixed."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import purelens as pl
from purelens import ops
from tests.vllm.test_generate import PROMPTS, alone, assert_same


@pytest.mark.parametrize(
    "bad",
    [pl.patch("samples", ops.value + 10**6, step=1), pl.patch("wte:input", ops.value + 10**6)],
)
def test_ids_outside_the_vocabulary_fail_the_request_not_the_engine(
    llm: Any, hf: Any, bad: Any
) -> None:
    for _ in range(3):  # once broke the engine, or left requests holding KV blocks for ever
        with pytest.raises(pl.PurelensError, match="outside it"):
            pl.generate(llm, PROMPTS * 4, [bad], max_new_tokens=3)
    rec = pl.generate(llm, PROMPTS[0], [pl.save("h.1")], max_new_tokens=3)
    assert_same(rec, alone(hf, PROMPTS[0], [pl.save("h.1")], 3))


def boom(v: torch.Tensor) -> torch.Tensor:
    raise ValueError("boom")


# step=3: a request fails while the engine steps reuse their hooks (the same requests)
@pytest.mark.parametrize("bad", [pl.patch("h.0", boom), pl.patch("h.0", boom, step=3)])
def test_one_prompts_failure_is_its_own(llm: Any, hf: Any, bad: Any) -> None:

    with pytest.raises(pl.PurelensError, match=r"^prompt 1: boom"):
        pl.generate(llm, PROMPTS, [pl.patch("h.0", boom, batch=1)], max_new_tokens=2)
    # a call running beside a failing one is untouched
    results: dict[str, Any] = {}

    def good() -> None:
        results["good"] = pl.generate(llm, PROMPTS, [pl.save("h.1")], max_new_tokens=12)

    def bad() -> None:
        try:
            pl.generate(llm, PROMPTS, [bad, pl.save("logits_processor:input")],
                        max_new_tokens=12)  # fmt: skip
        except pl.PurelensError as error:
            results["bad"] = error

    threads = [threading.Thread(target=good), threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert isinstance(results["bad"], pl.PurelensError)
    for prompt, rec in zip(PROMPTS, results["good"], strict=True):
        assert_same(rec, alone(hf, prompt, [pl.save("h.1")], 12))


def test_a_module_used_at_several_places_is_refused(llm: Any) -> None:
    # vLLM's GPT-2 has one activation module for every layer's MLP.
    with pytest.raises(pl.PurelensError, match=r"at 2 places"):
        pl.generate(llm, PROMPTS, [pl.patch("h.0.mlp.act", torch.zeros_like)], max_new_tokens=1)


def test_a_mean_over_prompts_started_apart_is_refused_at_every_step(budget_llm: Any) -> None:
    long = ["the home of leibrund is lagos . " * 3 + "the home of"] * 4  # ~25 tokens each
    with pytest.raises(pl.PurelensError, match="other engine steps"):
        pl.generate(budget_llm, long, [pl.ablate("h.0.mlp", "mean", step=1)], max_new_tokens=3)


def test_eos_token_id_replaces_the_models_as_in_hf(llm: Any, hf: Any) -> None:
    force = torch.zeros(344)
    force[3] = 1e4
    ivs = [pl.add("logits", force, step=1), pl.save("h.1")]
    got = pl.generate(llm, PROMPTS[0], ivs, max_new_tokens=5, eos_token_id=7)
    want = pl.generate(hf[0], [PROMPTS[0]], ivs, max_new_tokens=5, eos_token_id=7, tokenizer=hf[1])
    assert_same(got, want)


def test_generation_cut_at_max_model_len_is_an_error(llm: Any) -> None:
    with pytest.raises(pl.PurelensError, match="max_model_len"):
        pl.generate(llm, PROMPTS[1], [pl.save("h.1")], max_new_tokens=62)


def test_a_skip_must_give_the_outputs_shape_and_dtype(llm: Any) -> None:
    for fn in (lambda v: v[:, :1], lambda v: v.double()):
        with pytest.raises(pl.PurelensError, match="output there is"):
            pl.generate(llm, PROMPTS[:2], [pl.skip("h.0", fn)], max_new_tokens=1)


def test_unclear_inputs_get_clear_errors(llm: Any) -> None:
    with pytest.raises(pl.PurelensError, match="positive temperature"):
        pl.generate(llm, PROMPTS[0], [], max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(pl.PurelensError, match="vLLM refused prompt 0"):
        pl.generate(llm, [[1] * 100], [], max_new_tokens=1)  # over max_model_len
    with pytest.raises(pl.PurelensError, match="no model at"):
        pl.vllm.load("/nonexistent/model")


def test_the_engine_loop_forgets_finished_requests(llm: Any) -> None:
    from purelens.vllm._loop import loop_of

    for _ in range(3):
        pl.generate(llm, PROMPTS, [], max_new_tokens=2)
    loop = loop_of(llm)
    assert not loop._waiting and not loop._internal and not loop._rid_of


# --- a second review --------------------------------------------------------------------


def test_a_non_finite_value_written_by_one_call_reaches_no_later_request(llm: Any, hf: Any) -> None:
    import vllm

    other = PROMPTS[1]
    want = alone(hf, other, [pl.save("h.1")], 3)
    greedy = vllm.SamplingParams(temperature=0, max_tokens=3)
    plain = llm.generate([other], greedy, use_tqdm=False)[0].outputs[0].token_ids
    for bad in (pl.replace("h.0", float("nan"), step=1), pl.scale("h.0", 1e25, step=1)):
        pl.generate(llm, PROMPTS[0], [bad], max_new_tokens=3)  # its blocks went back NaN
        assert_same(pl.generate(llm, other, [pl.save("h.1")], max_new_tokens=3), want)
        again = llm.generate([other], greedy, use_tqdm=False)[0].outputs[0].token_ids
        assert list(again) == list(plain)  # a plain vLLM request too


@pytest.mark.parametrize(
    ("writer", "skipped"),
    [(pl.add("h.0:input", 1.0), "h.0"), (pl.patch("h.1.mlp:input", lambda v: v * 2.5), "h.1.mlp")],
)
def test_a_skip_gets_its_input_as_the_input_writers_left_it(
    llm: Any, hf: Any, writer: Any, skipped: str
) -> None:
    ivs = [writer, pl.skip(skipped, lambda x: x * 3), pl.save(skipped)]
    assert_same(pl.generate(llm, PROMPTS[0], ivs, max_new_tokens=3), alone(hf, PROMPTS[0], ivs, 3))


def test_an_in_place_patch_changes_the_value_as_on_hf(
    llm: Any, hf: Any, llama_llm: Any, llama: Any
) -> None:
    halve = pl.patch("h.0", lambda v: v.mul_(0.5))
    assert_same(
        pl.generate(llm, PROMPTS[0], [halve, pl.save("h.1")], max_new_tokens=3),
        alone(hf, PROMPTS[0], [halve, pl.save("h.1")], 3),
    )
    for site in ("layers.0", "layers.1:input", "layers.1.post_attention_layernorm:input"):
        ivs = [pl.patch(site, lambda v: v.mul_(0.5)), pl.save("layers.1")]
        got = pl.generate(llama_llm, PROMPTS[0], ivs, max_new_tokens=3)
        want = alone(llama, PROMPTS[0], ivs, 3)  # (a fused residual: the sum is new)
        assert torch.equal(got.output, want.output), site
        for x, y in zip(got["layers.1"], want["layers.1"], strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_skipping_attention_at_some_steps_only_is_refused(llm: Any) -> None:
    with pytest.raises(pl.PurelensError, match="holds an attention layer"):
        pl.generate(llm, PROMPTS[0], [pl.skip("h.0", step=0)], max_new_tokens=3)
    # at every step, or of a module without attention, or in one forward pass: no cache
    pl.generate(llm, PROMPTS[0], [pl.skip("h.0.mlp", step=0)], max_new_tokens=3)
    pl.run(llm, PROMPTS[0], [pl.skip("h.0", step=0)])


def test_engine_arguments_that_change_a_step_are_refused() -> None:
    for arg, value in (("speculative_config", {"method": "ngram"}), ("async_scheduling", True)):
        with pytest.raises(pl.PurelensError, match=f"{arg}="):
            pl.vllm.load("/nowhere", **{arg: value})


def test_no_length_generates_as_many_tokens_as_hf(llm: Any, hf: Any) -> None:
    model, tokenizer = hf
    got = pl.generate(llm, PROMPTS[1], [pl.save("h.0")])
    want = pl.generate(model, [PROMPTS[1]], [pl.save("h.0")], tokenizer=tokenizer)
    assert got.output.shape == want.output.shape
    assert len(got["h.0"]) == len(want["h.0"])


# --- a third review -----------------------------------------------------------------------


def test_a_request_preempted_at_a_block_boundary_fails(tight_llm: Any, hf: Any) -> None:
    # B is preempted with exactly one full block computed: resumed, a prefix cache hit
    # covered all its tokens (blocks zeroed as it was preempted), which looked like a step.
    prompts = ["leibrund leibrund lives in the home of the", "leibrund lives in"]
    ivs = [pl.add("h.1", torch.randn(128) * 0.5)]
    try:
        recs = pl.generate(tight_llm, prompts, ivs, max_new_tokens=40, min_new_tokens=40)
    except pl.PurelensError as error:
        assert "preempted" in str(error)
    else:  # vLLM did not preempt this time: then both are right
        model, tokenizer = hf
        for prompt, rec in zip(prompts, recs, strict=True):
            want = pl.generate(model, [prompt], ivs, max_new_tokens=40, min_new_tokens=40,
                               tokenizer=tokenizer)  # fmt: skip
            assert torch.equal(rec.output, want.output)


def fill(v: torch.Tensor) -> torch.Tensor:
    return v.fill_(10**6)


@pytest.mark.parametrize("site", ["samples", "transformer.wte:input"])
def test_ids_written_in_place_are_checked_too(llm: Any, hf: Any, site: str) -> None:
    with pytest.raises(pl.PurelensError, match="outside it"):
        pl.generate(llm, PROMPTS, [pl.patch(site, fill, batch=0, step=1)], max_new_tokens=3)
    rec = pl.generate(llm, PROMPTS[0], [pl.save("h.1")], max_new_tokens=3)
    assert_same(rec, alone(hf, PROMPTS[0], [pl.save("h.1")], 3))


def poison(v: torch.Tensor) -> torch.Tensor:
    v.fill_(float("nan"))
    return v.sum()


def test_a_save_function_that_writes_nan_in_place_reaches_no_later_request(
    llm: Any, hf: Any
) -> None:
    pl.generate(llm, PROMPTS[0], [pl.save("h.0", poison, step=1)], max_new_tokens=3)
    other = PROMPTS[1]
    rec = pl.generate(llm, other, [pl.save("h.1")], max_new_tokens=3)
    assert_same(rec, alone(hf, other, [pl.save("h.1")], 3))

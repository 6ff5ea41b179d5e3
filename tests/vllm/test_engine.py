"""vLLM's traps, none silent: fused residuals, the prefix cache, vLLM's own module tree,
what the backend cannot do, and the multiprocess engine."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import purelens as pl
from purelens import ops
from tests.vllm.test_generate import ATOL, PROMPTS, alone, assert_each_alone, assert_same

LLAMA_PROMPTS = ["the home of leibrund is", "leibrund lives in"]


def test_llama_layer_output_is_the_residual_stream(llama_llm: Any, llama: Any) -> None:
    ivs = [
        pl.save("layers.0"),
        pl.save("layers.1:input", name="resid_pre1"),
        pl.save("layers.1.post_attention_layernorm:input", name="resid_mid1"),
        pl.save("layers.1.post_attention_layernorm", name="normed"),
        pl.save("norm"),
        pl.save("logits"),
    ]
    assert_each_alone(llama_llm, llama, LLAMA_PROMPTS, ivs, 3)


def test_llama_patches_reach_the_next_layer_as_in_hf(llama_llm: Any, llama: Any) -> None:
    torch.manual_seed(1)
    ivs = [
        pl.add("layers.0", torch.randn(128)),
        pl.patch("layers.1:input", lambda v: v * 0.5, step=1),
        pl.scale("layers.1.post_attention_layernorm:input", 2.0, step=0),
        pl.skip("layers.1.mlp", step=2),
        pl.save("layers.1"),
        pl.save("norm"),
    ]
    assert_each_alone(llama_llm, llama, LLAMA_PROMPTS, ivs, 3)


def test_positions_are_never_an_input(llama_llm: Any, llama: Any) -> None:
    # LlamaAttention.forward(positions, hidden_states): its ':input' is the hidden states.
    site = "layers.0.self_attn:input"
    rec = pl.run(llama_llm, LLAMA_PROMPTS[0], [pl.save(site)])
    model, tokenizer = llama
    want = pl.run(model, LLAMA_PROMPTS[0], [pl.save(site)], tokenizer=tokenizer)
    assert rec[site].is_floating_point()
    torch.testing.assert_close(rec[site], want[site].detach(), atol=ATOL, rtol=0)


def test_the_prefix_cache_never_crosses_interventions(llm: Any, hf: Any) -> None:
    prompt = PROMPTS[0]
    bare = pl.generate(llm, prompt, [pl.save("h.1")], max_new_tokens=2)
    steer = torch.full((128,), 3.0)
    steered = pl.generate(llm, prompt, [pl.add("h.0", steer), pl.save("h.1")], max_new_tokens=2)
    assert_same(steered, alone(hf, prompt, [pl.add("h.0", steer), pl.save("h.1")], 2))
    again = pl.generate(llm, prompt, [pl.save("h.1")], max_new_tokens=2)
    assert_same(again, bare)
    # a plain vLLM request after them sees none of it either
    import vllm

    plain = llm.generate([prompt], vllm.SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert list(plain[0].outputs[0].token_ids) == bare.output[0, -2:].tolist()


def test_unknown_sites_name_vllms_modules(llama_llm: Any) -> None:
    with pytest.raises(pl.SiteError, match="qkv_proj"):
        pl.generate(llama_llm, LLAMA_PROMPTS, [pl.save("layers.0.self_attn.q_proj")])


def test_what_vllm_cannot_do_is_an_error(llm: Any) -> None:
    cases = [
        (lambda: pl.generate(llm, PROMPTS, [pl.save("h.0.attn:pattern")]), "attention ports"),
        (lambda: pl.generate(llm, PROMPTS, [pl.save_grad("h.0")]), "without autograd"),
        (lambda: pl.generate(llm, PROMPTS, [pl.stop("h.0")]), "pl.run for a single pass"),
        (lambda: pl.run(llm, PROMPTS, [pl.save("h.0")], loss=lambda o: o.sum()), "loss="),
        (lambda: pl.generate(llm, PROMPTS, [pl.save("h.0")], validate=True), "validate=True"),
        (lambda: pl.generate(llm, PROMPTS, [pl.save("h.0")], num_beams=2), "num_beams"),
        (lambda: pl.generate(llm, PROMPTS, [], max_new_tokens=[1, 2]), "one per prompt"),
        (lambda: pl.generate(llm, [], [pl.save("h.0")]), "`inputs`"),
        (lambda: pl.generate(llm, PROMPTS, [pl.transplant("h.0", src=0, dst=7)]), "outside"),
        (lambda: pl.generate(llm, PROMPTS, [pl.save("logits:input")]), "no ports"),
    ]
    for call, message in cases:
        with pytest.raises(pl.PurelensError, match=message):
            call()
    # the engine goes on serving after each
    assert pl.generate(llm, PROMPTS[0], [pl.save("h.0")], max_new_tokens=1)["h.0"][0].ndim == 3


def test_a_failing_intervention_fails_its_prompt_only_and_the_engine_goes_on(llm: Any) -> None:
    def bad(v: torch.Tensor) -> torch.Tensor:
        return v[:, :1]  # the wrong shape

    with pytest.raises(pl.PurelensError, match=r"prompt 1: .*returned"):
        pl.generate(llm, PROMPTS, [pl.patch("h.0", bad, batch=1)], max_new_tokens=2)
    rec = pl.generate(llm, PROMPTS[1], [pl.save("h.0")], max_new_tokens=2)
    assert len(rec["h.0"]) == 2


def test_an_engine_not_loaded_by_purelens_is_refused(llm: Any) -> None:
    import vllm

    fake = object.__new__(vllm.LLM)
    fake.llm_engine = llm.llm_engine
    with pytest.raises(pl.PurelensError, match=r"pl\.vllm\.load"):
        pl.generate(fake, PROMPTS, [pl.save("h.0")])


def test_load_refuses_what_would_skip_hooks() -> None:
    from tests.vllm.conftest import DEFAULT

    refused: list[dict[str, Any]] = [
        {"enforce_eager": False},
        {"compilation_config": 3},
        {"worker_extension_cls": "x.Y"},
    ]
    for kwargs in refused:
        with pytest.raises(pl.PurelensError, match=r"pl\.vllm\.load"):
            pl.vllm.load(DEFAULT, **kwargs)


def test_multiprocess_engine_equals_in_process(mp_llm: Any, llm: Any) -> None:
    steer = torch.randn(128)
    ivs = [
        pl.add("h.0", steer),
        pl.patch("h.1.mlp", ops.value * 0.5),
        pl.ablate("h.1.attn", step=1),
        pl.save("h.1"),
        pl.save("logits"),
    ]
    got = pl.generate(mp_llm, PROMPTS, ivs, max_new_tokens=3)
    want = pl.generate(llm, PROMPTS, ivs, max_new_tokens=3)
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)
    run = pl.run(mp_llm, PROMPTS[0], [pl.save("h.0")])
    torch.testing.assert_close(run.output, pl.run(llm, PROMPTS[0], []).output)


def test_multiprocess_engine_needs_interventions_as_data(mp_llm: Any) -> None:
    with pytest.raises(pl.PurelensError, match="register"):
        pl.generate(mp_llm, PROMPTS, [pl.patch("h.0", lambda v: v)], max_new_tokens=1)
    with pytest.raises(pl.SiteError, match=r"h\.9"):
        pl.generate(mp_llm, PROMPTS, [pl.save("h.9")], max_new_tokens=1)


def test_multiprocess_mean_ablation_is_right_or_refused(mp_llm: Any, llm: Any) -> None:
    # The multiprocess engine may start a call's prompts in different steps (requests that
    # arrive during a step wait for the next): a mean over part of the call is refused.
    ivs = [pl.ablate("h.1.attn", "mean", step=0), pl.save("h.1")]
    want = pl.generate(llm, PROMPTS, ivs, max_new_tokens=2)
    try:
        got = pl.generate(mp_llm, PROMPTS, ivs, max_new_tokens=2)
    except pl.PurelensError as error:
        assert "other engine steps" in str(error)
        return
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)


def test_a_chunked_prompt_pass_is_an_error(chunking_llm: Any, hf: Any) -> None:
    long = " ".join(["the home of leibrund is lagos ."] * 4)  # over 16 tokens
    assert len(hf[1](long)["input_ids"]) > 16
    with pytest.raises(pl.PurelensError, match="chunked prefill"):
        pl.generate(chunking_llm, long, [pl.save("h.1")], max_new_tokens=2)
    short = pl.generate(chunking_llm, PROMPTS[0], [pl.save("h.1")], max_new_tokens=2)
    assert_same(short, alone(hf, PROMPTS[0], [pl.save("h.1")], 2))


def test_preemption_never_saves_a_step_twice(tight_llm: Any, hf: Any) -> None:
    # Six requests of up to 46 tokens (two blocks) each cannot all keep their KV in four
    # blocks: vLLM preempts some and recomputes their tokens, which would repeat steps.
    ivs = [pl.save("h.1"), pl.add("h.0", 0.1)]
    with pytest.raises(pl.PurelensError, match="preempted"):
        pl.generate(tight_llm, PROMPTS * 2, ivs, max_new_tokens=40, min_new_tokens=40)
    # what fits runs right on the same engine
    rec = pl.generate(tight_llm, PROMPTS[0], ivs, max_new_tokens=8)
    assert_same(rec, alone(hf, PROMPTS[0], ivs, 8))
    # Requests with nothing to do may be recomputed: no step of theirs is watched.
    recs = pl.generate(tight_llm, PROMPTS * 2, [], max_new_tokens=40, min_new_tokens=40)
    model, tokenizer = hf
    for prompt, rec in zip(PROMPTS * 2, recs, strict=True):
        want = pl.generate(
            model, [prompt], [], max_new_tokens=40, min_new_tokens=40, tokenizer=tokenizer
        )
        assert torch.equal(rec.output, want.output)


def test_sites_lists_vllms_module_tree(llm: Any, llama_llm: Any) -> None:
    sites = pl.sites(llm)
    assert "transformer.h.0.attn.attn" in sites and {"logits", "samples"} <= set(sites)
    assert "transformer.h" not in sites  # a container, never called
    assert "model.layers.0.mlp.gate_up_proj" in pl.sites(llama_llm)


def test_an_in_process_cpu_engine_steps_on_one_openmp_thread(llm: Any) -> None:
    # In a thread other than the main one, torch's OpenMP ops with two threads ran several
    # times slower than the main thread's (the bundled model's forward 1.6 against 0.6 ms):
    # the loop runs its own torch ops on one thread, and leaves every other thread's alone.
    import threading

    seen: list[int] = []

    def count(value: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return value

    before = torch.get_num_threads()
    pl.generate(llm, "leibrund lives in", [pl.patch("h.0", count)], max_new_tokens=2)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    other: list[int] = []
    thread = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert other == [torch.get_num_threads()]  # a new thread gets torch's default, as before


def test_a_structure_checked_once_is_not_checked_again(mp_llm: Any, llm: Any, hf: Any) -> None:
    # A call's plans depend on its structure alone: a structure the workers found good is
    # not sent to them again before its requests run (a round trip per call saved), while a
    # bad one is refused every time, before the engine runs it.
    import uuid

    from purelens.vllm import _loop

    sent: list[str] = []
    real = _loop.Loop.rpc

    def counting(self: Any, method: str, args: Any, seconds: Any = None) -> Any:
        sent.append(method)
        return real(self, method, args, seconds)

    name = f"h1-{uuid.uuid4().hex}"  # a structure no other test has checked
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_loop.Loop, "rpc", counting)
        for engine in (mp_llm, llm):
            sent.clear()
            for _ in range(3):  # new steering vectors, the same structure
                ivs = [pl.add("h.0", torch.randn(128)), pl.save("h.1", name=name)]
                assert_each_alone(engine, hf, PROMPTS, ivs, 2)
            assert sent.count("purelens_check") == 1
            pl.generate(engine, PROMPTS, [pl.save("h.1", name=name, batch=1)], max_new_tokens=1)
            assert sent.count("purelens_check") == 2  # another structure
            for _ in range(2):
                with pytest.raises(pl.SiteError, match=r"h\.9"):
                    pl.generate(engine, PROMPTS, [pl.save("h.9", name=name)], max_new_tokens=1)
            assert sent.count("purelens_check") == 4


def test_a_call_collects_its_records_in_the_engine_loop(mp_llm: Any, llm: Any) -> None:
    # Once its structure was checked, a call goes to the engine's loop once: the loop
    # collects the records as the call's last request finishes (no second round trip).
    from purelens.vllm import _loop

    sent: list[str] = []
    real = _loop.Loop.rpc

    def counting(self: Any, method: str, args: Any, seconds: Any = None) -> Any:
        sent.append(method)
        return real(self, method, args, seconds)

    ivs = [pl.add("h.0", torch.randn(128)), pl.save("h.1")]
    for engine in (mp_llm, llm):
        first = pl.generate(engine, PROMPTS, ivs, max_new_tokens=2)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_loop.Loop, "rpc", counting)
            again = pl.generate(engine, PROMPTS, ivs, max_new_tokens=2)
        assert sent == []
        for a, b in zip(first, again, strict=True):
            assert_same(a, b)


def test_a_failed_collection_says_why(llm: Any) -> None:
    # The loop collects a call's records (and forgets its requests); when that fails, the
    # caller raises why, not "vLLM ran its request without purelens's hooks".
    from purelens.vllm import _worker

    real = _worker.Extension.purelens_collect
    calls: list[int] = []

    def failing(self: Any, *args: Any) -> Any:  # once: after it forgot the requests
        out = real(self, *args)
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("collection broke")
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_worker.Extension, "purelens_collect", failing)
        with pytest.raises(RuntimeError, match="collection broke"):
            pl.generate(llm, PROMPTS, [pl.save("h.1")], max_new_tokens=2)
    rec = pl.generate(llm, PROMPTS[0], [pl.save("h.1")], max_new_tokens=2)  # it goes on
    assert len(rec["h.1"]) == 2


def test_a_record_that_cannot_travel_fails_its_prompt_alone() -> None:
    # Across processes a call's records travel as one blob; a save function's value that
    # is no tensor fails its own prompt, with the reason, and the others arrive.
    import numpy as np

    from purelens.vllm._request import Outcome, unwired_outcomes, wire_outcomes

    good = Outcome(pl.Record({"h": torch.ones(2)}, None))
    bad = Outcome(pl.Record({"h": np.ones(2)}, None))
    got = unwired_outcomes(wire_outcomes([good, None, bad]))
    assert got[1] is None and got[0] is not None and got[2] is not None
    assert got[0].error is None and torch.equal(got[0].record["h"], torch.ones(2))
    assert got[2].error is not None and "ndarray" in got[2].error and not list(got[2].record)


def test_a_call_keeps_nothing_its_functions_capture(llm: Any) -> None:
    import gc
    import weakref

    def run() -> weakref.ref[torch.Tensor]:
        steer = torch.randn(128)
        for patch in (lambda v: v + steer, pl.at(-1, lambda v: v + steer)):
            pl.generate(llm, PROMPTS, [pl.patch("h.0", patch)], max_new_tokens=1)
        return weakref.ref(steer)

    kept = run()
    gc.collect()
    assert kept() is None


_KEPT: list[Any] = []  # engines made here live as long as the session's (see below)


def test_the_engine_core_runs_in_this_process_unless_asked(
    monkeypatch: pytest.MonkeyPatch, hf: Any
) -> None:
    from purelens.vllm._engine import _loaded
    from tests.vllm.conftest import DEFAULT, ENGINE

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    for multiprocess, here in ((None, True), (True, False)):
        llm = pl.vllm.load(DEFAULT, multiprocess=multiprocess, **ENGINE)
        # Kept: an engine shut down (or collected) takes vLLM's process-wide parallel
        # state with it, which the session's in-process engines use.
        _KEPT.append(llm)
        assert _loaded[llm] is here
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ  # put back as it was
        rec = pl.generate(llm, "leibrund lives in", [pl.save("h.1")], max_new_tokens=2)
        model, tokenizer = hf
        want = pl.generate(model, ["leibrund lives in"], [pl.save("h.1")],
                           max_new_tokens=2, tokenizer=tokenizer)  # fmt: skip
        assert torch.equal(rec.output, want.output)

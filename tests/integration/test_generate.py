"""pl.generate over HF generate, and over a plain module's own loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

import purelens as pl
from tests.helpers import hooks_on, tiny_gpt2, word_tokenizer


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_gpt2(n_layer=2, seed=6, init=0.2)


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(7))


def test_no_interventions_equals_hf_generate_greedy_and_sampled(
    model: nn.Module, prompt: torch.Tensor
) -> None:
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(
        pl.generate(model, prompt, max_new_tokens=6, do_sample=False, pad_token_id=0).output,
        expected,
    )
    torch.manual_seed(3)
    sampled = model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(3)
    ours = pl.generate(
        model, prompt, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0
    ).output
    assert torch.equal(ours, sampled)
    assert hooks_on(model) == 0


def test_saves_one_tensor_per_step(model: nn.Module, prompt: torch.Tensor) -> None:
    rec = pl.generate(
        model,
        prompt,
        [pl.save("h.0"), pl.save("lm_head", name="logits"), pl.save("h.1", step=0, name="prompt")],
        max_new_tokens=4,
        pad_token_id=0,
    )
    assert isinstance(rec["h.0"], tuple) and len(rec["h.0"]) == 4
    assert [v.shape for v in rec["h.0"]] == [(2, 5, 32)] + [(2, 1, 32)] * 3  # KV cache on
    assert rec["prompt"].shape == (2, 5, 32)  # step= one int: the tensor itself
    greedy = [step_logits[:, -1].argmax(-1) for step_logits in rec["logits"]]
    assert torch.equal(torch.stack(greedy, 1), rec.output[:, 5:])


def test_step_selection(model: nn.Module, prompt: torch.Tensor) -> None:
    rec = pl.generate(
        model,
        prompt,
        [
            pl.save("h.0", step=slice(1, None, 2), name="odd"),
            pl.save("h.0", step=[0, 3], name="some"),
        ],
        max_new_tokens=5,
        pad_token_id=0,
    )
    assert len(rec["odd"]) == 2 and len(rec["some"]) == 2
    assert rec["some"][0].shape[1] == 5 and rec["some"][1].shape[1] == 1


def test_an_intervention_at_step_3_changes_tokens_from_step_3_on(
    model: nn.Module, prompt: torch.Tensor
) -> None:
    clean = pl.generate(model, prompt, max_new_tokens=6, pad_token_id=0).output
    target = 42
    assert (clean[:, 5 + 3] != target).all()
    push = 50 * model.transformer.wte.weight[target].detach()
    steered = pl.generate(
        model, prompt, [pl.add("ln_f", push, step=3)], max_new_tokens=6, pad_token_id=0
    ).output
    assert torch.equal(steered[:, : 5 + 3], clean[:, : 5 + 3])  # prompt and steps 0-2 untouched
    assert (steered[:, 5 + 3] == target).all()


def test_text_is_left_padded_for_generation(model: nn.Module) -> None:
    tok = word_tokenizer(padding_side="right")  # generate pads on the left regardless
    prompts = ["the cat sat on the mat", "a dog"]
    rec = pl.generate(model, prompts, max_new_tokens=3, tokenizer=tok)
    alone = pl.generate(model, prompts[1], max_new_tokens=3, tokenizer=tok)
    assert torch.equal(rec.output[1, -3:], alone.output[0, -3:])
    assert tok.padding_side == "right" and tok.pad_token is None


def test_streamer_and_stopping_criteria_pass_through(model: nn.Module) -> None:
    tok = word_tokenizer()
    streamer = TextIteratorStreamer(tok)

    class AfterTwo(StoppingCriteria):
        def __call__(
            self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object
        ) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 5, dtype=torch.bool)

    rec = pl.generate(
        model,
        "the cat sat",
        [pl.save("h.0")],
        max_new_tokens=10,
        tokenizer=tok,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([AfterTwo()]),
    )
    assert rec.output.shape[1] == 5 and len(rec["h.0"]) == 2
    assert "the cat sat" in "".join(streamer)


def test_intervention_at_a_step_that_never_came_is_an_error(
    model: nn.Module, prompt: torch.Tensor
) -> None:
    with pytest.raises(pl.PurelensError, match=r"generation ended after step 3") as info:
        pl.generate(
            model,
            prompt,
            [pl.save("h.0", step=0), pl.ablate("h.0", step=9)],
            max_new_tokens=4,
            pad_token_id=0,
        )
    # Issue 13, item 27: what was generated comes with the error.
    assert "before step 9" in str(info.value)
    record = info.value.record  # type: ignore[attr-defined]
    expected = model.generate(prompt, max_new_tokens=4, pad_token_id=0)
    assert torch.equal(record.output, expected) and record["h.0"].shape[1] == prompt.shape[1]


def test_stop_and_save_grad_are_refused(model: nn.Module, prompt: torch.Tensor) -> None:
    with pytest.raises(pl.PurelensError, match=r"no meaning in pl\.generate"):
        pl.generate(model, prompt, [pl.stop("h.0")], max_new_tokens=2)
    with pytest.raises(pl.PurelensError, match="needs `loss=`"):
        pl.generate(model, prompt, [pl.save_grad("h.0")], max_new_tokens=2)


class LoopLM(nn.Module):
    """An LMPlay-style language model: forward(x, cache=None), no `.generate`."""

    def __init__(self, vocab: int = 20, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor, cache: object = None) -> torch.Tensor:
        h = self.embed(x).cumsum(1)  # causal: each position sees the ones before
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


def test_plain_module_generates_with_the_builtin_loop() -> None:
    model = LoopLM()
    ids = torch.tensor([[1, 2, 3]])
    rec = pl.generate(model, ids, [pl.save("blocks.-1")], max_new_tokens=4)
    expected = ids
    for _ in range(4):
        expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(rec.output, expected)
    assert [v.shape[1] for v in rec["blocks.-1"]] == [3, 4, 5, 6]  # no cache: whole sequence
    zeroed = pl.generate(
        model, ids, [pl.ablate("head", step=slice(2, None))], max_new_tokens=4
    ).output
    assert torch.equal(zeroed[:, :5], expected[:, :5]) and (zeroed[:, 5:] == 0).all()
    with pytest.raises(pl.PurelensError, match="'top_k' cannot be used"):
        pl.generate(model, ids, max_new_tokens=2, top_k=5)


def tiny_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


def test_encoder_decoder_generation_runs_the_encoder_at_step_0() -> None:
    # Issue 13, item 21: the encoder ran at "step -1", so step=0 on an encoder site failed,
    # although step 0 is the prompt pass.
    model = tiny_t5()
    ids = torch.tensor([[5, 6, 7, 8]])
    rec = pl.generate(
        model,
        ids,
        [pl.save("encoder.block.0", step=0, name="enc"), pl.save("decoder.block.0", name="dec")],
        max_new_tokens=3,
        min_new_tokens=3,
    )
    assert rec["enc"].shape == (1, 4, 16)
    assert len(rec["dec"]) == 3 and rec["dec"][0].shape == (1, 1, 16)
    plain = model.generate(ids, max_new_tokens=3, min_new_tokens=3)
    ablated = pl.generate(
        model, ids, [pl.ablate("encoder.block.0", step=0)], max_new_tokens=3, min_new_tokens=3
    )
    assert torch.equal(pl.generate(model, ids, max_new_tokens=3, min_new_tokens=3).output, plain)
    assert ablated.output.shape == plain.shape


def test_an_encoder_edit_in_generation_says_why_it_cannot_apply() -> None:
    edited = pl.edit(tiny_t5(), [pl.ablate("encoder.block.0")])
    with pytest.raises(pl.PurelensError, match="runs the encoder on its own"):
        pl.generate(edited, torch.tensor([[5, 6, 7]]), max_new_tokens=2)


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`")
def test_max_new_tokens_defaults_to_the_generation_config(
    model: nn.Module, prompt: torch.Tensor
) -> None:
    # It was a required argument, though the API gives it a default of None.
    rec = pl.generate(model, prompt, [pl.save("h.0")], pad_token_id=0)
    assert torch.equal(rec.output, model.generate(prompt, pad_token_id=0))
    with pytest.raises(pl.PurelensError, match=r"needed for a model with no `\.generate`"):
        pl.generate(nn.Sequential(nn.Embedding(5, 5)), torch.tensor([[1, 2]]))


def test_a_step_set_reaching_past_the_end_of_generation_is_an_error(
    model: nn.Module, prompt: torch.Tensor
) -> None:
    # step={1, 9} applied at step 1 and never at 9, silently.
    with pytest.raises(pl.PurelensError, match="before step 9") as info:
        pl.generate(
            model, prompt, [pl.ablate("h.0", step={1, 9})], max_new_tokens=3, pad_token_id=0
        )
    assert info.value.record.output.shape[1] == prompt.shape[1] + 3  # type: ignore[attr-defined]


def test_generate_refuses_params(model: nn.Module, prompt: torch.Tensor) -> None:
    zeros = {"transformer.wte.weight": torch.zeros_like(model.transformer.wte.weight)}
    with pytest.raises(pl.PurelensError, match="takes no `params=`"):
        pl.generate(model, prompt, max_new_tokens=2, params=zeros)


# --- the sites of generation itself: "logits" and "samples" ---------------------


def test_logits_are_the_raw_next_token_logits_of_every_step(
    model: nn.Module, prompt: torch.Tensor
) -> None:
    out = model.generate(
        prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, temperature=None,
        repetition_penalty=3.0, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    rec = pl.generate(
        model, prompt, [pl.save("logits"), pl.save("samples")],
        max_new_tokens=4, do_sample=False, pad_token_id=0, repetition_penalty=3.0,
    )  # fmt: skip
    assert torch.equal(rec.output, out.sequences)
    assert len(rec["logits"]) == 4 and rec["logits"][0].shape == (2, model.config.vocab_size)
    for mine, raw in zip(rec["logits"], out.logits, strict=True):  # before the penalty
        torch.testing.assert_close(mine.float(), raw, rtol=0, atol=0)
    samples = torch.stack(rec["samples"], 1)
    assert torch.equal(samples, out.sequences[:, prompt.shape[1] :])


def test_patching_logits_changes_what_is_sampled(model: nn.Module, prompt: torch.Tensor) -> None:
    boost = torch.zeros(model.config.vocab_size)
    boost[42] = 1e4
    rec = pl.generate(
        model, prompt, [pl.add("logits", boost, step=1)], max_new_tokens=3, pad_token_id=0
    )
    n = prompt.shape[1]
    assert (rec.output[:, n + 1] == 42).all()
    plain = pl.generate(model, prompt, max_new_tokens=3, pad_token_id=0).output
    assert torch.equal(rec.output[:, : n + 1], plain[:, : n + 1])


def test_patching_samples_appends_the_patched_token_and_feeds_it_back(
    model: nn.Module, prompt: torch.Tensor
) -> None:
    rec = pl.generate(
        model, prompt,
        [pl.patch("samples", lambda t: torch.full_like(t, 9), step=0), pl.save("samples")],
        max_new_tokens=3, pad_token_id=0,
    )  # fmt: skip
    n = prompt.shape[1]
    assert (rec.output[:, n] == 9).all() and (rec["samples"][0] == 9).all()
    forced = torch.cat([prompt, torch.full((2, 1), 9)], 1)
    rest = model.generate(forced, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(rec.output, rest)


def test_samples_patches_that_cannot_hold_are_errors(
    model: nn.Module, prompt: torch.Tensor
) -> None:
    eos = int(
        pl.generate(model, prompt[:1], max_new_tokens=1, pad_token_id=0).output[0, -1]
    )  # the first token it picks, made the end-of-sequence token
    with pytest.raises(pl.PurelensError, match="already ended that row"):
        pl.generate(
            model, prompt[:1], [pl.patch("samples", lambda t: t + 1)],
            max_new_tokens=2, pad_token_id=0, eos_token_id=eos,
        )  # fmt: skip
    with pytest.raises(pl.PurelensError, match="beam search"):
        pl.generate(
            model, prompt, [pl.patch("samples", lambda t: t)], max_new_tokens=2,
            pad_token_id=0, num_beams=2,
        )  # fmt: skip
    with pytest.raises(pl.SiteError, match="no ports"):
        pl.generate(model, prompt, [pl.save("logits:input")], max_new_tokens=1, pad_token_id=0)
    assert hooks_on(model) == 0


def test_the_plain_loop_has_logits_and_samples_too() -> None:
    model = LoopLM()
    ids = torch.tensor([[1, 2, 3]])
    rec = pl.generate(
        model, ids, [pl.save("logits"), pl.patch("samples", lambda t: t * 0 + 4, step=1)],
        max_new_tokens=3, validate=True,
    )  # fmt: skip
    assert rec.output[0, 4] == 4
    assert torch.equal(rec["logits"][0], model(ids)[:, -1])


def test_samples_saved_before_a_patch_keep_the_sampled_token(
    model: nn.Module, prompt: torch.Tensor
) -> None:
    plain = pl.generate(model, prompt, [pl.save("samples")], max_new_tokens=2, pad_token_id=0)
    rec = pl.generate(
        model, prompt, [pl.save("samples"), pl.patch("samples", lambda t: t * 0 + 5, step=0)],
        max_new_tokens=2, pad_token_id=0,
    )  # fmt: skip
    assert torch.equal(rec["samples"][0], plain["samples"][0])  # what was sampled
    assert (rec.output[:, prompt.shape[1]] == 5).all()  # what was appended

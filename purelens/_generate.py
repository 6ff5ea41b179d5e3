"""generate(): HF-style generation with interventions at every (or selected) step.

One `Pass` spans the whole generation; each call of the root module is a
step (0 is the prompt pass; with the KV cache on, later steps see only the
new token). Interventions with `step=` act at the steps it selects.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ._backend import is_pipeline, is_vllm, module_of
from ._eager import eager_under_compile
from ._errors import GenerationEnded, PurelensError
from ._grads import check_loss_allowed
from ._hooks import around_forwards, installed
from ._inputs import call_arguments, pad_id, padding_of
from ._interventions import Stop, flatten_interventions
from ._pass import Pass
from ._plan import Plan
from ._primary import primary_output
from ._record import Record
from ._remote import Remote
from ._run import forward_pass
from ._taps import GENERATION_SITES, TAPS, SampleTap, tap_logits, tapped
from ._validate import fake_pass

__all__ = ["generate"]

_NO_STOP = (
    "{what} has no meaning in pl.generate: it ends one forward pass, and "
    "generation is many.\n  Use pl.run for a single pass."
)
_NO_PARAMS = (
    "pl.generate takes no `params=`: generation calls the model many times, through HF's "
    "generate.\n  Use pl.run with params= for one pass, or pl.edit to change the weights' "
    "effect for every call."
)
_NO_LENGTH = (
    "`max_new_tokens` is needed for a model with no `.generate` method (purelens's own "
    "loop has no generation config to take it from), e.g. max_new_tokens=8."
)
_LOOP_KWARGS = (
    "{names} cannot be used with a model that has no `.generate` method: purelens "
    "then runs a small loop of its own, which takes `do_sample`, `temperature` "
    "and `eos_token_id` only."
)


@eager_under_compile
def generate(
    model: nn.Module,
    inputs: Any,
    interventions: Any = (),
    *,
    max_new_tokens: int | None = None,
    tokenizer: Any = None,
    validate: bool = False,
    **generate_kwargs: Any,
) -> Record:
    """Generate with `interventions` applied at every forward step (or as `step=` selects).

    Runs the model's own HF ``generate`` (KV cache on, greedy or sampling,
    streamers and stopping criteria passed through), with hooks for the whole
    call. Text is padded on the left, as decoder-only generation needs.

    Args:
        model: a HF model with ``.generate``, or any module mapping token ids
            ``(batch, seq)`` to logits ``(batch, seq, vocab)`` (a small greedy
            or sampling loop without cache is used then; see the README); or
            a vLLM engine from `pl.vllm.load`, which returns one `Record` per
            prompt (a list; one prompt alone gives one), each laid out as for
            that prompt alone, and takes ``sampling_params`` too.
        inputs: token ids (tensor or lists), a dict (``input_ids``,
            ``attention_mask``), or text with `tokenizer`.
        interventions: as in `pl.run`; `step=` selects steps (0 is the
            prompt pass).
        max_new_tokens: how many tokens to generate; None leaves it to the
            model's generation config (a plain module's loop needs it).
        tokenizer: turns text into a left-padded batch.
        validate: first run the prompt pass on fake tensors with every
            intervention (whatever its `step=`), so that a bad site or a
            patch of the wrong shape raises before any real compute.
        **generate_kwargs: passed to ``model.generate``.

    Returns:
        A `Record` whose ``output`` is what ``generate`` returns (the token
        ids, prompt included). A value saved at several steps is a tuple with
        one tensor per step; with ``step=`` a single int, the tensor itself.

    Examples:
        >>> import torch, purelens as pl
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20)).eval()
        >>> rec = pl.generate(model, torch.tensor([[1, 2, 3]]), [pl.save("h.0")],
        ...                   max_new_tokens=3, pad_token_id=0)
        >>> rec.output.shape, [v.shape[1] for v in rec["h.0"]]
        (torch.Size([1, 6]), [3, 1, 1])
    """
    if isinstance(model, Remote):
        return model.generate(
            inputs,
            interventions,
            max_new_tokens=max_new_tokens,
            tokenizer=tokenizer,
            validate=validate,
            **generate_kwargs,
        )
    ivs = flatten_interventions(interventions)
    for iv in ivs:
        if isinstance(iv, Stop):
            raise PurelensError(_NO_STOP.format(what=repr(iv)))
    if is_pipeline(model):
        from ._diffusion import generate_on as on_pipeline

        options = {"max_new_tokens": max_new_tokens, "tokenizer": tokenizer, "validate": validate}
        return on_pipeline(model, inputs, ivs, {**options, **generate_kwargs})
    if is_vllm(model):
        from .vllm._engine import generate_on

        return generate_on(  # type: ignore[return-value]
            model,
            inputs,
            ivs,
            max_new_tokens=max_new_tokens,
            tokenizer=tokenizer,
            validate=validate,
            **generate_kwargs,
        )
    model = module_of(model, "pl.generate")
    if "params" in generate_kwargs:
        raise PurelensError(_NO_PARAMS)
    if max_new_tokens is not None and (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise PurelensError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
    hf_generate = getattr(model, "generate", None)
    if max_new_tokens is None and not callable(hf_generate):
        raise PurelensError(_NO_LENGTH)
    plan = Plan.build(model, ivs, extra=TAPS)
    check_loss_allowed(None, list(plan.save_grads))
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    args, kwargs = call_arguments(
        inputs, tokenizer, {}, padding_side="right" if encoder_decoder else "left"
    )
    if tokenizer is not None and "pad_token_id" not in generate_kwargs:
        generation_config = getattr(model, "generation_config", None)
        if getattr(generation_config, "pad_token_id", None) is None:
            # The id the batch was padded with; spares HF's warning.
            generate_kwargs["pad_token_id"] = pad_id(tokenizer)
    if validate:
        every_step = Plan.build(
            model,
            tuple(
                dataclasses.replace(iv, step=None)  # type: ignore[type-var]
                for iv in plan.interventions
                if iv.site.partition(":")[0] not in GENERATION_SITES  # no model pass has them
            ),
        )
        fake_pass(model, Pass(every_step, model), args, kwargs, None, forward_pass)
    pass_ = Pass(plan, model, steps=True)
    pass_.padding = padding_of(args, kwargs)
    taps = tapped(plan)
    # Generation records no gradients (HF's `generate` runs under no_grad too).
    with torch.no_grad(), installed(pass_), contextlib.ExitStack() as stack:
        if callable(hf_generate):
            if "logits" in taps:
                stack.enter_context(around_forwards({}, {model: tap_logits}))
            if "samples" in taps:
                generate_kwargs["stopping_criteria"] = _with_samples(model, generate_kwargs)
            length = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
            output = hf_generate(*args, **length, **kwargs, **generate_kwargs)
        else:
            assert max_new_tokens is not None
            output = _loop(model, args, kwargs, max_new_tokens, **generate_kwargs)
    try:
        pass_.check_finished()
    except GenerationEnded as ended:
        ended.record = Record(pass_.record_saved(), output)
        raise
    return Record(pass_.record_saved(), output)


def _with_samples(model: nn.Module, generate_kwargs: dict[str, Any]) -> Any:
    """The stopping criteria of a call, with the ``"samples"`` tap first."""
    from transformers import StoppingCriteriaList

    config = getattr(model, "generation_config", None)
    eos = generate_kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    eos_ids = None if eos is None else torch.atleast_1d(torch.as_tensor(eos))
    num_beams = generate_kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    theirs = generate_kwargs.get("stopping_criteria") or []
    return StoppingCriteriaList([SampleTap(eos_ids, num_beams), *theirs])


@torch.no_grad()
def _loop(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    **unknown: Any,
) -> Tensor:
    """Greedy or sampled decoding for a plain module: each step reruns the whole sequence."""
    extra = [k for k in kwargs if k not in ("input_ids", "attention_mask")]
    if unknown or extra:
        raise PurelensError(_LOOP_KWARGS.format(names=", ".join(map(repr, [*unknown, *extra]))))
    ids = args[0] if args else kwargs["input_ids"]
    if "attention_mask" in kwargs and not bool(kwargs["attention_mask"].all()):
        raise PurelensError(
            "a padded batch needs the model's own `.generate`; the plain loop takes "
            "equal-length rows only."
        )
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        split = primary_output(model(ids))
        if split is None:
            raise PurelensError("the model returned no tensor of logits to decode from.")
        logits = TAPS["logits"](split[0][:, -1]).float()
        if do_sample:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0]
        else:
            token = logits.argmax(-1)
        token = TAPS["samples"](token)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done = done | (token == eos_token_id)
        ids = torch.cat([ids, token[:, None].to(ids.dtype)], dim=-1)
        if eos_token_id is not None and bool(done.all()):
            break
    return ids

"""What a vLLM call gives the engine: its prompts, and sampling parameters per prompt
(the caller's own, copied, or made from HF's generation options)."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor

from .._errors import PurelensError

__all__ = ["HF_OPTIONS", "prompts_of", "sampling_of"]

# HF generation options pl.generate on vLLM turns into sampling parameters (`_from_hf`);
# pad_token_id and use_cache mean nothing there and are accepted for code moved from HF.
HF_OPTIONS = frozenset(
    {
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "min_new_tokens",
        "seed",
        "eos_token_id",
        "num_beams",
        "pad_token_id",
        "use_cache",
    }
)
_BAD_PROMPTS = (
    "`inputs` on vLLM must be a string, a list of strings, or token ids (a list of ints, a "
    "list of such lists, or a tensor of shape [batch, seq] without padding); got {what}."
)
_PER_PROMPT = "`{arg}` has {got} entries, but there are {want} prompts: give one per prompt."
_SEVERAL_SAMPLES = (
    "sampling_params with n={n}: purelens gives one Record per prompt and one sample per "
    "request.\n  Repeat the prompt n times instead (with a seed of its own each, or none)."
)


def prompts_of(inputs: Any, tokenizer: Any) -> tuple[list[dict[str, Any]], bool]:
    """vLLM prompts (``{"prompt": ...}`` or ``{"prompt_token_ids": ...}``), and whether one
    prompt was given alone."""
    if isinstance(inputs, str):
        inputs, single = [inputs], True
    elif isinstance(inputs, Tensor):
        if inputs.ndim == 1:
            inputs, single = [inputs.tolist()], True
        elif inputs.ndim == 2 and not inputs.is_floating_point():
            inputs, single = inputs.tolist(), False
        else:
            raise PurelensError(_BAD_PROMPTS.format(what=f"a tensor of shape {list(inputs.shape)}"))
    elif isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs):
        inputs, single = [inputs], True
    elif isinstance(inputs, list | tuple) and inputs:
        single = False
    else:
        raise PurelensError(_BAD_PROMPTS.format(what=repr(inputs)[:80]))
    prompts: list[dict[str, Any]] = []
    for item in inputs:
        if isinstance(item, str):
            if tokenizer is not None:
                ids = tokenizer(item)["input_ids"]
                prompts.append({"prompt_token_ids": list(ids)})
            else:
                prompts.append({"prompt": item})
        elif isinstance(item, list | tuple) and item and all(isinstance(t, int) for t in item):
            prompts.append({"prompt_token_ids": list(item)})
        else:
            raise PurelensError(_BAD_PROMPTS.format(what=f"an item {item!r:.60}"))
    return prompts, single


def _per_prompt(value: Any, arg: str, count: int) -> list[Any]:
    """`value` for each of `count` prompts: a list of one per prompt, or one for all."""
    if not isinstance(value, list | tuple):
        return [value] * count
    if len(value) != count:
        raise PurelensError(_PER_PROMPT.format(arg=arg, got=len(value), want=count))
    return list(value)


def _from_hf(options: dict[str, Any], max_tokens: Any) -> Any:
    """vLLM sampling parameters for HF generation options (greedy unless ``do_sample``)."""
    import vllm

    if options.get("num_beams", 1) not in (1, None):
        raise PurelensError(
            "num_beams: beam search is not one of vLLM's sampling parameters; purelens runs "
            "greedy or sampled decoding on vLLM."
        )
    sample = bool(options.get("do_sample", False))
    if sample and options.get("temperature") is not None and float(options["temperature"]) <= 0:
        raise PurelensError(
            f"do_sample=True with temperature={options['temperature']!r}: sampling needs a "
            "positive temperature (greedy decoding is do_sample=False)."
        )
    kwargs: dict[str, Any] = {
        "temperature": float(options.get("temperature") or 1.0) if sample else 0.0
    }
    if sample and options.get("top_k") is not None:
        kwargs["top_k"] = int(options["top_k"]) or -1  # HF's 0 is vLLM's -1: no cut
    if sample and options.get("top_p") is not None:
        kwargs["top_p"] = float(options["top_p"])
    if options.get("repetition_penalty") is not None:
        kwargs["repetition_penalty"] = float(options["repetition_penalty"])
    if options.get("min_new_tokens") is not None:
        kwargs["min_tokens"] = int(options["min_new_tokens"])
    if options.get("seed") is not None:
        kwargs["seed"] = int(options["seed"])
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
        kwargs["max_tokens"] = max_tokens  # vLLM checks min_tokens against it
    eos = options.get("eos_token_id")
    if eos is not None:  # instead of the model's, as in HF
        kwargs["stop_token_ids"] = [eos] if isinstance(eos, int) else list(eos)
        kwargs["ignore_eos"] = True
    try:
        return vllm.SamplingParams(**kwargs)
    except Exception as error:  # vLLM's own checks of the values
        raise PurelensError(f"generation options {options!r}: {error}") from None


def sampling_of(
    sampling_params: Any, max_new_tokens: Any, count: int, options: dict[str, Any]
) -> list[Any]:
    """One `SamplingParams` per prompt (copies: the caller's are never changed); from HF's
    generation options (greedy by default) when none are given.

    The copies are shallow: only `max_tokens` and `extra_args` (a new dict) are set on
    them, and vLLM deep-copies every request's parameters as it takes them
    (``InputProcessor``), so nothing of the engine's is shared with the caller's. A deep
    copy here would cost as much again (0.2 ms for 8 prompts here). Parameters with
    ``skip_clone`` are copied deeply: vLLM's own copy of those is shallow, and vLLM adds
    to their sets (the stop tokens).
    """
    import vllm

    if options and sampling_params is not None:
        raise PurelensError(
            f"give `sampling_params` or HF's generation options ({', '.join(options)}), not both."
        )
    lengths = _per_prompt(max_new_tokens, "max_new_tokens", count)
    if sampling_params is None:
        given = [_from_hf(options, length) for length in lengths]
    else:
        given = _per_prompt(sampling_params, "sampling_params", count)
    out = []
    for sp, length in zip(given, lengths, strict=True):
        if not isinstance(sp, vllm.SamplingParams):
            raise PurelensError(
                "`sampling_params` must be a vllm.SamplingParams (or a list of them), "
                f"got {sp!r:.60}."
            )
        if sp.n != 1:
            raise PurelensError(_SEVERAL_SAMPLES.format(n=sp.n))
        if length is not None and (
            not isinstance(length, int) or isinstance(length, bool) or length < 1
        ):
            raise PurelensError(f"`max_new_tokens` must be a positive int, got {length!r}.")
        sp = copy.deepcopy(sp) if sp.skip_clone else copy.copy(sp)
        if length is not None:
            sp.max_tokens = length
        out.append(sp)
    return out

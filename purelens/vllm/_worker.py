"""The worker side: a purelens `Pass` per request, on vLLM's flat batch.

vLLM's engine runs one forward pass per engine step over every scheduled
token of every running request, laid out flat (``[tokens, ...]``; see
`_values`). Each request that purelens sent carries a key in its sampling
parameters' ``extra_args``; the worker finds its interventions by that key
(in the process that sent them, or as `pl.dumps` data across processes) and
gives the request a `Pass` of its own over the vLLM model's plan, with its
own step counter: step 0 is its prompt pass, step k its k-th decode step,
whatever engine step vLLM schedules them at. At a site, each request's
tokens are cut out as ``[1, tokens, ...]`` (the layout of
``pl.generate(hf_model, [prompt])``), handed to its pass, and written back.

The hooks are on the model only during engine steps that have purelens
requests (`Driver.execute_model`, `_step.Step`); each request's state is a
`_request.Live`. `Extension` is mixed into vLLM's worker class by
``worker_extension_cls`` and installs the `Driver` on the worker's model
runner, which `pl.vllm.load` owns.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import PurelensError
from .._hooks import around_forwards
from .._interventions import Intervention, Save, Stop, flatten_interventions
from .._plan import Plan, SitePlan, hookable
from .._serialize import loads
from ._group import check_order, for_prompt
from ._request import Live, Outcome, Spec, check_supported, wire_outcomes
from ._step import _PREEMPTED, Step, keeping_logits

__all__ = ["PENDING", "Extension", "Outcome", "Spec"]

# In-process engines: what a driver in this process registered, by request key.
PENDING: dict[str, Spec] = {}
_pending_lock = threading.Lock()

_BAD_ID = (
    "{what}: site {site!r} holds token ids (or positions) of a table of {size}, and the new "
    "value has {bad}, outside it; vLLM would fail on it for every request in the batch.\n"
    "  Give ids from 0 to {last}."
)
_UNKNOWN_CACHE = (
    "{what}: purelens cannot tell the block dimension of this engine's key-value cache, so "
    "it could not clear the cache blocks this request writes into; a value it makes "
    "non-finite (a NaN, an overflow) would reach the requests that get those blocks next.\n"
    "  Save values only on this engine, or use an attention backend whose cache has one "
    "dimension of the number of blocks."
)
_SHARED = (
    "site {site!r} is a module that vLLM's model uses at {count} places ({paths}), so its "
    "hooks would act at all of them.\n"
    "  Intervene on a module of its own, e.g. the output of {parent!r}."
)


class Driver:
    """purelens on one vLLM model runner: requests admitted by key, hooks per engine step."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.model: nn.Module = runner.get_model() if hasattr(runner, "get_model") else runner.model
        self.extra: dict[str, nn.Module] = {"samples": runner.sampler}
        logits = getattr(self.model, "logits_processor", None)
        if isinstance(logits, nn.Module):
            self.extra["logits"] = logits
        self.live: dict[str, Live] = {}  # vLLM request id -> its pass
        self.request_of: dict[str, str] = {}  # key -> vLLM request id
        self.by_key: dict[str, Live] = {}
        self.plans: dict[tuple[str, Any, bool], Plan] = {}
        self.starts: dict[str, dict[int, int]] = {}  # call -> prompt -> its first engine step
        self.engine_steps = 0
        self.tables = self._id_tables()
        self.shared = self._shared_modules()
        self.caches = _cache_blocks(runner)
        self.dirty: set[str] = set()  # vLLM ids of requests that wrote (see `_scrub`)
        self.step: Step | None = None
        # The last step and its hooks, for the next step if the same requests run in it
        # (most decode steps): let go when a call is collected.
        self.last: tuple[Step, dict[nn.Module, Any], dict[nn.Module, Any]] | None = None
        self.lock = threading.Lock()
        self._execute = runner.execute_model
        self._sample = runner.sample_tokens
        runner.execute_model = self.execute_model
        runner.sample_tokens = self.sample_tokens

    def _id_tables(self) -> dict[int, int]:
        """id(module) -> the size of the table its integer values index: the vocabulary
        for the model's input, the embeddings' inputs and the sampler's tokens."""
        tables: dict[int, int] = {}
        vocab = None
        for module in self.model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Embedding) or (
                "embedding" in type(module).__name__.lower() and isinstance(weight, Tensor)
            ):
                size = int(getattr(module, "num_embeddings", None) or weight.shape[0])  # type: ignore[union-attr]
                tables[id(module)] = size
                vocab = vocab or size
        config = getattr(self.model, "config", None)
        vocab = getattr(config, "vocab_size", None) or vocab
        if vocab:
            tables[id(self.model)] = int(vocab)
            tables[id(self.runner.sampler)] = int(vocab)
        return tables

    def _shared_modules(self) -> dict[int, list[str]]:
        """id(module) -> its paths, for modules the model uses at several places."""
        paths: dict[int, list[str]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            paths.setdefault(id(module), []).append(name)
        return {key: names for key, names in paths.items() if len(names) > 1}

    def check_ids(self, plan: Plan, site: SitePlan, value: Tensor) -> None:
        """Raise if a new value of integer ids indexes outside its table (see `_id_tables`)."""
        size = self.tables.get(id(site.module))
        if size is None or value.is_floating_point() or value.numel() == 0:
            return
        low, high = int(value.min()), int(value.max())
        if low < 0 or high >= size:
            bad = f"{low}" if low < 0 else f"{high}"
            what = ", ".join(repr(iv) for _, iv in plan.entries(site))
            raise PurelensError(
                _BAD_ID.format(what=what, site=site.site, size=size, bad=bad, last=size - 1)
            )

    def plan_for(self, spec: Spec) -> Plan:
        """The plan of a request, shared by the requests of its call with the same list of
        interventions (a plan holds no state; each request's `Pass` does)."""
        nodes, signature = for_prompt(spec)
        key = (spec.group, signature, spec.run)
        plan = self.plans.get(key)
        if plan is None:
            plan = Plan.build(self.model, nodes, extra=self.extra)
            self.check_plan(plan, generating=not spec.run)
            if len(self.plans) >= 4096:  # a bound, for engines that run without end
                self.plans.clear()
            self.plans[key] = plan
        return plan

    def check_plan(self, plan: Plan, *, generating: bool) -> None:
        """Raise for what vLLM's model cannot do (`check_supported`, `check_order`), for
        sites on modules it uses at several places, and for writers on an engine whose
        cache blocks purelens cannot clear (see `_scrub`)."""
        check_supported(plan, generating=generating)
        if self.caches is None:
            writer = next((iv for _, iv in plan.nodes if not _reads_only(iv)), None)
            if writer is not None:
                raise PurelensError(_UNKNOWN_CACHE.format(what=repr(writer)))
        check_order(plan)
        for site in plan.sites:
            paths = self.shared.get(id(site.module))
            if paths:
                parent = site.site.partition(":")[0].rpartition(".")[0] or "''"
                raise PurelensError(
                    _SHARED.format(
                        site=site.site, count=len(paths), paths=", ".join(paths[:4]), parent=parent
                    )
                )

    def admit(self, rid: str, params: Any) -> None:
        extra = getattr(params, "extra_args", None) or {}
        key = extra.get("purelens")
        if not isinstance(key, str):
            return
        if key in self.by_key:  # the same request scheduled anew: vLLM preempted it
            if not self.by_key[key].idle:  # (one with nothing to do may run twice)
                self.by_key[key].fail(PurelensError(_PREEMPTED))
            self.live[rid] = self.by_key[key]
            self.request_of[key] = rid
            return
        spec = _spec(key, extra)
        live = Live(key, spec, self)
        with self.lock:
            self.live[rid] = live
            self.by_key[key] = live
            self.request_of[key] = rid
            if live.writes:
                self.dirty.add(rid)

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        preempted = getattr(scheduler_output, "preempted_req_ids", None) or ()
        for rid in preempted:  # its steps would run again: it fails now (as when it comes
            live = self.live.get(rid)  # back, which a prefix cache hit on all of its tokens,
            if live is not None and not live.idle:  # blocks zeroed below, would not show)
                live.fail(PurelensError(_PREEMPTED))
        if self.dirty:  # before vLLM forgets their blocks, and before anyone reuses them
            for rid in (set(scheduler_output.finished_req_ids) | set(preempted)) & self.dirty:
                self._scrub(rid)
        for new in scheduler_output.scheduled_new_reqs:
            self.admit(new.req_id, new.sampling_params)
        for rid in scheduler_output.finished_req_ids:
            self.live.pop(rid, None)
        lives = self.live
        present = [
            lives[rid]
            for rid in scheduler_output.num_scheduled_tokens
            if rid in lives and not lives[rid].idle
        ]
        self.step = None
        if not any(live.acting for live in present):
            return self._execute(scheduler_output, *args, **kwargs)
        self.engine_steps += 1
        step, pre, post = self.step_of(present)
        self.step = step
        try:
            with around_forwards(pre, post):
                out = self._execute(scheduler_output, *args, **kwargs)
        except BaseException:
            self.step = None  # no sampling follows (see `sample_tokens`)
            raise
        step.finish()
        return out

    def _scrub(self, rid: str) -> None:
        """Zero the key-value cache blocks of request `rid`, which changed values in the
        model, as it leaves them (finished, aborted or preempted).

        vLLM hands freed blocks to the next requests as they are, and its attention
        reads a block's slots beyond a request's tokens too (masked, but a NaN or an
        infinity there still reaches the sum): a value one request made non-finite would
        reach other requests, plain vLLM ones too. Its blocks are its own (a request
        purelens sends has a cache salt of its own: no prefix cache hit shares them).
        """
        self.dirty.discard(rid)
        state = self.runner.requests.get(rid)
        if state is None or self.caches is None:
            return
        for group, cache, dim in self.caches:
            blocks = state.block_ids[group] if group < len(state.block_ids) else ()
            if blocks:
                cache.index_fill_(dim, torch.tensor(list(blocks), device=cache.device), 0)

    def step_of(
        self, present: list[Live]
    ) -> tuple[Step, dict[nn.Module, Any], dict[nn.Module, Any]]:
        """The step of `present` and its pre- and post-hooks: the last step's, again, when
        the same requests run (building them is most of purelens's cost per step)."""
        last = self.last
        if (
            last is not None
            and len(last[0].live) == len(present)
            and all(a is b for a, b in zip(last[0].live, present, strict=True))
        ):
            last[0].again()
            return last
        step = Step(self, present)
        pre, post = step.hooks()
        logits = self.extra.get("logits")
        if logits is not None and any(live.spec.run for live in present):
            previous = post.get(logits)
            running = [live for live in present if live.spec.run]
            post[logits] = step.guarded(keeping_logits(step, previous), running)
        self.last = step, pre, post
        return self.last

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        step, self.step = self.step, None
        if step is None:
            return self._sample(*args, **kwargs)
        sampler = self.runner.sampler
        if step.sampling is None:
            step.sampling = [
                live
                for live in step.live
                if live.pass_ is not None
                and any(s.module is sampler for s in live.pass_.plan.sites)
            ]
        sampling = step.sampling
        if not sampling:
            return self._sample(*args, **kwargs)
        hook = step.guarded(lambda m, a, k, out: step.on_samples(out), sampling)
        with around_forwards({}, {sampler: hook}):
            return self._sample(*args, **kwargs)

    def collect(self, keys: list[str], group: str) -> list[Outcome | None]:
        """The outcomes of `keys`, the requests of call `group` (forgotten here, with the
        call's plans); None for a request that purelens never saw."""
        out: list[Outcome | None] = []
        groups = {group}
        # An idle engine would keep the last step's requests (and all their interventions
        # capture) alive: the next step builds its hooks anew.
        self.last = None
        with self.lock:
            for key in keys:
                live = self.by_key.pop(key, None)
                rid = self.request_of.pop(key, None)
                if rid is not None:
                    self.live.pop(rid, None)
                if live is None:
                    out.append(None)
                    continue
                out.append(live.outcome())
                groups.add(live.spec.group)
            for group in groups - {live.spec.group for live in self.by_key.values()}:
                self.starts.pop(group, None)  # the call is over
                for plan_key in [k for k in self.plans if k[0] == group]:
                    del self.plans[plan_key]
        return out


def _reads_only(iv: Intervention) -> bool:
    """Whether `iv` cannot change a value: a stop, or a save without a function (a save's
    function may change its value in place)."""
    return isinstance(iv, Stop) or (isinstance(iv, Save) and iv.fn is None)


def _cache_blocks(runner: Any) -> list[tuple[int, Tensor, int]] | None:
    """(its KV cache group, the cache, its block dimension) for each attention layer of
    the runner's model; None when a cache's block dimension cannot be told."""
    try:
        config = runner.kv_cache_config
        context = runner.vllm_config.compilation_config.static_forward_context
        groups = [list(group.layer_names) for group in config.kv_cache_groups]
        blocks = int(config.num_blocks)
    except AttributeError:
        return None
    out = []
    for group, names in enumerate(groups):
        for name in names:
            cache = getattr(context.get(name), "kv_cache", None)
            for tensor in cache if isinstance(cache, list | tuple) else [cache]:
                if not isinstance(tensor, Tensor) or tensor.numel() == 0:
                    continue
                # vLLM's logical layout of a layer's cache is [blocks, heads, tokens, ...]
                # (its RFC 42082); an older one may have the blocks further in.
                dims = [d for d, size in enumerate(tensor.shape) if size == blocks]
                if not dims or (dims[0] != 0 and len(dims) > 1):
                    return None
                out.append((group, tensor, dims[0]))
    return out


def _decoded(data: Any) -> tuple[Intervention, ...]:
    return flatten_interventions(loads(bytes(data)))


def _spec(key: str, extra: Mapping[str, Any]) -> Spec:
    with _pending_lock:
        spec = PENDING.pop(key, None)
    if spec is not None:
        return spec
    call = extra.get("purelens_call")
    if not isinstance(call, Mapping):
        return Spec((), 0, 1, key, False)  # the sender is gone: a request of no one's
    return Spec.from_wire(call, _decoded)


class Extension:
    """Mixed into vLLM's worker (``worker_extension_cls``): purelens's calls on the worker."""

    def purelens_install(self) -> tuple[int, str]:
        """Put purelens's driver on the worker's model runner; the worker's process id and
        device type."""
        runner = self.model_runner  # type: ignore[attr-defined]
        if getattr(runner, "purelens_driver", None) is None:
            runner.purelens_driver = Driver(runner)
        return os.getpid(), torch.device(runner.device).type

    def purelens_check(
        self, payload: Any, count: int, run: bool, group: str
    ) -> tuple[str, str] | None:
        """The first error in the plans of a call's prompts, as (kind, message), or None.

        The plans stay for the call's requests to take when they are admitted.
        """
        driver = self.model_runner.purelens_driver  # type: ignore[attr-defined]
        try:
            ivs = payload if isinstance(payload, tuple) else _decoded(payload)
            for index in range(count):
                driver.plan_for(Spec(ivs, index, count, group, run))
        except PurelensError as error:
            return type(error).__name__, str(error)
        return None

    def purelens_collect(self, keys: list[str], encoded: bool, group: str) -> Any:
        """The outcomes of a call's requests: `Outcome`s, or as data when `encoded`."""
        driver = self.model_runner.purelens_driver  # type: ignore[attr-defined]
        outcomes = driver.collect(keys, group)
        return wire_outcomes(outcomes) if encoded else outcomes

    def purelens_describe(self) -> dict[str, Any]:
        """The engine's model: its class, parameter count and sites (module paths)."""
        driver = self.model_runner.purelens_driver  # type: ignore[attr-defined]
        model = driver.model
        config = getattr(model, "config", None)
        return {
            "class": type(model).__name__,
            "model_type": getattr(config, "model_type", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "sites": [name for name, m in model.named_modules() if hookable(m)]
            + sorted(driver.extra),
        }

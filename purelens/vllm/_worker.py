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
requests (`Driver.execute_model`); `Extension` is mixed into vLLM's worker
class by ``worker_extension_cls`` and installs the `Driver` on the worker's
model runner, which `pl.vllm.load` owns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn

from .. import ops
from .._budget import bounded
from .._errors import PurelensError
from .._hooks import around_forwards
from .._interventions import Intervention, describe, flatten_interventions
from .._limits import Timeout
from .._pass import Pass, StopPass
from .._plan import Plan, SitePlan
from .._record import Record
from .._serialize import loads
from .._wire import encode_record
from ._group import ARRIVALS, check_order, for_prompt
from ._values import input_value, keeps_residual, output_value, with_residual

__all__ = ["PENDING", "Extension", "Outcome", "Spec"]

# In-process engines: what a driver in this process registered, by request key.
PENDING: dict[str, Spec] = {}
_pending_lock = threading.Lock()

_INSIDE = (
    "site {site!r}: attention ports and op sites are not supported on vLLM yet (its "
    "attention runs in fused kernels over a paged cache).\n"
    "  Use them with pl.run or pl.generate on the HF model; on vLLM, intervene on "
    "module outputs and inputs."
)
_GRADS = (
    "{what}: vLLM runs without autograd (torch.inference_mode), so there is no gradient "
    "to save or patch.\n  Use pl.run(hf_model, ..., loss=...) for gradients."
)
_CHUNKED = (
    "vLLM scheduled {got} of the request's {want} prompt tokens in one step (chunked "
    "prefill), so its prompt pass would be several steps.\n"
    "  Load the engine without chunked prefill (pl.vllm.load's default: leave out "
    "enable_chunked_prefill=True)."
)
_PREEMPTED = (
    "vLLM preempted the request and recomputed its tokens (or took its prefix from the "
    "cache), so its steps would run twice.\n"
    "  Give the engine more KV-cache memory (gpu_memory_utilization, kv_cache_memory_bytes) "
    "or fewer requests at a time (max_num_seqs)."
)
_SKIP_RESULT = (
    "{what} gave {got}, but the module's output there is {want}.\n"
    "  A skip's function must give a tensor of the output's shape and dtype."
)
_BAD_ID = (
    "{what}: site {site!r} holds token ids (or positions) of a table of {size}, and the new "
    "value has {bad}, outside it; vLLM would fail on it for every request in the batch.\n"
    "  Give ids from 0 to {last}."
)
_SHARED = (
    "site {site!r} is a module that vLLM's model uses at {count} places ({paths}), so its "
    "hooks would act at all of them.\n"
    "  Intervene on a module of its own, e.g. the output of {parent!r}."
)
_NOT_TOKENS = (
    "site {site!r}: its value has {got} rows, fewer than the {want} tokens of this step, "
    "so it is not laid out one row per token and cannot be cut per request."
)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What purelens asks of one request: its call's interventions, and which prompt it is."""

    interventions: tuple[Intervention, ...]
    index: int  # the prompt's place in its call (`batch=` counts these)
    count: int  # how many prompts the call has
    group: str  # the call
    run: bool  # pl.run: one pass, whose logits are the output
    seconds: float | None = None  # a server's limits: the time the call had left when sent,
    saved_bytes: int | None = None  # and the bytes this request may save,
    elements: int | None = None  # and the elements an ops expression may make


@dataclasses.dataclass
class Outcome:
    """What one request left: its saved values, or an error.

    ``record`` is a `Record` whose output is pl.run's next-token logits (None
    for pl.generate), or its bytes (`_wire.encode_record`) across processes,
    where an `Outcome` travels as a dict of plain values.
    """

    record: Record | bytes
    error: str | None = None
    kind: str | None = None  # the error's: "GenerationEnded", "SavedBytesError", "Timeout", ...
    stopped: bool = False  # pl.run: a pl.stop ended its pass


class _Live:
    """One request while it runs: its pass, and where its tokens are in this step."""

    def __init__(self, key: str, spec: Spec, driver: Driver) -> None:
        self.key = key
        self.spec = spec
        self.error: str | None = None
        self.kind: str | None = None
        self.deadline = None if spec.seconds is None else time.monotonic() + spec.seconds
        self.budget = None if spec.saved_bytes is None else [spec.saved_bytes, spec.saved_bytes]
        self.stopped = False
        self.steps = 0  # steps run so far
        self.tokens = 0  # tokens computed so far
        self.prompt = 0
        self.start = self.end = self.row = 0
        self.logits: Tensor | None = None
        self.started_at: int | None = None  # the engine step of its prompt pass
        try:
            plan = driver.plan_for(spec)
            self.pass_: Pass | None = Pass(plan, driver.model, steps=not spec.run)
        except PurelensError as error:
            self.pass_ = None
            self.error = str(error)
            self.kind = type(error).__name__

    @property
    def acting(self) -> bool:
        return self.pass_ is not None and self.error is None and not self.stopped

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.kind = type(error).__name__
            self.error = str(error) or self.kind

    def check(self) -> None:
        """Raise `Timeout` once a server's deadline for this request has passed."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Timeout

    @contextlib.contextmanager
    def bounded(self) -> Iterator[None]:
        """This request's limits (a server's), while its interventions run."""
        if self.deadline is None and self.budget is None and self.spec.elements is None:
            yield
            return
        with contextlib.ExitStack() as stack:
            if self.spec.elements is not None:
                stack.enter_context(ops.limit_elements(self.spec.elements))
            stack.enter_context(bounded(self.check, self.budget))
            yield

    def outcome(self, encoded: bool) -> Outcome:
        if self.error is None and self.pass_ is not None:
            try:
                self.pass_.check_finished()
            except PurelensError as error:
                self.fail(error)
        saved = self.pass_.record_saved() if self.pass_ is not None else {}
        record = Record(saved, self.logits)
        kept: Record | bytes = encode_record(record) if encoded else record
        return Outcome(kept, self.error, self.kind, self.stopped)


def _check_supported(plan: Plan) -> None:
    from .._grads import PatchGrad, SaveGrad

    for site in plan.sites:
        if site.inside:
            raise PurelensError(_INSIDE.format(site=site.site))
    for iv in plan.interventions:
        if isinstance(iv, SaveGrad | PatchGrad):
            raise PurelensError(_GRADS.format(what=repr(iv)))


class _Step:
    """One engine step with purelens requests: who is where in the flat batch."""

    def __init__(self, driver: Driver, live: list[_Live]) -> None:
        self.driver = driver
        self.live = live
        self.laid_out = False
        self.total = 0

    def lay_out(self) -> None:
        """Find each request's tokens (called once the runner has prepared the batch)."""
        if self.laid_out:
            return
        self.laid_out = True
        runner = self.driver.runner
        batch = runner.input_batch
        n = batch.num_reqs
        order = {rid: i for i, rid in enumerate(batch.req_ids[:n])}
        starts = runner.query_start_loc.np[: n + 1]
        self.total = int(starts[n])
        for live in self.live:
            rid = self.driver.request_of[live.key]
            i = order[rid]
            live.row, live.start, live.end = i, int(starts[i]), int(starts[i + 1])
            computed = int(batch.num_computed_tokens_cpu[i])
            state = runner.requests[rid]
            try:
                self._check_tokens(live, computed, live.end - live.start, state)
            except PurelensError as error:
                live.fail(error)
                continue
            if live.steps == 1:  # its prompt pass: when the call's prompts started
                self.driver.starts.setdefault(live.spec.group, {})[live.spec.index] = (
                    self.driver.engine_steps
                )
            if live.pass_ is not None:
                live.pass_.begin_step()

    @staticmethod
    def _check_tokens(live: _Live, computed: int, scheduled: int, state: Any) -> None:
        if live.steps == 0:
            live.prompt = state.num_prompt_tokens
            if computed != 0:
                raise PurelensError(_PREEMPTED)
            if scheduled != live.prompt:
                raise PurelensError(_CHUNKED.format(got=scheduled, want=live.prompt))
        elif computed != live.tokens or scheduled != 1:
            raise PurelensError(_PREEMPTED)
        live.steps += 1
        live.tokens = computed + scheduled

    # --- the hooks ------------------------------------------------------------

    def hooks(self) -> tuple[dict[nn.Module, Any], dict[nn.Module, Any]]:
        """The pre- and post-forward hooks of this step's sites, by module."""
        outputs: dict[int, list[tuple[_Live, SitePlan]]] = {}
        inputs: dict[int, list[tuple[_Live, SitePlan]]] = {}
        skips: dict[int, list[_Live]] = {}
        modules: dict[int, nn.Module] = {}
        for live in self.live:
            if not live.acting:
                continue
            assert live.pass_ is not None
            plan = live.pass_.plan
            for site in plan.sites:
                modules[id(site.module)] = site.module
                table = inputs if site.port == "input" else outputs
                table.setdefault(id(site.module), []).append((live, site))
            for module in plan.skip_modules:
                modules[id(module)] = module
                skips.setdefault(id(module), []).append(live)
        pre: dict[nn.Module, Any] = {}
        post: dict[nn.Module, Any] = {}
        root = self.driver.model
        pre[root] = self._guarded(self._root_hook, self.live)
        for key, module in modules.items():
            ins, outs, skipping = inputs.get(key, []), outputs.get(key, []), skips.get(key, [])
            mine = [live for live, _ in ins + outs] + skipping
            if ins or skipping:
                previous = pre.get(module)
                pre[module] = self._guarded(self._pre_hook(ins, skipping, previous), mine)
            if outs or skipping or ins:  # inputs: a norm's sum
                post[module] = self._guarded(self._post_hook(outs, skipping), mine)
        return pre, post

    def _guarded(self, hook: Any, lives: list[_Live]) -> Any:
        """`hook`, failing the requests it acts for (`lives`) instead of raising into vLLM's
        engine, whose other requests must go on; the value is then left as the model
        computed it. (Each request's own interventions fail it alone, in `_apply`.)"""

        def guarded(*args: Any) -> Any:
            try:
                return hook(*args)
            except Exception as error:  # a failure of the site itself, for all who use it
                for live in lives:
                    live.fail(error)
                return None

        return guarded

    def _root_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.lay_out()

    def _pre_hook(
        self, entries: list[tuple[_Live, SitePlan]], skipping: list[_Live], previous: Any
    ) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if previous is not None:
                previous(module, args, kwargs)
            self.lay_out()
            if skipping:  # what the skipped requests' rows get instead of the output
                value = self._value(input_value(module, args, kwargs, "skip"), "skip")
                self.driver.skip_inputs[id(module)] = value[0]
            if not entries:
                return None
            found = input_value(module, args, kwargs, entries[0][1].site)
            new = self._apply(entries, found, tokens=True)
            if new is not None and found is not None and keeps_residual(module, args, kwargs):
                self.driver.residuals[id(module)] = found[0]  # the sum it must pass on
            return new

        return hook

    def _post_hook(self, entries: list[tuple[_Live, SitePlan]], skipping: list[_Live]) -> Any:
        driver = self.driver
        rows = bool(entries) and entries[0][1].module is driver.extra.get("logits")

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            self.lay_out()
            residual = driver.residuals.pop(id(module), None)
            if residual is not None:
                output = with_residual(output, residual)
            if not entries and not skipping:
                return None if residual is None else output
            found = output_value(module, output, entries[0][1].site if entries else "skip")
            if skipping:
                found = self._skipped(module, skipping, found)
            new = self._apply(entries, found, tokens=not rows) if entries else None
            if new is not None:
                return new
            if skipping and found is not None:
                return found[1](found[0])
            return None if residual is None else output

        return hook

    def _value(self, found: Any, site: str) -> tuple[Tensor, Any]:
        if found is None:
            raise PurelensError(f"site {site!r}: the module's value holds no tensor.")
        value = found[0]
        if value.ndim == 0 or value.shape[0] < self.total:
            raise PurelensError(_NOT_TOKENS.format(site=site, got=value.shape[0], want=self.total))
        return found

    def _skipped(self, module: nn.Module, skipping: list[_Live], found: Any) -> Any:
        """The output with the skipping requests' rows replaced by what their skips give."""
        value, rebuild = self._value(found, "skip")
        inputs = self.driver.skip_inputs.pop(id(module))
        new = value.clone()
        for live in skipping:
            if not live.acting:
                continue
            assert live.pass_ is not None
            piece = inputs[live.start : live.end].unsqueeze(0)
            try:
                with live.bounded():
                    skipped, out = live.pass_.on_skip(module, (piece,), {})
                if skipped:
                    want = value[live.start : live.end].unsqueeze(0)
                    if not isinstance(out, Tensor) or (out.shape, out.dtype) != (
                        want.shape,
                        want.dtype,
                    ):
                        got = describe(out) if isinstance(out, Tensor) else type(out).__name__
                        raise PurelensError(
                            _SKIP_RESULT.format(
                                what=repr(live.pass_.plan.skips[id(module)][1]),
                                got=got,
                                want=describe(want),
                            )
                        )
                    new[live.start : live.end] = out[0]
            except Exception as error:  # the request's own: it fails alone
                live.fail(error)
        return new, rebuild

    def _apply(self, entries: list[tuple[_Live, SitePlan]], found: Any, *, tokens: bool) -> Any:
        """Hand each request its piece of the value; the new value (rebuilt), or None."""
        site_name = entries[0][1].site
        if tokens:
            value, rebuild = self._value(found, site_name)
        else:
            if found is None:
                raise PurelensError(f"site {site_name!r}: the module's value holds no tensor.")
            value, rebuild = found
        pieces = {id(live): self._piece(live, value, tokens) for live, _ in entries if live.acting}
        arrivals: dict[str, dict[int, tuple[int, Tensor]]] = {}
        for live, _ in entries:
            if id(live) in pieces and live.pass_ is not None:
                group = arrivals.setdefault(live.spec.group, {})
                group[live.spec.index] = (live.pass_.step, pieces[id(live)])
        new: Tensor | None = None
        for live, site in entries:
            piece = pieces.get(id(live))
            if piece is None or not live.acting:
                continue
            assert live.pass_ is not None
            call = live.spec.group
            token = ARRIVALS.set(
                (
                    live.spec.index,
                    live.pass_.step,
                    arrivals.get(call, {}),
                    self.driver.starts.get(call, {}),
                )
            )
            try:
                with live.bounded():
                    out = live.pass_.on_output(site, piece)
                if out is not None:
                    self.driver.check_ids(site, out)
            except StopPass:
                live.stopped = True
                continue
            except Exception as error:  # the request's own: it fails alone
                live.fail(error)
                continue
            finally:
                ARRIVALS.reset(token)
            if out is None:
                continue
            if new is None:
                new = value.clone()
            self._put(live, new, out, tokens)
        return None if new is None else rebuild(new)

    @staticmethod
    def _piece(live: _Live, value: Tensor, tokens: bool) -> Tensor:
        """A request's part of a value. vLLM reuses its buffers (the input ids) in place at
        the next step, which must not reach a record: a piece of a tensor made outside
        inference mode is a copy (inference tensors are copied when saved, see `Pass`)."""
        piece = (
            value[live.start : live.end].unsqueeze(0) if tokens else value[live.row : live.row + 1]
        )
        return piece if piece.is_inference() else piece.clone()

    @staticmethod
    def _put(live: _Live, new: Tensor, out: Tensor, tokens: bool) -> None:
        if tokens:
            new[live.start : live.end] = out[0]
        else:
            new[live.row : live.row + 1] = out

    # --- samples ---------------------------------------------------------------

    def on_samples(self, output: Any) -> Any:
        """The sampler's output with each request's ``"samples"`` interventions applied."""
        sampler = self.driver.runner.sampler
        entries = [
            (live, site)
            for live in self.live
            if live.acting and live.pass_ is not None
            for site in live.pass_.plan.sites
            if site.module is sampler
        ]
        ids = output.sampled_token_ids
        if not entries:
            return output
        found = (ids[:, 0].long(), lambda v: v)
        new = self._apply(entries, found, tokens=False)
        if new is None:
            return output
        return dataclasses.replace(output, sampled_token_ids=new[:, None].to(ids.dtype))

    def keep_logits(self, logits: Tensor) -> None:
        """pl.run's output: each such request's next-token logits of its prompt pass."""
        for live in self.live:
            if live.spec.run and live.steps == 1 and live.logits is None:
                live.logits = logits[live.row : live.row + 1].clone()


class Driver:
    """purelens on one vLLM model runner: requests admitted by key, hooks per engine step."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.model: nn.Module = runner.get_model() if hasattr(runner, "get_model") else runner.model
        self.extra: dict[str, nn.Module] = {"samples": runner.sampler}
        logits = getattr(self.model, "logits_processor", None)
        if isinstance(logits, nn.Module):
            self.extra["logits"] = logits
        self.live: dict[str, _Live] = {}  # vLLM request id -> its pass
        self.request_of: dict[str, str] = {}  # key -> vLLM request id
        self.by_key: dict[str, _Live] = {}
        self.skip_inputs: dict[int, Tensor] = {}
        self.plans: dict[tuple[str, Any], Plan] = {}
        self.starts: dict[str, dict[int, int]] = {}  # call -> prompt -> its first engine step
        self.engine_steps = 0
        self.tables = self._id_tables()
        self.shared = self._shared_modules()
        self.residuals: dict[int, Tensor] = {}  # id(norm) -> the sum it must pass on
        self.step: _Step | None = None
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

    def check_ids(self, site: SitePlan, value: Tensor) -> None:
        """Raise if a new value of integer ids indexes outside its table (see `_id_tables`)."""
        size = self.tables.get(id(site.module))
        if size is None or value.is_floating_point() or value.numel() == 0:
            return
        low, high = int(value.min()), int(value.max())
        if low < 0 or high >= size:
            bad = f"{low}" if low < 0 else f"{high}"
            what = ", ".join(repr(iv) for _, iv in site.entries)
            raise PurelensError(
                _BAD_ID.format(what=what, site=site.site, size=size, bad=bad, last=size - 1)
            )

    def plan_for(self, spec: Spec) -> Plan:
        """The plan of a request, shared by the requests of its call with the same list of
        interventions (a plan holds no state; each request's `Pass` does)."""
        nodes, signature = for_prompt(spec)
        key = (spec.group, signature)
        plan = self.plans.get(key)
        if plan is None:
            plan = Plan.build(self.model, nodes, extra=self.extra)
            self.check_plan(plan)
            if len(self.plans) >= 4096:  # a bound, for engines that run without end
                self.plans.clear()
            self.plans[key] = plan
        return plan

    def check_plan(self, plan: Plan) -> None:
        """Raise for what vLLM's model cannot do (`_check_supported`, `check_order`) and for
        sites on modules it uses at several places."""
        _check_supported(plan)
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
            self.by_key[key].fail(PurelensError(_PREEMPTED))
            self.live[rid] = self.by_key[key]
            self.request_of[key] = rid
            return
        spec = _spec(key, extra)
        live = _Live(key, spec, self)
        with self.lock:
            self.live[rid] = live
            self.by_key[key] = live
            self.request_of[key] = rid

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        for new in scheduler_output.scheduled_new_reqs:
            self.admit(new.req_id, new.sampling_params)
        for rid in scheduler_output.finished_req_ids:
            self.live.pop(rid, None)
        present = [
            self.live[rid] for rid in scheduler_output.num_scheduled_tokens if rid in self.live
        ]
        self.step = None
        if not any(live.acting for live in present):
            return self._execute(scheduler_output, *args, **kwargs)
        self.engine_steps += 1
        step = self.step = _Step(self, present)
        pre, post = step.hooks()
        logits = self.extra.get("logits")
        if logits is not None and any(live.spec.run for live in present):
            previous = post.get(logits)
            post[logits] = _keeping_logits(step, previous)
        with around_forwards(pre, post):
            return self._execute(scheduler_output, *args, **kwargs)

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        step = self.step
        sampler = self.runner.sampler
        sampling = [
            live
            for live in (step.live if step is not None else [])
            if live.pass_ is not None and any(s.module is sampler for s in live.pass_.plan.sites)
        ]
        if step is None or not sampling:
            return self._sample(*args, **kwargs)
        hook = step._guarded(lambda m, a, k, out: step.on_samples(out), sampling)
        with around_forwards({}, {sampler: hook}):
            return self._sample(*args, **kwargs)

    def collect(self, keys: list[str], encoded: bool) -> list[Any]:
        """The outcomes of `keys` (forgotten here): `Outcome`s, or dicts when `encoded`."""
        out: list[Any] = []
        groups: set[str] = set()
        with self.lock:
            for key in keys:
                live = self.by_key.pop(key, None)
                rid = self.request_of.pop(key, None)
                if rid is not None:
                    self.live.pop(rid, None)
                if live is None:
                    out.append(None)
                    continue
                outcome = live.outcome(encoded)
                out.append(dataclasses.asdict(outcome) if encoded else outcome)
                groups.add(live.spec.group)
            for group in groups - {live.spec.group for live in self.by_key.values()}:
                self.starts.pop(group, None)  # the call is over
                for plan_key in [k for k in self.plans if k[0] == group]:
                    del self.plans[plan_key]
        return out


def _keeping_logits(step: _Step, previous: Any) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        new = previous(module, args, kwargs, output) if previous is not None else None
        step.keep_logits(output if new is None else new)
        return new

    return hook


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
    seconds, saved_bytes, elements = (call.get(k) for k in ("seconds", "saved_bytes", "elements"))
    return Spec(
        _decoded(call["data"]),
        int(call["index"]),
        int(call["count"]),
        str(call["group"]),
        bool(call["run"]),
        None if seconds is None else float(seconds),
        None if saved_bytes is None else int(saved_bytes),
        None if elements is None else int(elements),
    )


class Extension:
    """Mixed into vLLM's worker (``worker_extension_cls``): purelens's calls on the worker."""

    def purelens_install(self) -> int:
        """Put purelens's driver on the worker's model runner; the worker's process id."""
        runner = self.model_runner  # type: ignore[attr-defined]
        if getattr(runner, "purelens_driver", None) is None:
            runner.purelens_driver = Driver(runner)
        return os.getpid()

    def purelens_check(self, payload: Any, count: int, run: bool) -> tuple[str, str] | None:
        """The first error in the plans of a call's prompts, as (kind, message), or None."""
        driver = self.model_runner.purelens_driver  # type: ignore[attr-defined]
        try:
            ivs = payload if isinstance(payload, tuple) else _decoded(payload)
            seen: set[Any] = set()
            for index in range(count):  # one plan per different list of interventions
                nodes, signature = for_prompt(Spec(ivs, index, count, "check", run))
                if signature not in seen:
                    seen.add(signature)
                    driver.check_plan(Plan.build(driver.model, nodes, extra=driver.extra))
        except PurelensError as error:
            return type(error).__name__, str(error)
        return None

    def purelens_collect(self, keys: list[str], encoded: bool = True) -> list[Any]:
        return self.model_runner.purelens_driver.collect(keys, encoded)  # type: ignore[attr-defined]

    def purelens_describe(self) -> dict[str, Any]:
        """The engine's model: its class, parameter count and sites (module paths)."""
        driver = self.model_runner.purelens_driver  # type: ignore[attr-defined]
        model = driver.model
        config = getattr(model, "config", None)
        return {
            "class": type(model).__name__,
            "model_type": getattr(config, "model_type", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "sites": [name for name, m in model.named_modules() if _callable(m)]
            + sorted(driver.extra),
        }


def _callable(module: nn.Module) -> bool:
    """Whether hooks on `module` can see a value (containers are never called)."""
    return not (type(module).forward is nn.Module.forward and bool(module._modules))

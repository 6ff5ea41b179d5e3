"""One engine step with purelens requests: each request's tokens in vLLM's flat batch,
and the hooks that hand them to the request's pass and write them back.

A module inside vLLM's model sees ``[tokens, ...]`` for every scheduled token
of every running request, one after another (`query_start_loc`); the logits
processor and the sampler see one row per request. Each request's part is
handed to its own `Pass` as ``[1, tokens, ...]`` (rows: ``[1, ...]``), the
layout of ``pl.generate(hf_model, [prompt])``. A failure of a request's own
interventions fails that request alone; the engine and the others go on.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .._errors import PurelensError
from .._interventions import describe
from .._pass import StopPass
from .._plan import SitePlan
from ._group import ARRIVALS
from ._request import Live
from ._values import input_value, keeps_residual, output_value, with_residual

if TYPE_CHECKING:  # the driver imports this module
    from ._worker import Driver

__all__ = ["Step", "keeping_logits"]

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

_NOT_TOKENS = (
    "site {site!r}: its value has {got} rows, fewer than the {want} tokens of this step, "
    "so it is not laid out one row per token and cannot be cut per request."
)


class Step:
    """One engine step with purelens requests: who is where in the flat batch."""

    def __init__(self, driver: Driver, live: list[Live]) -> None:
        self.driver = driver
        self.live = live
        self.laid_out = False
        self.total = 0
        # Between a module's pre- and post-hook, for the requests that skip it and for a
        # norm whose input was patched:
        self.skip_inputs: dict[int, Tensor] = {}  # id(module) -> its input
        self.residuals: dict[int, Tensor] = {}  # id(norm) -> the sum it must pass on
        self.sampling: list[Live] | None = None  # the requests with a site at the sampler

    def again(self) -> None:
        """Ready for the next engine step of the same requests: its hooks (`hooks`) are
        this step's, laid out anew. (A request that failed or stopped meanwhile is passed
        over by every hook, as `acting` says.)"""
        self.laid_out = False
        self.total = 0
        self.skip_inputs.clear()
        self.residuals.clear()

    def lay_out(self) -> None:
        """Find each request's tokens, and count its step: at the first hook of the step
        that fires (the runner has prepared the batch by then), or after the model ran
        (`finish`)."""
        if self.laid_out:
            return
        self.laid_out = True
        driver = self.driver
        runner = driver.runner
        batch = runner.input_batch
        n = batch.num_reqs
        index = batch.req_id_to_index  # (vLLM keeps it as it reorders the batch)
        starts = runner.query_start_loc.np[: n + 1].tolist()  # (Python ints: cheaper to read)
        computed = batch.num_computed_tokens_cpu[:n].tolist()
        self.total = starts[n]
        request_of = driver.request_of
        for live in self.live:
            rid = request_of[live.key]
            i = index[rid]
            start, end = starts[i], starts[i + 1]
            live.row, live.start, live.end = i, start, end
            steps = live.steps
            if steps == 0:
                live.prompt = runner.requests[rid].num_prompt_tokens
                if computed[i] != 0:
                    live.fail(PurelensError(_PREEMPTED))
                    continue
                if end - start != live.prompt:
                    live.fail(PurelensError(_CHUNKED.format(got=end - start, want=live.prompt)))
                    continue
                # its prompt pass: when the call's prompts started
                driver.starts.setdefault(live.spec.group, {})[live.spec.index] = driver.engine_steps
            elif computed[i] != live.tokens or end - start != 1:
                live.fail(PurelensError(_PREEMPTED))
                continue
            live.steps = steps + 1
            live.tokens = computed[i] + end - start
            if live.pass_ is not None:
                live.pass_.begin_step()

    # --- the hooks ------------------------------------------------------------

    def hooks(self) -> tuple[dict[nn.Module, Any], dict[nn.Module, Any]]:
        """The pre- and post-forward hooks of this step's sites, by module."""
        outputs: dict[int, list[tuple[Live, SitePlan]]] = {}
        inputs: dict[int, list[tuple[Live, SitePlan]]] = {}
        skips: dict[int, list[Live]] = {}
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
        for key, module in modules.items():
            ins, outs, skipping = inputs.get(key, []), outputs.get(key, []), skips.get(key, [])
            mine = [live for live, _ in ins + outs] + skipping
            if ins or skipping:
                pre[module] = self.guarded(self._pre_hook(ins, skipping), mine)
            if outs or skipping or ins:  # inputs: a norm's sum
                post[module] = self.guarded(self._post_hook(outs, skipping), mine)
        return pre, post

    def guarded(self, hook: Any, lives: list[Live]) -> Any:
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

    def finish(self) -> None:
        """After the model ran: a step in which no hook of a request's fired counts too."""
        try:
            self.lay_out()
        except Exception as error:  # the layout itself failed: so did the step's requests
            for live in self.live:
                live.fail(error)

    def _pre_hook(self, entries: list[tuple[Live, SitePlan]], skipping: list[Live]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            self.lay_out()
            new = None
            if entries:
                found = input_value(module, args, kwargs, entries[0][1].site)
                new = self._apply(entries, found, tokens=True)
                if new is not None and found is not None and keeps_residual(module, args, kwargs):
                    self.residuals[id(module)] = found[0]  # the sum it must pass on
            if skipping:  # what the skipped requests' rows get: the input as writers left it
                given, named = (args, kwargs) if new is None else new
                value = self._value(input_value(module, given, named, "skip"), "skip")
                self.skip_inputs[id(module)] = value[0]
            return new

        return hook

    def _post_hook(self, entries: list[tuple[Live, SitePlan]], skipping: list[Live]) -> Any:
        driver = self.driver
        rows = bool(entries) and entries[0][1].module is driver.extra.get("logits")

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            self.lay_out()
            residual = self.residuals.pop(id(module), None)
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

    def _skipped(self, module: nn.Module, skipping: list[Live], found: Any) -> Any:
        """The output with the skipping requests' rows replaced by what their skips give."""
        value, rebuild = self._value(found, "skip")
        inputs = self.skip_inputs.pop(id(module))
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
                                what=repr(live.pass_.plan.skip(module)[1]),  # type: ignore[index]
                                got=got,
                                want=describe(want),
                            )
                        )
                    new[live.start : live.end] = out[0]
            except Exception as error:  # the request's own: it fails alone
                live.fail(error)
        return new, rebuild

    def _apply(self, entries: list[tuple[Live, SitePlan]], found: Any, *, tokens: bool) -> Any:
        """Hand each request its piece of the value; the new value (rebuilt), or None."""
        site_name = entries[0][1].site
        if tokens:
            value, rebuild = self._value(found, site_name)
        else:
            if found is None:
                raise PurelensError(f"site {site_name!r}: the module's value holds no tensor.")
            value, rebuild = found
        pieces = _Pieces(value, tokens)
        across: dict[str, dict[int, tuple[int, Tensor]]] | None = None
        if any(live.across for live, _ in entries):  # values other prompts of a call read
            across = {}
            for live, _ in entries:
                if live.pass_ is not None and live.acting:
                    group = across.setdefault(live.spec.group, {})
                    group[live.spec.index] = (live.pass_.step, pieces.of(live))
        new: Tensor | None = None
        for live, site in entries:
            pass_ = live.pass_
            if pass_ is None or live.error is not None or live.stopped:  # (`acting`, inlined)
                continue
            token = None
            if across is None:
                piece = pieces.of(live)
            else:
                call = live.spec.group
                piece = across[call][live.spec.index][1]
                token = ARRIVALS.set(
                    (live.spec.index, pass_.step, across[call], self.driver.starts.get(call, {}))
                )
            try:
                if live.unbounded:
                    out = pass_.on_value(site, piece)
                else:
                    with live.bounded():
                        out = pass_.on_value(site, piece)
                if out is None and not site.only_saves:
                    # A writer may have changed its piece in place, which on HF changes the
                    # model's value; here the piece may be a copy, or part of a sum the
                    # model never sees (a fused residual): it goes back as the new value.
                    out = piece
                if out is not None:
                    self.driver.check_ids(pass_.plan, site, out)
            except StopPass:
                live.stopped = True
                continue
            except Exception as error:  # the request's own: it fails alone
                live.fail(error)
                continue
            finally:
                if token is not None:
                    ARRIVALS.reset(token)
            if out is None:
                continue
            if new is None:
                new = value.clone()
            self._put(live, new, out, tokens)
        return None if new is None else rebuild(new)

    @staticmethod
    def _put(live: Live, new: Tensor, out: Tensor, tokens: bool) -> None:
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
        self.lay_out()
        for live in self.live:
            if live.spec.run and live.steps == 1 and live.logits is None:
                live.logits = logits[live.row : live.row + 1].clone()


class _Pieces:
    """The requests' parts of one value: ``[1, tokens, ...]`` (`tokens`) or a row.

    vLLM reuses its buffers (the input ids) in place at the next step, which must
    not reach a record: a part of a tensor made outside inference mode is a copy
    (inference tensors are copied when saved, see `Pass`). Each part is one view
    of the value made ``[1, ...]`` once (a torch op costs a few us here).
    """

    __slots__ = ("copy", "laid", "tokens")

    def __init__(self, value: Tensor, tokens: bool) -> None:
        self.tokens = tokens
        self.laid = value.unsqueeze(0) if tokens else value
        self.copy = not value.is_inference()

    def of(self, live: Live) -> Tensor:
        if self.tokens:
            piece = self.laid[:, live.start : live.end]
        else:
            piece = self.laid[live.row : live.row + 1]
        return piece.clone() if self.copy else piece


def keeping_logits(step: Step, previous: Any) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        new = previous(module, args, kwargs, output) if previous is not None else None
        step.keep_logits(output if new is None else new)
        return new

    return hook

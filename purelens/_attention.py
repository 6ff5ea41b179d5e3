"""Attention ports: q, k, v, scores, pattern and z inside an attention module's forward.

There are two ways in, chosen per module:

* **HF attention modules**, which look their attention function up in
  transformers' ``ALL_ATTENTION_FUNCTIONS`` by ``config._attn_implementation``
  on every call (most models of transformers). For the length of a run that
  names a port on such a module, its config selects a function of purelens,
  registered once under ``"purelens_sdpa"`` or ``"purelens_eager"`` (after the
  implementation the config had, whose mask function it keeps). A module that
  no active pass taps goes straight to that implementation, so the switch
  changes no value, also in other threads' runs. A tapped module hands q, k, v
  (after rotary embeddings) and its result z to the passes, and when scores
  or the pattern are tapped runs the model's *own* eager attention function
  (with the mask made additive, as eager attention has it), catching its one
  softmax: the scores are the softmax's input and the pattern its output.
  Whatever the model's eager attention computes (scaling, soft-capping,
  masks) is then what the ports hold; what does not fit the ports' layout
  (attention sinks) is refused.
* **Any other module that calls ``F.scaled_dot_product_attention``**
  (nanoGPT-style code): a torch function mode, active in that module's own
  forward only (see `_hooks`), replaces the call with the same attention in
  explicit steps, with the taps in between.

Layouts (see `_layout`): q, k, v and z are ``(batch, pos, heads, d_head)``
(k and v with the model's key/value heads), scores and pattern ``(batch,
heads, q_pos, k_pos)``.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._errors import PurelensError
from ._pass import ACTIVE, Pass
from ._plan import SitePlan

__all__ = ["SdpaTaps", "has_attention", "switched", "uses_interface"]

Taps = list[tuple[Pass, Mapping[str, SitePlan]]]

_IMPLEMENTATION = (
    "site {site!r}: {kind} computes attention with {impl!r}, and attention ports need the "
    "'eager' or 'sdpa' implementation (whose math purelens reproduces step by step).\n"
    "  Load the model with attn_implementation='sdpa' (or 'eager') to use its attention ports."
)
_UPCAST = (
    "site {site!r}: {kind} uses GPT-2's reorder_and_upcast_attn path under eager attention, "
    "which the attention ports do not reproduce.\n"
    "  Load the model with reorder_and_upcast_attn=False, or with attn_implementation='sdpa'."
)
_NO_EAGER = (
    "{kind} has no eager attention function (eager_attention_forward) beside its forward, "
    "which purelens runs to show the scores and pattern.\n"
    "  Save ':q', ':k', ':v' or ':z' there instead, or a site outside the attention."
)
_UNREPRODUCED = (
    "{kind}'s attention {why}, which the ports (scores and pattern of shape "
    "(batch, heads, q_pos, k_pos)) cannot show as they are.\n"
    "  Intervene on ':q', ':k', ':v' or ':z', or on an op site ('PATH#softmax.0')."
)
_TWO_CALLS = (
    "{kind} called F.scaled_dot_product_attention {n} times in one forward call, so its "
    "attention ports would be ambiguous.\n"
    "  Intervene on the op sites instead ('PATH#scaled_dot_product_attention.0', ...)."
)
_BAD_LAYOUT = (
    "{kind} called F.scaled_dot_product_attention with {got}; attention ports need "
    "(batch, heads, positions, d_head) tensors."
)


def _taps(module: nn.Module) -> Taps:
    """The passes that tap `module` now, with their sites by port, in the order they act."""
    return [
        (p, sites)
        for p in reversed(ACTIVE.get())  # an edit's pass acts first, as its hooks do
        if (sites := p.plan.inside.get(id(module))) is not None
    ]


def _through(taps: Taps, port: str, value: Tensor) -> Tensor:
    for pass_, sites in taps:
        site = sites.get(port)
        if site is not None:
            value = pass_.on_port(site, value)
    return value


def _tapped(taps: Taps) -> set[str]:
    return {port for _, sites in taps for port in sites}


def _inputs(
    taps: Taps, ports: set[str], query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v (``(batch, heads, pos, d_head)`` as attention takes them) through the taps."""
    out = []
    for port, tensor in (("q", query), ("k", key), ("v", value)):
        if port in ports:  # the port's layout is (batch, pos, heads, d_head)
            tensor = _through(taps, port, tensor.transpose(1, 2)).transpose(1, 2)
        out.append(tensor)
    return out[0], out[1], out[2]


# --- HF attention modules ------------------------------------------------------------

_interface_types: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def uses_interface(module: nn.Module) -> bool:
    """Whether `module`'s forward takes its attention from transformers' attention interface."""
    kind = type(module)
    found = _interface_types.get(kind)
    if found is None:
        code = getattr(inspect.unwrap(kind.forward), "__code__", None)
        found = code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names
        _interface_types[kind] = found
    return found and getattr(module, "config", None) is not None


_SDPA_NAMES = {"scaled_dot_product_attention", "dispatch_attention_fn"}


def has_attention(module: nn.Module) -> bool:
    """Whether `module` has attention ports (statically: what its forward calls)."""
    if uses_interface(module):
        return True
    # diffusers' attention modules hand their work to a processor, which calls sdpa
    # directly or through diffusers' attention dispatch (its native backend is sdpa).
    processor = getattr(module, "processor", None)
    calls = [type(module).forward]
    if callable(processor):
        calls.append(type(processor).__call__)
    for fn in calls:
        code = getattr(inspect.unwrap(fn), "__code__", None)
        if code is not None and _SDPA_NAMES & set(code.co_names):
            return True
    return False


def _eager_of(module: nn.Module) -> Callable[..., Any]:
    """The model's own eager attention function (its forward's default)."""
    forward = inspect.unwrap(type(module).forward)
    eager = getattr(forward, "__globals__", {}).get("eager_attention_forward")
    if eager is None:
        raise PurelensError(_NO_EAGER.format(kind=type(module).__name__))
    return eager  # type: ignore[no-any-return]


def _additive(
    mask: Tensor | None, query: Tensor, key: Tensor, module: nn.Module, kwargs: dict[str, Any]
) -> Tensor | None:
    """An sdpa mask (boolean, or None for plain causal attention) as eager attention's float one.

    Made as transformers' ``eager_mask`` makes it: 0 where attending, the dtype's
    minimum elsewhere.
    """
    if mask is None:
        causal = kwargs.get("is_causal")
        if causal is None:
            causal = getattr(module, "is_causal", True)
        q_len, k_len = query.shape[2], key.shape[2]
        if not (causal and q_len > 1):
            return None
        # transformers leaves the mask out only where sdpa's upper-left causal mask is right
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()[None, None]
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), device=mask.device, dtype=query.dtype)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


class _Softmax(TorchFunctionMode):
    """Catches the softmax of an eager attention function: scores in, pattern out."""

    def __init__(self, kind: str, taps: Taps, q_len: int, k_len: int) -> None:
        super().__init__()
        self.kind, self.taps, self.shape, self.seen = kind, taps, (q_len, k_len), 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _SOFTMAXES:
            return func(*args, **kwargs)
        self.seen += 1
        scores = args[0]
        if self.seen > 1:
            raise PurelensError(
                _UNREPRODUCED.format(kind=self.kind, why="takes more than one softmax")
            )
        if scores.ndim != 4 or tuple(scores.shape[-2:]) != self.shape:
            why = (
                f"takes its softmax over {list(scores.shape)} for {self.shape[0]} queries and "
                f"{self.shape[1]} keys (attention sinks, say)"
            )
            raise PurelensError(_UNREPRODUCED.format(kind=self.kind, why=why))
        scores = _through(self.taps, "scores", scores)
        return _through(self.taps, "pattern", func(scores, *args[1:], **kwargs))


_SOFTMAXES = {torch.softmax, F.softmax, Tensor.softmax, torch.special.softmax}


def _attention(original: str) -> Callable[..., Any]:
    """The attention function registered for configs that had `original` ('sdpa', 'eager')."""

    def purelens_attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        taps = _taps(module) if ACTIVE.get() else []
        if not taps:  # untapped: exactly what the model computed before the switch
            return _implementation(original, module)(
                module, query, key, value, attention_mask, *args, **kwargs
            )
        kind = type(module).__name__
        if kwargs.get("cache") is not None:
            raise PurelensError(_UNREPRODUCED.format(kind=kind, why="uses a paged cache"))
        ports = _tapped(taps)
        query, key, value = _inputs(taps, ports, query, key, value)
        if "scores" in ports or "pattern" in ports:
            if original == "sdpa":
                attention_mask = _additive(attention_mask, query, key, module, kwargs)
            catch = _Softmax(kind, taps, query.shape[2], key.shape[2])
            with catch:
                z, weights = _eager_of(module)(
                    module, query, key, value, attention_mask, *args, **kwargs
                )
            if catch.seen != 1:
                raise PurelensError(_UNREPRODUCED.format(kind=kind, why="takes no softmax"))
        else:
            z, weights = _implementation(original, module)(
                module, query, key, value, attention_mask, *args, **kwargs
            )
        if "z" in ports:
            z = _through(taps, "z", z)
        # What the model's own implementation returns: sdpa gives no weights (with them,
        # `output_attentions` would list the tapped layers only, as if they were the first).
        return z, weights if original == "eager" else None

    return purelens_attention


def _implementation(original: str, module: nn.Module) -> Callable[..., Any]:
    if original == "eager":
        return _eager_of(module)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[original]  # type: ignore[no-any-return]


_registered = False
_lock = threading.Lock()
# id(config) -> (config, the implementation it had, runs that switched it)
_switched: dict[int, list[Any]] = {}


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    for original, mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        # Both are needed: without its mask function, transformers makes no mask at all.
        AttentionInterface.register(f"purelens_{original}", _attention(original))
        AttentionMaskInterface.register(f"purelens_{original}", mask)
    _registered = True


def _check(site: SitePlan, original: Any) -> None:
    kind = type(site.module).__name__
    if original not in ("sdpa", "eager"):
        raise PurelensError(_IMPLEMENTATION.format(site=site.site, kind=kind, impl=original))
    if original == "eager" and getattr(site.module, "reorder_and_upcast_attn", False):
        raise PurelensError(_UPCAST.format(site=site.site, kind=kind))


@contextlib.contextmanager
def switched(sites: list[SitePlan]) -> Iterator[None]:
    """The configs of the HF attention modules of `sites` switched to purelens's function.

    Reference-counted across concurrent runs; each config gets back exactly
    the implementation it had when the last run ends, also when one raises.
    """
    entered: list[Any] = []
    try:
        with _lock:
            _register()
            for site in sites:
                config: Any = site.module.config
                entry = _switched.get(id(config))
                if entry is None:
                    original = getattr(config, "_attn_implementation_internal", None)
                    _check(site, original)
                    entry = _switched[id(config)] = [config, original, 0]
                    config._attn_implementation_internal = f"purelens_{original}"
                else:
                    _check(site, entry[1])
                if not any(c is config for c in entered):
                    entry[2] += 1
                    entered.append(config)
        yield
    finally:
        with _lock:
            for config in entered:
                entry = _switched[id(config)]
                entry[2] -= 1
                if entry[2] == 0:
                    config._attn_implementation_internal = entry[1]
                    del _switched[id(config)]


# --- modules that call F.scaled_dot_product_attention themselves ----------------------


class SdpaTaps(TorchFunctionMode):
    """In one module's own forward: its ``F.scaled_dot_product_attention``, with taps."""

    def __init__(self, module: nn.Module, taps: Taps) -> None:
        super().__init__()
        self.kind, self.taps, self.calls = type(module).__name__, taps, 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        if self.calls > 1:
            raise PurelensError(_TWO_CALLS.format(kind=self.kind, n=self.calls))
        return self._attend(*args, **kwargs)

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        if not all(isinstance(t, Tensor) and t.ndim == 4 for t in (query, key, value)):
            given = (query, key, value)
            got = ", ".join(str(list(t.shape)) if isinstance(t, Tensor) else repr(t) for t in given)
            raise PurelensError(_BAD_LAYOUT.format(kind=self.kind, got=got))
        taps = self.taps
        ports = _tapped(taps)
        query, key, value = _inputs(taps, ports, query, key, value)
        if "scores" in ports or "pattern" in ports:
            out = self._explicit(query, key, value, attn_mask, dropout_p, is_causal, scale)
        else:
            out = F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        if "z" in ports:
            out = _through(taps, "z", out.transpose(1, 2)).transpose(1, 2)
        return out

    def _explicit(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
    ) -> Tensor:
        """Scaled dot-product attention as torch documents it, step by step, with taps."""
        heads, kv_heads = query.shape[1], key.shape[1]
        if kv_heads != heads:  # grouped-query attention: each key/value head serves a group
            key = key.repeat_interleave(heads // kv_heads, dim=1)
            value = value.repeat_interleave(heads // kv_heads, dim=1)
        q_len, k_len = query.shape[-2], key.shape[-2]
        factor = query.shape[-1] ** -0.5 if scale is None else scale
        scores = query @ key.transpose(-2, -1) * factor
        if is_causal:
            keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        scores = _through(self.taps, "scores", scores)
        pattern = _through(self.taps, "pattern", torch.softmax(scores, dim=-1))
        if dropout_p > 0.0:
            pattern = F.dropout(pattern, p=dropout_p)
        return pattern @ value

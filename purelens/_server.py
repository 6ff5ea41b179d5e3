"""`purelens serve`: one model behind HTTP, running requests that are pure data.

A request is bytes from `purelens._wire` (no code: functions are registered
names or `purelens.ops` expressions), so the server needs no sandbox. Each
request is one `pl.run` or `pl.generate` on the server's own copy of the
model: nothing is shared between requests but the weights, which no request
can change. Limits (input tokens, new tokens, bytes saved, wall time,
request size, and the size of any `ops` result) answer with a 4xx that names
the limit; any bad request gets a 4xx and the server goes on serving.

The app is FastAPI; `serve` runs it in one process with uvicorn, or on Ray
Serve with replicas (``--ray``, `purelens._ray`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import os
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from fastapi import Request  # at module level: FastAPI reads the annotations by name
from torch import Tensor, nn

from . import _wire, ops
from ._errors import PurelensError
from ._hooks import check_before_every_module
from ._inputs import is_text

__all__ = ["Limits", "announce", "create_app", "read_tokens", "require_tokens", "serve"]

MEDIA_TYPE = "application/vnd.purelens"
_CHUNK = 2**20
# Keyword arguments a remote generate may pass to HF `generate` (data, no objects).
GENERATE_KWARGS = frozenset(
    {
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "num_beams",
        "num_return_sequences",
        "eos_token_id",
        "pad_token_id",
        "min_new_tokens",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "length_penalty",
        "early_stopping",
        "use_cache",
        "attention_mask",
    }
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    Attributes:
        input_tokens: token ids in the batch (rows x longest row, after
            tokenizing; x beams for generation).
        new_tokens: ``max_new_tokens`` of a generation.
        saved_bytes: bytes of tensors in the returned record (output included).
        seconds: wall time of the model's work (checked at every module call).
        request_bytes: size of the request body.
        elements: elements of any result inside a `purelens.ops` expression.
    """

    input_tokens: int = 8192
    new_tokens: int = 256
    saved_bytes: int = 256 * 2**20
    seconds: float = 60.0
    request_bytes: int = 64 * 2**20
    elements: int = 2**26


class LimitError(PurelensError):
    """A request over one of the server's `Limits`."""

    def __init__(self, limit: str, message: str, status: int = 413) -> None:
        super().__init__(message)
        self.limit = limit
        self.status = status


@dataclasses.dataclass(frozen=True)
class _Served:
    name: str
    model: nn.Module
    tokenizer: Any
    limits: Limits
    tokens: tuple[bytes, ...]
    gate: threading.Semaphore


def read_tokens(tokens_file: str | Path | None = None) -> list[str]:
    """Bearer tokens from ``PURELENS_TOKENS`` (comma-separated) and a file (one a line)."""
    tokens = [t.strip() for t in os.environ.get("PURELENS_TOKENS", "").split(",") if t.strip()]
    if tokens_file is not None:
        for line in Path(tokens_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                tokens.append(line)
    return tokens


def require_tokens(tokens: Collection[str]) -> None:
    """Raise unless there is at least one bearer token to accept."""
    if not tokens:
        raise PurelensError(
            "no bearer tokens: set PURELENS_TOKENS (comma-separated) or pass --tokens-file; "
            "a server without tokens would answer every request with 401."
        )


def create_app(
    path: str | Path | None = None,
    *,
    tokens: Collection[str],
    name: str | None = None,
    limits: Limits = Limits(),
    concurrency: int = 1,
) -> Any:
    """The FastAPI app serving the model at `path` (the bundled one by default).

    Args:
        path: a local HF model folder; None for the bundled model.
        tokens: the accepted bearer tokens (at least one).
        name: the model's name in URLs; ``"default"`` for the bundled model,
            else the folder's name.
        limits: what one request may ask.
        concurrency: how many requests run the model at once (the rest wait).

    Raises:
        PurelensError: no tokens, or no model at `path`.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from . import models

    require_tokens(tokens)
    model, tokenizer = models.load(path)
    # The model is the server's own (just loaded): its deadline checks change no user's model.
    check_before_every_module(model, _check_deadline)
    served = _Served(
        name=name or (Path(path).name if path is not None else "default"),
        model=model,
        tokenizer=tokenizer,
        limits=limits,
        tokens=tuple(t.encode() for t in tokens),
        gate=threading.Semaphore(concurrency),
    )
    app = FastAPI(title="purelens", version="1")

    def error(status: int, message: str, limit: str | None = None) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": message, "limit": limit}, status, headers=headers)

    def authorized(request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # Compare with every token, so that timing says nothing about which one.
        matches = [hmac.compare_digest(given, t) for t in served.tokens]
        return scheme.lower() == "bearer" and bool(given) and any(matches)

    def refused() -> JSONResponse:
        return error(401, "missing or unknown bearer token (Authorization: Bearer <token>)")

    def unknown(name: str) -> JSONResponse:
        return error(404, f"no model {name!r} here; this server serves {served.name!r}")

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        # A bug of the server's, not the request's: say so, and go on serving.
        return error(500, f"internal error: {type(exc).__name__}")

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.name, "process": os.getpid()}

    @app.get("/v1/models", response_model=None)
    def list_models(request: Request) -> Any:
        if not authorized(request):
            return refused()
        return {"models": [_describe(served)]}

    @app.get("/v1/models/{name}", response_model=None)
    def describe(name: str, request: Request, prompt: str | None = None) -> Any:
        if not authorized(request):
            return refused()
        if name != served.name:
            return unknown(name)
        info = _describe(served)
        if prompt is not None:
            try:
                _check_tokens(_count_tokens(served, prompt), served.limits)
                info["shapes"] = _shapes(served, prompt)
            except LimitError as e:
                return error(e.status, str(e), e.limit)
            except Exception as e:  # a prompt the model cannot take
                return error(422, f"{type(e).__name__}: {e}")
        return info

    async def call(kind: str, name: str, request: Request) -> Any:
        if not authorized(request):
            return refused()
        if name != served.name:
            return unknown(name)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > served.limits.request_bytes:
                return error(413, _over("request_bytes", len(body), served.limits), "request_bytes")
        from starlette.concurrency import run_in_threadpool

        try:
            data = await run_in_threadpool(_execute, served, kind, bytes(body))
        except LimitError as e:
            return error(e.status, str(e), e.limit)
        except _BadRequest as e:
            return error(400, str(e))
        except _Failed as e:
            return error(422, str(e))
        return StreamingResponse(_chunks(data), media_type=MEDIA_TYPE)

    @app.post("/v1/models/{name}/run", response_model=None)
    async def run(name: str, request: Request) -> Any:
        return await call("run", name, request)

    @app.post("/v1/models/{name}/generate", response_model=None)
    async def generate(name: str, request: Request) -> Any:
        return await call("generate", name, request)

    return app


class _BadRequest(PurelensError):
    """The request is not one the server can read (400)."""


class _Failed(PurelensError):
    """The request was read, and the run failed because of what it asked (422)."""


def _execute(served: _Served, kind: str, body: bytes) -> bytes:
    from ._generate import generate
    from ._run import run

    try:
        request = _wire.decode_request(body)
    except PurelensError as e:
        raise _BadRequest(str(e)) from None
    if request.call != kind:
        raise _BadRequest(f"a {request.call!r} request was sent to the {kind!r} endpoint")
    kwargs = dict(request.kwargs)
    limits = served.limits
    try:
        tokens = _count_tokens(served, request.inputs)
    except (LimitError, _BadRequest):
        raise
    except Exception as e:  # text the tokenizer cannot take, ragged id lists, ...
        raise _BadRequest(f"bad inputs: {e}") from None
    new_tokens = None
    if kind == "run":
        _check_tokens(tokens, limits)
    else:
        new_tokens = kwargs.pop("max_new_tokens", None)
        _check_generate(kwargs, new_tokens, tokens, limits)
    tokenizer = served.tokenizer if is_text(request.inputs) else None
    with served.gate, _deadline(limits.seconds), ops.limit_elements(limits.elements):
        try:
            if kind == "run":
                record = run(
                    served.model,
                    request.inputs,
                    request.interventions,
                    loss=request.loss,
                    tokenizer=tokenizer,
                    validate=request.validate,
                    **kwargs,
                )
            else:
                record = generate(
                    served.model,
                    request.inputs,
                    request.interventions,
                    max_new_tokens=new_tokens,  # type: ignore[arg-type]
                    tokenizer=tokenizer,
                    validate=request.validate,
                    **kwargs,
                )
        except _Timeout:
            raise LimitError(
                "seconds",
                f"the {kind} took longer than this server's limit of {limits.seconds} s",
                408,
            ) from None
        except ops.ElementLimitError as e:
            raise LimitError("elements", f"{e} (limit elements)") from None
        except PurelensError as e:
            raise _Failed(str(e)) from None
        except Exception as e:  # the request's values made the model fail (shape, dtype, ...)
            raise _Failed(f"the {kind} failed: {type(e).__name__}: {e}") from None
    size = _wire.saved_bytes(record)
    if size > limits.saved_bytes:
        raise LimitError("saved_bytes", _over("saved_bytes", size, limits))
    return _wire.encode_record(record)


def _over(limit: str, value: float, limits: Limits) -> str:
    allowed = getattr(limits, limit)
    return f"{value} is over this server's limit {limit}={allowed}"


def _check_tokens(tokens: int, limits: Limits) -> None:
    if tokens > limits.input_tokens:
        raise LimitError("input_tokens", _over("input_tokens", tokens, limits) + " (token ids)")


def _check_generate(kwargs: dict[str, Any], new: Any, tokens: int, limits: Limits) -> None:
    if not isinstance(new, int) or isinstance(new, bool) or new < 1:
        raise _BadRequest(f"generate needs max_new_tokens, a positive int; got {new!r}")
    if new > limits.new_tokens:
        raise LimitError("new_tokens", _over("new_tokens", new, limits) + " (max_new_tokens)")
    unknown = sorted(set(kwargs) - GENERATE_KWARGS)
    if unknown:
        raise _BadRequest(
            f"generate does not take {unknown} remotely; allowed: {sorted(GENERATE_KWARGS)}"
        )
    beams = max(_positive(kwargs, "num_beams"), _positive(kwargs, "num_return_sequences"))
    _check_tokens(tokens * beams, limits)


def _positive(kwargs: dict[str, Any], key: str) -> int:
    value = kwargs.get(key, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _BadRequest(f"{key} must be a positive int, got {value!r}")
    return value


def _count_tokens(served: _Served, inputs: Any) -> int:
    """Token ids in the batch the model will see: the largest tensor or the padded text."""
    from ._inputs import tokenize

    if is_text(inputs):
        if isinstance(inputs, list) and len(inputs) > served.limits.input_tokens:
            raise LimitError("input_tokens", _over("input_tokens", len(inputs), served.limits))
        return int(tokenize(served.tokenizer, inputs)["input_ids"].numel())
    import torch.utils._pytree as torch_pytree

    leaves = torch_pytree.tree_leaves(inputs)
    sizes = [t.numel() for t in leaves if isinstance(t, Tensor)]
    ids = sum(1 for i in leaves if isinstance(i, int))  # token-id lists
    return max([*sizes, ids], default=0)


def _shapes(served: _Served, prompt: str) -> dict[str, Any]:
    from ._shapes import shapes

    found = shapes(served.model, prompt, tokenizer=served.tokenizer)
    return {
        site: {"shape": list(shape), "dtype": str(found.dtypes[site]).removeprefix("torch.")}
        for site, shape in found.items()
    }


def _describe(served: _Served) -> dict[str, Any]:
    from ._site import sites

    config = getattr(served.model, "config", None)
    return {
        "name": served.name,
        "class": type(served.model).__name__,
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in served.model.parameters()),
        "sites": sites(served.model),
    }


def _chunks(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        yield bytes(view[start : start + _CHUNK])


# Wall time ----------------------------------------------------------------------

_clock = threading.local()


class _Timeout(Exception):
    """Raised inside the model when a request's deadline has passed."""


def _check_deadline() -> None:
    deadline = getattr(_clock, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _Timeout


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    _clock.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _clock.deadline = None


# Serving --------------------------------------------------------------------------


def serve(
    path: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tokens: Collection[str],
    limits: Limits = Limits(),
    concurrency: int = 1,
    ray: bool = False,
    replicas: int = 2,
) -> None:
    """Serve until interrupted: uvicorn in this process, or Ray Serve with `replicas`."""
    if ray:
        from ._ray import serve_ray

        serve_ray(path, host=host, port=port, tokens=tokens, limits=limits, replicas=replicas)
        return
    import uvicorn

    app = create_app(path, tokens=tokens, limits=limits, concurrency=concurrency)
    announce(path, host, port, "one process")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def announce(path: str | Path | None, host: str, port: int, how: str) -> None:
    import sys

    what = path if path is not None else "the bundled model"
    print(f"purelens serve: {what} at http://{host}:{port} ({how})", file=sys.stderr, flush=True)

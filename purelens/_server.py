"""`purelens serve`: one model behind HTTP, running requests that are pure data.

A request is bytes from `purelens._wire` (no code: functions are registered
names or `purelens.ops` expressions), so the server needs no sandbox. Each
request is one `pl.run` or `pl.generate` on the server's own copy of the
model: nothing is shared between requests but the weights, which no request
can change (keyword arguments are allow-listed: data the model takes, never
`params=` or objects). Limits (input tokens, new tokens, bytes saved, wall time,
request size, and the size of any `ops` result; `purelens._limits`) answer
with a 4xx that names the limit; any bad request gets a 4xx and the server
goes on serving.

The app is FastAPI; `serve` runs it in one process with uvicorn, or on Ray
Serve with replicas (``--ray``, `purelens._ray`). With ``--engine vllm`` the
model is a vLLM engine (`pl.vllm.load`): the same API, wire format, tokens,
limits and errors, and concurrent requests are batched together by vLLM,
each with its own interventions (`purelens.vllm`).
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from . import _wire, ops
from ._budget import SavedBytesError, bounded
from ._errors import PurelensError
from ._extras import need
from ._hooks import check_before_every_module
from ._inputs import is_text
from ._limits import (
    BadRequest,
    LimitError,
    Limits,
    Timeout,
    check_deadline,
    check_generate,
    check_kwargs,
    check_tokens,
    count_tokens,
    deadline,
    over,
)

need("fastapi", "purelens serve")  # a clear error where the `serve` extra is missing
from fastapi import Request  # noqa: E402  (at module level: FastAPI reads annotations by name)

__all__ = ["Limits", "announce", "create_app", "read_tokens", "require_tokens", "serve"]

MEDIA_TYPE = "application/vnd.purelens"
_CHUNK = 2**20
_DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(frozen=True)
class _Served:
    name: str
    model: Any  # an nn.Module, or a vllm.LLM
    tokenizer: Any
    limits: Limits
    tokens: tuple[bytes, ...]
    gate: threading.Semaphore
    engine: str = "hf"


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
    limits: Limits = _DEFAULT_LIMITS,
    concurrency: int | None = None,
    engine: str = "hf",
    engine_args: dict[str, Any] | None = None,
) -> Any:
    """The FastAPI app serving the model at `path` (the bundled one by default).

    Args:
        path: a local HF model folder; None for the bundled model.
        tokens: the accepted bearer tokens (at least one).
        name: the model's name in URLs; ``"default"`` for the bundled model,
            else the folder's name.
        limits: what one request may ask.
        concurrency: how many requests run the model at once (the rest wait);
            1 for an HF model, 64 for a vLLM engine (which batches them).
        engine: ``"hf"`` (transformers, one request at a time per slot) or
            ``"vllm"`` (a vLLM engine batching every running request).
        engine_args: vLLM's engine arguments (``engine="vllm"`` only).

    Raises:
        PurelensError: no tokens, no model at `path`, or an unknown engine.
    """
    need("fastapi", "purelens serve")
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    require_tokens(tokens)
    model, tokenizer = _load(path, engine, engine_args)
    served = _Served(
        name=name or (Path(path).name if path is not None else "default"),
        model=model,
        tokenizer=tokenizer,
        limits=limits,
        tokens=tuple(t.encode() for t in tokens),
        gate=threading.Semaphore(concurrency or (64 if engine == "vllm" else 1)),
        engine=engine,
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
                check_tokens(
                    count_tokens(served.tokenizer, served.limits, prompt, {}), served.limits
                )
                # Inside the gate and the deadline, as runs: it computes on the model too.
                with served.gate, deadline(served.limits, served.limits.seconds, "shapes"):
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
                return error(413, over("request_bytes", len(body), served.limits), "request_bytes")
        from starlette.concurrency import run_in_threadpool

        try:
            data = await run_in_threadpool(_execute, served, kind, bytes(body))
        except LimitError as e:
            return error(e.status, str(e), e.limit)
        except BadRequest as e:
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


def _load(path: str | Path | None, engine: str, engine_args: dict[str, Any] | None) -> Any:
    """The served model and its tokenizer: an HF model, or a vLLM engine."""
    from . import models

    if engine == "hf":
        if engine_args:
            raise PurelensError("engine arguments (--engine-arg) are for --engine vllm only.")
        model, tokenizer = models.load(path)
        # The model is the server's own (just loaded): its deadline checks change no user's.
        check_before_every_module(model, check_deadline)
        return model, tokenizer
    if engine != "vllm":
        raise PurelensError(f"`engine` must be 'hf' or 'vllm', got {engine!r}.")
    from . import vllm

    llm = vllm.load(models._folder(path), **(engine_args or {}))
    return llm, llm.get_tokenizer()


class _Failed(PurelensError):
    """The request was read, and the run failed because of what it asked (422)."""


def _execute(served: _Served, kind: str, body: bytes) -> bytes:
    limits = served.limits
    start = time.monotonic()
    with deadline(limits, limits.seconds, f"reading of the {kind} request"):
        request, kwargs, new_tokens = _read(served, kind, body)
    left = limits.seconds - (time.monotonic() - start)  # the wait for the gate is not counted
    with served.gate, deadline(limits, left, kind), ops.limit_elements(limits.elements):
        with bounded(check_deadline, limits.saved_bytes):
            record = _call(served, kind, request, kwargs, new_tokens)
    records = record if isinstance(record, list) else [record]  # vLLM: a record per prompt
    size = sum(_wire.saved_bytes(r) for r in records)
    if size > limits.saved_bytes:
        raise LimitError("saved_bytes", over("saved_bytes", size, limits))
    return _wire.encode_records(record) if isinstance(record, list) else _wire.encode_record(record)


def _read(served: _Served, kind: str, body: bytes) -> tuple[_wire.Request, dict[str, Any], Any]:
    """The request in `body`, its keyword arguments and max_new_tokens, checked against limits."""
    try:
        request = _wire.decode_request(body, check=check_deadline)
    except PurelensError as e:
        raise BadRequest(str(e)) from None
    if request.call != kind:
        raise BadRequest(f"a {request.call!r} request was sent to the {kind!r} endpoint")
    kwargs = dict(request.kwargs)
    new_tokens = kwargs.pop("max_new_tokens", None) if kind == "generate" else None
    # A vLLM engine samples each request with its own seed, which HF's generate cannot.
    check_kwargs(kind, kwargs, frozenset({"seed"}) if served.engine == "vllm" else frozenset())
    if isinstance(request.inputs, dict):  # keyword arguments of the model call too
        check_kwargs("run", request.inputs)
    try:
        tokens = count_tokens(served.tokenizer, served.limits, request.inputs, kwargs)
    except (LimitError, BadRequest):
        raise
    except Exception as e:  # text the tokenizer cannot take, ragged id lists, ...
        raise BadRequest(f"bad inputs: {e}") from None
    if kind == "run":
        check_tokens(tokens, served.limits)
    else:
        check_generate(kwargs, new_tokens, tokens, served.limits)
    return request, kwargs, new_tokens


def _call(
    served: _Served, kind: str, request: _wire.Request, kwargs: dict[str, Any], new_tokens: Any
) -> Any:
    """The record of `request` on the served model (inside the gate and the deadline)."""
    from ._generate import generate
    from ._run import run

    tokenizer = served.tokenizer if is_text(request.inputs) else None
    try:
        if kind == "run":
            return run(
                served.model,
                request.inputs,
                request.interventions,
                loss=request.loss,
                tokenizer=tokenizer,
                validate=request.validate,
                **kwargs,
            )
        return generate(
            served.model,
            request.inputs,
            request.interventions,
            max_new_tokens=new_tokens,
            tokenizer=tokenizer,
            validate=request.validate,
            **kwargs,
        )
    except Timeout:
        raise  # `deadline` answers it with a 408
    except SavedBytesError as e:
        raise LimitError("saved_bytes", str(e)) from None
    except ops.ElementLimitError as e:
        raise LimitError("elements", f"{e} (limit elements)") from None
    except PurelensError as e:
        raise _Failed(str(e)) from None
    except Exception as e:  # the request's values made the model fail (shape, dtype, ...)
        raise _Failed(f"the {kind} failed: {type(e).__name__}: {e}") from None


def _shapes(served: _Served, prompt: str) -> dict[str, Any]:
    from ._shapes import shapes

    if served.engine == "vllm":
        raise PurelensError(
            "shapes are computed on fake tensors of an HF model, which a vLLM engine has not; "
            "save the sites you need with a run instead."
        )
    found = shapes(served.model, prompt, tokenizer=served.tokenizer)
    return {
        site: {"shape": list(shape), "dtype": str(found.dtypes[site]).removeprefix("torch.")}
        for site, shape in found.items()
    }


def _describe(served: _Served) -> dict[str, Any]:
    from ._listing import sites

    if served.engine == "vllm":
        from .vllm._engine import describe

        return {"name": served.name, **describe(served.model)}
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


# Serving --------------------------------------------------------------------------


def serve(
    path: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tokens: Collection[str],
    limits: Limits = _DEFAULT_LIMITS,
    concurrency: int | None = None,
    ray: bool = False,
    replicas: int = 2,
    engine: str = "hf",
    engine_args: dict[str, Any] | None = None,
) -> None:
    """Serve until interrupted: uvicorn in this process, or Ray Serve with `replicas`."""
    if ray:
        if engine != "hf":
            raise PurelensError(
                "--ray serves HF models; a vLLM engine batches requests itself (and runs "
                "tensor-parallel over GPUs): use --engine vllm without --ray."
            )
        from ._ray import serve_ray

        serve_ray(path, host=host, port=port, tokens=tokens, limits=limits, replicas=replicas)
        return
    uvicorn = need("uvicorn", "purelens serve")

    app = create_app(
        path,
        tokens=tokens,
        limits=limits,
        concurrency=concurrency,
        engine=engine,
        engine_args=engine_args,
    )
    announce(path, host, port, "one process" if engine == "hf" else "a vLLM engine")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def announce(path: str | Path | None, host: str, port: int, how: str) -> None:
    import sys

    what = path if path is not None else "the bundled model"
    print(f"purelens serve: {what} at http://{host}:{port} ({how})", file=sys.stderr, flush=True)

"""`pl.remote`: a model served by `purelens serve`, used through `pl.run` and `pl.generate`.

The client sends data (`purelens._wire`): interventions as `pl.dumps`
writes them, so a lambda fails here, before anything is sent, with the
fix in the message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from . import _wire
from ._errors import PurelensError
from ._extras import need
from ._interventions import flatten_interventions
from ._record import Record
from ._tree import NAMESPACE

__all__ = ["Remote", "RemoteError", "check_local", "remote"]

_LOCAL_ONLY = (
    "{what} is not available on a remote model: {why}.\n"
    "  A remote model takes pl.run(remote, inputs, interventions, loss=..., validate=..., "
    "**model_kwargs) and pl.generate(remote, inputs, interventions, max_new_tokens=...)."
)
_NO_TRANSFORMS = (
    "pl.{call} on a remote model (pl.remote) inside a torch.func transform (vmap, grad, "
    "jacrev, ...): remote models take no torch.func transforms, since the values travel "
    "as plain tensors and the model runs on the server.\n"
    "  Call pl.{call} once per value, outside the transform, or run the model locally."
)
_UNREADABLE = (
    "{url} answered {status}, but the server's answer could not be read ({error}).\n"
    "  Is it a purelens server of the same version as this client?"
)


class RemoteError(PurelensError):
    """The server refused or failed a request.

    Attributes:
        status: the HTTP status (401 for a missing or unknown token, 413 or
            408 for a limit, 400 for a request it cannot read, 422 for a
            run that failed because of what it asked).
        limit: the name of the limit that was hit, if one was.
    """

    def __init__(self, message: str, status: int, limit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.limit = limit


@dataclasses.dataclass(frozen=True, eq=False)
class Remote:
    """A handle on a model served by `purelens serve`; build it with `pl.remote`.

    Attributes:
        url: the server's base URL.
        name: the model's name there.
        sites: the model's addressable module paths (as `pl.sites` lists them).
    """

    url: str
    name: str
    token: str | None = dataclasses.field(repr=False)
    timeout: float
    sites: tuple[str, ...] = dataclasses.field(repr=False)
    _client: Any = dataclasses.field(repr=False)

    def run(
        self,
        inputs: Any,
        interventions: Any = (),
        *,
        params: Any = None,
        loss: Any = None,
        tokenizer: Any = None,
        validate: bool = False,
        **model_kwargs: Any,
    ) -> Record:
        """`pl.run` on the server; `pl.run(remote, ...)` calls this."""
        _no_transforms("run")
        _local_only(params=params, tokenizer=tokenizer)
        ivs = list(flatten_interventions(interventions))
        _no_autograd("run", (inputs, ivs, model_kwargs))
        request = _wire.Request("run", _data(inputs), ivs, loss, model_kwargs, validate)
        return self._call(request)

    def generate(
        self,
        inputs: Any,
        interventions: Any = (),
        *,
        max_new_tokens: int | None = None,
        tokenizer: Any = None,
        validate: bool = False,
        **generate_kwargs: Any,
    ) -> Record:
        """`pl.generate` on the server; `pl.generate(remote, ...)` calls this."""
        _no_transforms("generate")
        _local_only(tokenizer=tokenizer)
        kwargs = dict(generate_kwargs)
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        ivs = list(flatten_interventions(interventions))
        _no_autograd("generate", (inputs, ivs, kwargs))
        request = _wire.Request("generate", _data(inputs), ivs, None, kwargs, validate)
        return self._call(request)

    def shapes(self, prompt: str) -> dict[str, Any]:
        """Each site's shape and dtype for `prompt`, computed by the server without real compute."""
        shapes = self._get(f"/v1/models/{self.name}", params={"prompt": prompt}).get("shapes")
        if not isinstance(shapes, dict):
            raise RemoteError(f"{self.url} answered without the shapes: {shapes!r}", 200)
        return shapes

    def close(self) -> None:
        """Close the connection pool; `with pl.remote(...) as remote:` closes it on exit."""
        self._client.close()

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, request: _wire.Request) -> Record:
        body = _wire.encode_request(request)  # lambdas fail here, before sending
        response = self._send("POST", f"/v1/models/{self.name}/{request.call}", content=body)
        try:
            # A vLLM engine answers a call with several prompts with a record per prompt.
            return _wire.decode_result(response.content)  # type: ignore[return-value]
        except Exception as e:  # whatever a broken server sent, say so, not a raw error
            raise self._unreadable(response, e) from None

    def _get(self, path: str, **kwargs: Any) -> Any:
        response = self._send("GET", path, **kwargs)
        try:
            answer = response.json()
        except ValueError as e:
            raise self._unreadable(response, e) from None
        if not isinstance(answer, dict):
            raise self._unreadable(response, TypeError(f"a JSON {type(answer).__name__}"))
        return answer

    def _unreadable(self, response: Any, error: Exception) -> RemoteError:
        status = response.status_code
        message = _UNREADABLE.format(
            url=self.url, status=status, error=f"{type(error).__name__}: {error}"
        )
        return RemoteError(message, status)

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        httpx = need("httpx", "pl.remote")

        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach {self.url}: {type(e).__name__}: {e}", 0) from None
        if response.status_code >= 400:
            try:
                body = response.json()
                message, limit = str(body["error"]), body.get("limit")
            except (ValueError, KeyError, TypeError):
                message, limit = response.text[:500] or response.reason_phrase, None
            raise RemoteError(
                f"{self.url} answered {response.status_code}: {message}",
                response.status_code,
                limit,
            )
        return response


def remote(
    url: str, name: str = "default", token: str | None = None, *, timeout: float = 300.0
) -> Remote:
    """A model served by ``purelens serve`` at `url`, for `pl.run` and `pl.generate`.

    Asks the server for the model once (so that a wrong URL, name or token
    fails here); then each `pl.run(remote, ...)` is one request. Text is
    tokenized by the server; interventions travel as data, so functions must
    be `purelens.ops` expressions or names registered on the server
    (`pl.functions.register`). The record comes back with the same values as
    a local run (the model output's KV cache excepted: it stays on the server).

    Args:
        url: the server, e.g. ``"http://127.0.0.1:8000"``.
        name: the model's name there (``"default"`` for the bundled model).
        token: a bearer token the server accepts.
        timeout: seconds to wait for one answer.

    Raises:
        RemoteError: the server cannot be reached, refuses the token (401),
            or serves no model of that name (404).

    Examples:
        >>> import purelens as pl
        >>> pl.remote("http://127.0.0.1:9", token="t")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        purelens._remote.RemoteError: cannot reach http://127.0.0.1:9: ConnectError: ...
    """
    httpx = need("httpx", "pl.remote")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(base_url=url, headers=headers, timeout=timeout)
    handle = Remote(url, name, token, timeout, (), client)
    try:
        info = handle._get(f"/v1/models/{name}")
    except RemoteError:
        client.close()
        raise
    sites = info.get("sites", [])
    if not (isinstance(sites, list) and all(isinstance(s, str) for s in sites)):
        client.close()
        raise RemoteError(f"{url} answered with sites that are not a list of strings.", 200)
    return dataclasses.replace(handle, sites=tuple(sites))


def check_local(model: Any, what: str) -> None:
    """Raise a clear error when `what` is asked of a remote model."""
    if isinstance(model, Remote):
        raise PurelensError(
            f"{what} needs the model in this process; a remote model (pl.remote) takes "
            "pl.run, pl.generate and pl.sites."
        )


_NO_AUTOGRAD = (
    "pl.{call} on a remote model got a tensor that requires gradients, but what the server "
    "returns carries no autograd history, so gradients through it would silently be zero.\n"
    "  Ask the server for gradients instead: pl.run(remote, x, [pl.save_grad(site)], "
    "loss=...), or detach the tensor if you need no gradients."
)


def _no_transforms(call: str) -> None:
    import torch

    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise PurelensError(_NO_TRANSFORMS.format(call=call))


def _no_autograd(call: str, tree: Any) -> None:
    """Raise when autograd records a tensor sent away (its gradients could not come back)."""
    import optree
    import torch

    if not torch.is_grad_enabled():
        return
    leaves = optree.tree_leaves(tree, namespace=NAMESPACE)  # type: ignore[arg-type]
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
        raise PurelensError(_NO_AUTOGRAD.format(call=call))


def _local_only(**given: Any) -> None:
    why = {
        "params": "the weights live on the server",
        "tokenizer": "the server tokenizes text with the model's own tokenizer; leave it out",
    }
    for name, value in given.items():
        if value is not None:
            raise PurelensError(_LOCAL_ONLY.format(what=f"`{name}=`", why=why[name]))


def _data(inputs: Any) -> Any:
    """Inputs as plain data: a tokenizer's BatchEncoding becomes a dict."""
    if isinstance(inputs, Mapping) and not isinstance(inputs, dict):
        return dict(inputs)
    return inputs

"""`purelens serve --ray`: the app of `purelens._server` as a Ray Serve deployment with replicas."""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from ._errors import PurelensError
from ._server import Limits, announce, create_app, require_tokens

__all__ = ["ray_app", "serve_ray"]

_DEFAULT = Limits()
_NO_RAY = (
    '`purelens serve --ray` needs Ray Serve, which is not installed: pip install "purelens[ray]" '
    "({error})."
)


def _ray() -> tuple[Any, Any]:
    """The `ray` and `ray.serve` modules, or a PurelensError naming the extra that has them."""
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError as e:
        raise PurelensError(_NO_RAY.format(error=e)) from None
    return ray, ray_serve


def ray_app(
    path: str | Path | None = None,
    *,
    tokens: Collection[str],
    limits: Limits = _DEFAULT,
    replicas: int = 2,
    concurrency: int = 1,
) -> Any:
    """The same app on Ray Serve: `replicas` copies, a GPU each where there are GPUs."""
    _, ray_serve = _ray()

    class Replica:
        def __init__(self) -> None:
            self._app = create_app(path, tokens=tokens, limits=limits, concurrency=concurrency)

        def __serve_build_asgi_app__(self) -> Any:
            return self._app

    options = {"num_cpus": 0, "num_gpus": 1 if torch.cuda.is_available() else 0}
    deployment: Any = ray_serve.deployment(
        ray_serve.ingress()(Replica),
        name="purelens",
        num_replicas=replicas,
        ray_actor_options=options,
    )
    return deployment.bind()


def serve_ray(
    path: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tokens: Collection[str],
    limits: Limits = _DEFAULT,
    replicas: int = 2,
) -> None:
    """Deploy on Ray Serve (a local Ray unless ``RAY_ADDRESS`` names a cluster) and block.

    Stops on Ctrl-C or SIGTERM, taking the deployment (and a Ray it started) down.
    """
    import signal
    import sys

    ray, ray_serve = _ray()
    require_tokens(tokens)
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        app = ray_app(path, tokens=tokens, limits=limits, replicas=replicas)
        ray_serve.run(app, name="purelens", route_prefix="/")
        announce(path, host, port, f"Ray Serve, {replicas} replicas")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()
        ray.shutdown()

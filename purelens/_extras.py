"""What optional extras give, imported when first needed, with an error naming the extra.

``pip install purelens`` brings what `pl.run` needs; serving and remote access
(FastAPI, uvicorn, httpx) and plots and tables (matplotlib, rich) are extras, so
that purelens stays light as a dependency of other tools:

    pip install "purelens[serve]"   # purelens serve, pl.remote
    pip install "purelens[plot]"    # .plot() and .table() of results, the CLI's output
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ._errors import PurelensError

__all__ = ["EXTRAS", "need"]

# The extra that brings each optional top-level module.
EXTRAS = {
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "httpx": "serve",
    "matplotlib": "plot",
    "rich": "plot",
}

_MISSING = (
    "{what} needs {package}, which is not installed.\n"
    '  Install purelens with the {extra!r} extra: pip install "purelens[{extra}]"'
)


def need(module: str, what: str) -> ModuleType:
    """`module` imported (``"rich.table"``), or a PurelensError naming the extra that brings
    it when its package is missing; `what` says what needs it (``"purelens serve"``)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        package = module.partition(".")[0]
        if error.name is None or error.name.partition(".")[0] != package:
            raise  # something the package itself imports is missing: its own error
        extra = EXTRAS[package]
        raise PurelensError(_MISSING.format(what=what, package=package, extra=extra)) from None

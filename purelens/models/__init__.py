"""Models shipped with purelens.

`load_default` returns the small GPT-2 trained by `purelens.models.train_default`
on induction and factual recall (see `purelens.models.tasks`); `pipelines` builds tiny
diffusers pipelines from configs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from . import pipelines as pipelines

__all__ = ["DEFAULT_PATH", "load", "load_default", "pipelines"]

DEFAULT_PATH = Path(__file__).parent / "default"


def load(path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """A local HF causal LM and its tokenizer, in eval mode; the bundled model by default.

    Raises:
        PurelensError: `path` holds no model that `transformers` can load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = _folder(path)
    with _no_progress_bar():
        model = AutoModelForCausalLM.from_pretrained(where).eval()
    return model, AutoTokenizer.from_pretrained(where)


_bars_lock = threading.Lock()


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """transformers' progress bars off while a small local model loads ("Loading weights"
    for a fraction of a second), on again after if they were on."""
    from transformers.utils import logging

    with _bars_lock:  # (the switch is transformers' own, for the whole process)
        was_on = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            yield
        finally:
            if was_on:
                logging.enable_progress_bar()


def _folder(path: str | Path | None) -> Path:
    """The model folder at `path` (the bundled one for None), checked to hold a model."""
    from .._errors import PurelensError

    where = Path(path).expanduser() if path is not None else DEFAULT_PATH
    if not (where / "config.json").is_file():
        raise PurelensError(
            f"no model at {str(where)!r}: expected a folder saved with save_pretrained "
            "(config.json, weights, tokenizer)."
        )
    return where


def load_default() -> tuple[nn.Module, Any]:
    """The bundled model and its tokenizer: a 2-layer GPT-2 trained on known mechanisms.

    Examples:
        >>> import purelens as pl
        >>> model, tokenizer = pl.models.load_default()
        >>> type(model).__name__, model.config.n_layer
        ('GPT2LMHeadModel', 2)
    """
    return load()

"""The exceptions purelens raises: every one is a `PurelensError`."""

from __future__ import annotations

from typing import Any

__all__ = ["GenerationEnded", "MissingSaveError", "PurelensError", "PurelensWarning", "SiteError"]


class PurelensError(Exception):
    """Base class of every error raised by purelens."""


class SiteError(PurelensError):
    """A site string that is malformed, matches no module, or matches several."""


class MissingSaveError(PurelensError, KeyError):
    """A name looked up in a `Record` that the run did not save.

    It is a `KeyError` too, so that `name in rec` and `rec.get(name)` behave as
    for any mapping.
    """

    def __str__(self) -> str:
        # KeyError.__str__ quotes its argument as a repr; show the message as written.
        return str(self.args[0]) if self.args else ""


class PurelensWarning(UserWarning):
    """Base class of every warning purelens emits (the test suite makes them errors)."""


class GenerationEnded(PurelensError):
    """Generation ended before a step that an intervention selects.

    Attributes:
        record: what the generation produced (``record.output`` holds the
            token ids, and ``record[name]`` what was saved), so that a long
            generation is not lost to the error.
    """

    record: Any = None

"""The public API is exactly what is documented, and nothing private leaks."""

from __future__ import annotations

import purelens as pl

DOCUMENTED = {
    # errors
    "PurelensError",
    "SiteError",
    # interventions
    "Intervention",
    "save",
    "patch",
    "replace",
    "add",
    "scale",
    "ablate",
    "stop",
    "skip",
    "save_grad",
    "patch_grad",
    "transplant",
    # the bundled model
    "models",
    # model surgery
    "edit",
    "shapes",
    "Shapes",
    # language models
    "generate",
    "tokenize",
    "last_token",
    "token_index",
    "at",
    # running
    "run",
    "compile",
    "Record",
    "sites",
    # batched sweeps (issue 7)
    "sweep",
    # interventions as data (issue 8)
    "dumps",
    "loads",
    "functions",
    "ops",
    "remote",
    "RemoteError",
    # inside modules (issue 14)
    "head",
    # vLLM (issue 15): pl.vllm.load
    "vllm",
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(pl.__all__) == DOCUMENTED
    assert len(pl.__all__) == len(set(pl.__all__))


def test_every_name_in_all_exists_and_has_a_docstring() -> None:
    for name in pl.__all__:
        obj = getattr(pl, name)
        assert obj.__doc__, name


def test_public_functions_have_runnable_examples() -> None:
    for name in pl.__all__:
        obj = getattr(pl, name)
        if callable(obj) and not isinstance(obj, type):
            assert ">>> " in (obj.__doc__ or ""), name


def test_errors_form_one_hierarchy() -> None:
    assert issubclass(pl.SiteError, pl.PurelensError)
    assert issubclass(pl.PurelensError, Exception)

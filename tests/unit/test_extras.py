"""purelens without its extras: what pl.run needs is all `pip install purelens` brings; what
needs an extra says which; loading the bundled model prints nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import purelens as pl
from purelens.experiments import HeadPatchingResult, LensResult, PatchingResult

EXTRA_MODULES = ("fastapi", "starlette", "uvicorn", "httpx", "matplotlib", "rich")


def test_runs_generation_and_sweeps_need_no_extra() -> None:
    # Each extra's modules made unimportable, as on a machine without them.
    code = f"""
import sys
for name in {EXTRA_MODULES!r}:
    sys.modules[name] = None
import torch, purelens as pl
from purelens.experiments import activation_patching, logit_lens
model, tok = pl.models.load_default()
ids = tok("the home of leibrund is", return_tensors="pt")["input_ids"]
rec = pl.run(model, ids, [pl.save("h.0"), pl.add("h.1", torch.ones(128))])
gen = pl.generate(model, "leibrund lives in", [pl.save("h.1")], tokenizer=tok, max_new_tokens=2)
swept = pl.sweep(model, ids, [pl.ablate("h.0"), pl.ablate("h.1")])
lens = logit_lens(model, tok, "the home of leibrund is")
patched = activation_patching(model, tok, "leibrund lives in", "bilora lives in", "lagos")
print(str(lens).splitlines()[0], str(patched).splitlines()[0], sep="|")
print(sorted(name for name in {EXTRA_MODULES!r} if sys.modules.get(name) is not None))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, loaded = done.stdout.strip().splitlines()
    assert first.startswith("logit lens") and "recovered P('lagos')" in first
    assert loaded == "[]"


@pytest.mark.parametrize(
    ("module", "extra", "call"),
    [
        ("httpx", "serve", lambda: pl.remote("http://127.0.0.1:9")),
        ("fastapi", "serve", lambda: _create_app()),
        ("rich", "plot", lambda: _patching().table()),
        ("matplotlib", "plot", lambda: _patching().plot("never.png")),
        ("matplotlib", "plot", lambda: _lens().plot("never.png")),
    ],
)
def test_a_missing_extra_is_named(
    monkeypatch: pytest.MonkeyPatch, module: str, extra: str, call: Any
) -> None:
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(pl.PurelensError, match=rf"(?s)needs {module}.*purelens\[{extra}\]"):
        call()


def test_the_command_names_the_extra_it_needs(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['rich'] = None; from purelens._cli import main; "
        "sys.exit(main(['lens', '--prompt', 'a b']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode != 0
    assert 'pip install "purelens[plot]"' in done.stderr + done.stdout


def test_loading_the_bundled_model_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging

    capfd.readouterr()
    for bars_on in (True, False):  # and transformers' switch is left as it was
        (logging.enable_progress_bar if bars_on else logging.disable_progress_bar)()
        try:
            pl.models.load_default()
            assert logging.is_progress_bar_enabled() is bars_on
        finally:
            logging.enable_progress_bar()
        out, err = capfd.readouterr()
        assert out == "" and err == ""


def test_results_print_as_tables_and_plot(tmp_path: Path) -> None:
    result = _patching()
    lines = str(result).splitlines()
    assert lines[0].startswith("recovered P('x')")
    assert lines[1].split() == ["layer", "a", "b"] and lines[3].split() == ["embed", "0.00", "1.00"]
    lens = _lens()
    assert str(lens).splitlines()[3].split() == ["h.0", "x", "(0.50)", "y", "(0.25)"]
    heads = HeadPatchingResult(["h.0", "h.1"], torch.tensor([[0.0, 0.1], [0.9, -0.05]]), -0.5, -4.0)
    assert str(heads).splitlines()[1].split() == ["layer", "head", "0", "head", "1"]
    assert str(heads).splitlines()[4].split() == ["h.1", "0.90", "-0.05"]
    assert heads.best() == (1, 0)
    made = [
        result.plot(tmp_path / "p.png"),
        lens.plot(tmp_path / "l.png"),
        heads.plot(tmp_path / "h.png"),
    ]
    for path in made:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "head 1" in _rendered(heads) and "embed" in _rendered(result)


def _rendered(result: Any) -> str:
    """What rich prints of `result` (its __rich__ table)."""
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(result)
    return console.export_text()


def _patching() -> PatchingResult:
    scores = torch.tensor([[0.0, 1.0], [0.25, 0.5]])
    return PatchingResult(["a", "b"], ["embed", "h.0"], scores, "x", 0.9, 0.1)


def _lens() -> LensResult:
    probs = torch.tensor([[0.5, 0.25], [0.75, 1.0]])
    return LensResult(["a", "b"], ["h.0", "h.1"], [["x", "y"], ["b", "c"]], probs)


def _create_app() -> Any:
    from purelens._server import create_app

    return create_app(None, tokens=["t"])


def test_patching_a_pair_with_no_difference_is_an_error() -> None:
    from purelens.experiments import activation_patching, head_patching

    model, tok = pl.models.load_default()
    with pytest.raises(pl.PurelensError, match="no difference for patching"):
        activation_patching(model, tok, "leibrund lives in", "leibrund lives in", "lagos")
    ids = tok("leibrund lives in", return_tensors="pt")["input_ids"]
    with pytest.raises(pl.PurelensError, match="no difference for patching"):
        head_patching(model, ids, ids, lambda out: out.logits[:, -1].max())

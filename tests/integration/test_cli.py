"""The `purelens` command line, on the bundled model and on any local HF model folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from purelens._cli import main
from tests.helpers import tiny_gpt2, word_tokenizer


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local HF model folder that is not the bundled model."""
    path = tmp_path_factory.mktemp("other") / "gpt2-tiny"
    model = tiny_gpt2(n_layer=2, seed=20)
    model.config.vocab_size = 97
    model.save_pretrained(path)
    tok = word_tokenizer(pad=True)
    tok.save_pretrained(path)
    return path


def test_demo_prints_a_table_and_writes_the_heatmap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recovered" in printed and "embed" in printed and "h.1" in printed
    assert "heatmap written to" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sites_lists_every_site_with_its_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sites"]) == 0
    printed = capsys.readouterr().out
    assert "transformer.h.1.mlp" in printed and "[1, 4, 128]" in printed


def test_lens_and_patch_on_another_local_model(
    other_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lens", "--model", str(other_model), "--prompt", "the cat sat"]) == 0
    assert "logit lens" in capsys.readouterr().out
    args = [
        "patch",
        "--model",
        str(other_model),
        "--clean",
        "the cat sat",
        "--corrupt",
        "the dog sat",
    ]
    assert main([*args, "--answer", "on", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["patch", "--clean", "a b c", "--corrupt", "a b", "--answer", "paris"],
            "same number of tokens",
        ),
        (
            ["patch", "--clean", "a", "--corrupt", "b", "--answer", "not-a-word"],
            "must be a single token",
        ),
        (["lens", "--model", "/nonexistent", "--prompt", "x"], "no model at '/nonexistent'"),
        (["lens"], "the following arguments are required: --prompt"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["serve", "--port", "0"], "no bearer tokens: set PURELENS_TOKENS"),
        (["serve", "--tokens-file", "/nonexistent"], "No such file or directory"),
        (["serve", "--import", "no.such.module"], "No module named 'no'"),
    ],
)
def test_bad_arguments_get_one_line_and_a_nonzero_exit(argv: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PURELENS_TOKENS"}
    done = subprocess.run(
        [sys.executable, "-m", "purelens", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
        done.stderr
    )


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import purelens

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"purelens {purelens.__version__}"


def test_help_shows_the_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # one option a line, so that no default is wrapped
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    for default in ("127.0.0.1", "8000", "8192", "256", "60.0", "64.0"):
        assert f"(default: {default})" in printed, default
    assert "(default: None)" not in printed and printed.count("(default: the bundled") == 1
    with pytest.raises(SystemExit):
        main(["sites", "--help"])
    assert "(default: the home of)" in capsys.readouterr().out


def test_serve_ray_without_ray_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as without the extra
    monkeypatch.setenv("PURELENS_TOKENS", "a-token")
    assert main(["serve", "--ray", "--port", "0"]) == 2
    printed = capsys.readouterr().err.strip()
    assert 'pip install "purelens[ray]"' in printed and len(printed.splitlines()) == 1, printed

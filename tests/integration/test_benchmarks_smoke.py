"""The benchmark scripts still run (tiny sizes): they must never rot. No timings asserted."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("[!_]*.py")))
def test_benchmark_runs_quick(
    script: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/SCRIPT.py` has it
    main = runpy.run_path(str(BENCHMARKS / script))["main"]
    main(["--quick"])
    printed = capsys.readouterr().out
    assert "Machine:" in printed and "|---" in printed
    # compare.py cross-checks every approach against raw hooks before timing it
    assert "DIFFER" not in printed

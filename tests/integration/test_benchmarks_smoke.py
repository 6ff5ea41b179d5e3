"""The benchmark scripts still run (tiny sizes): they must never rot. No timings asserted.

Each runs in a process of its own, as `python benchmarks/SCRIPT.py --quick`: the
peer libraries they import change global state (nnsight mounts a `.save` on
every object), which must not leak into the rest of the test session.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("[!_]*.py")))
def test_benchmark_runs_quick(script: str) -> None:
    if script.startswith("vllm") and importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vLLM: runs in the vLLM tests' environment (tests/vllm)")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert "Machine:" in printed and "|---" in printed
    # compare.py cross-checks every approach against raw hooks before timing it;
    # serve.py checks every record against a local run
    assert "DIFFER" not in printed

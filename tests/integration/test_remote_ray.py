"""The same app on Ray Serve, started in-process with two replicas on a local Ray."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

import purelens as pl
from purelens import ops

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.ray
PROMPTS = ["bilora lives in", "the home of"]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    from purelens._ray import ray_app
    from purelens._server import Limits

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = ray_app(tokens=["ray-token"], limits=Limits(new_tokens=8), replicas=2)
        serve.run(app, name="purelens", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_with_the_records_of_a_local_run(url: str) -> None:
    model, tokenizer = pl.models.load_default()
    processes = {httpx.get(f"{url}/v1/health").json()["process"] for _ in range(30)}
    assert len(processes) == 2  # two replicas, each its own process
    remote = pl.remote(url, "default", token="ray-token")
    ivs = [pl.save("h.0"), pl.add("h.1", torch.randn(128)), pl.patch("h.0.mlp", ops.value * 0.5)]
    assert_equal(pl.run(remote, PROMPTS, ivs), pl.run(model, PROMPTS, ivs, tokenizer=tokenizer))
    loss = ops.reduce(ops.value["logits"][:, -1], "b v -> ", "max")
    grads = [pl.save_grad("h.0")]
    got = pl.run(remote, PROMPTS, grads, loss=loss)
    want = pl.run(model, PROMPTS, grads, loss=loss, tokenizer=tokenizer)
    # A replica runs torch on one thread (Ray's OMP_NUM_THREADS=1 for its actors), which
    # sums some backward products in another order: last-bit differences (7e-7 of 2.2 here).
    torch.testing.assert_close(got.grads["h.0"], want.grads["h.0"], rtol=1e-5, atol=1e-6)
    assert torch.equal(got.loss, want.loss)
    got = pl.generate(remote, PROMPTS, [pl.save("h.1")], max_new_tokens=3)
    want = pl.generate(model, PROMPTS, [pl.save("h.1")], max_new_tokens=3, tokenizer=tokenizer)
    assert torch.equal(got.output, want.output)
    assert all(torch.equal(a, b) for a, b in zip(got["h.1"], want["h.1"], strict=True))


def test_limits_auth_and_concurrent_clients_on_ray(url: str) -> None:
    with pytest.raises(pl.RemoteError) as info:
        pl.remote(url, token="wrong")
    assert info.value.status == 401
    remote = pl.remote(url, token="ray-token")
    with pytest.raises(pl.RemoteError) as info:
        pl.generate(remote, PROMPTS, max_new_tokens=9)
    assert (info.value.status, info.value.limit) == (413, "new_tokens")

    model, tokenizer = pl.models.load_default()
    ids = pl.tokenize(tokenizer, PROMPTS)
    vectors = torch.randn(4, 10, 128, generator=torch.Generator().manual_seed(1))
    wrong: list[tuple[int, int]] = []

    def client(k: int) -> None:
        handle = pl.remote(url, token="ray-token")
        for i in range(vectors.shape[1]):
            ivs: Any = [pl.add("h.0", vectors[k, i]), pl.save("h.1", name="mine")]
            if not torch.equal(pl.run(handle, ids, ivs)["mine"], pl.run(model, ids, ivs)["mine"]):
                wrong.append((k, i))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(vectors.shape[0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def assert_equal(a: pl.Record, b: pl.Record) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(a.output.logits, b.output.logits)

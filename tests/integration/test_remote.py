"""Remote execution over real HTTP: `purelens serve`'s app under uvicorn on 127.0.0.1.

A remote run must give the record a local run gives (bitwise, on CPU), refuse
what is not data before sending it, answer every bad or hostile request with a
4xx naming what is wrong, and keep serving.
"""

from __future__ import annotations

import json
import struct
import threading
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import purelens as pl
from purelens import ops
from purelens._server import Limits, create_app
from purelens._wire import Request, encode_request
from tests.helpers import serving

TOKENS = ["alice-token", "bob-token"]
LIMITS = Limits(
    input_tokens=512,
    new_tokens=16,
    saved_bytes=256 * 2**10,
    seconds=30.0,
    request_bytes=2**20,
    elements=2**20,
)
PROMPTS = ["bilora lives in", "the home of kaithund is"]


@pl.functions.register("tests.remote.double")
def double(v: torch.Tensor) -> torch.Tensor:
    return v * 2


def _is_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def assert_same(a: Any, b: Any) -> None:
    """Bitwise equal tensors in the same structure (the KV cache aside)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict) or hasattr(a, "keys"):
        # The KV cache stays on the server (`past_key_values`, `cache` since transformers 5.2x).
        keys = [k for k in a.keys() if not _is_cache(a[k])]
        assert keys == [k for k in b.keys() if not _is_cache(b[k])]
        for k in keys:
            assert_same(a[k], b[k])
    elif isinstance(a, tuple | list):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def assert_same_record(remote_rec: pl.Record, local_rec: pl.Record) -> None:
    assert type(remote_rec) is pl.Record
    assert_same(dict(remote_rec), dict(local_rec))
    assert_same(remote_rec.output, local_rec.output)
    assert_same(dict(remote_rec.grads), dict(local_rec.grads))
    assert_same(remote_rec.loss, local_rec.loss)


# Equality with local runs ---------------------------------------------------------


def test_saves_and_patches_equal_a_local_run(remote: Any, local: Any) -> None:
    model, tokenizer = local
    first = pl.at(0)  # pl.at(-1) on a batch padded on the right would read padding
    ivs = [
        pl.save("h.0"),
        pl.add("h.0", torch.randn(128) * 0.1),
        pl.patch("h.1.mlp", double),
        pl.patch("h.1.attn", ops.where(ops.value > 0, ops.value * 0.5, ops.value)),
        pl.save("h.1", ops.reduce(ops.value, "b s d -> b d", "mean"), name="mean"),
        pl.save("lm_head", first, name="first"),
        pl.ablate("h.-1.attn", "mean"),
    ]
    for inputs in (PROMPTS, PROMPTS[0]):
        got = pl.run(remote, inputs, ivs)
        assert_same_record(got, pl.run(model, inputs, ivs, tokenizer=tokenizer))
    ids = pl.tokenize(tokenizer, PROMPTS)
    got = pl.run(remote, ids, ivs)
    assert_same_record(got, pl.run(model, ids, ivs))
    assert got.output.logits.shape == (*ids["input_ids"].shape, len(tokenizer))
    assert type(got.output).__name__ == "CausalLMOutputWithCrossAttentions"


def test_gradients_equal_a_local_run(remote: Any, local: Any) -> None:
    model, tokenizer = local
    city = tokenizer.convert_tokens_to_ids("paris")
    loss = ops.reduce(ops.value["logits"][:, -1, city], "b ->", "sum")
    ivs = [pl.save_grad("h.0"), pl.save_grad("h.1.attn"), pl.save("h.1")]
    got = pl.run(remote, PROMPTS, ivs, loss=loss)
    want = pl.run(model, PROMPTS, ivs, loss=loss, tokenizer=tokenizer)
    assert_same_record(got, want)
    assert set(got.grads) == {"h.0", "h.1.attn"} and got.loss.ndim == 0
    assert got.grads["h.0"].abs().sum() > 0


def test_generation_equals_a_local_generation(remote: Any, local: Any) -> None:
    model, tokenizer = local
    ivs = [pl.save("h.0", step=slice(0, None)), pl.add("h.1", torch.randn(128) * 0.1, step=0)]
    got = pl.generate(remote, PROMPTS, ivs, max_new_tokens=4)
    want = pl.generate(model, PROMPTS, ivs, max_new_tokens=4, tokenizer=tokenizer)
    assert_same_record(got, want)
    width = pl.tokenize(tokenizer, PROMPTS)["input_ids"].shape[1]
    assert got.output.shape == (2, width + 4) and len(got["h.0"]) == 4


def test_sites_and_shapes_come_from_the_server(remote: Any, local: Any) -> None:
    model, _ = local
    assert pl.sites(remote) == pl.sites(model)
    shapes = remote.shapes("the home of")
    assert shapes["transformer.h.0"] == {"shape": [1, 4, 128], "dtype": "float32"}


def test_functions_that_are_code_are_refused_before_sending(remote: Any) -> None:
    with pytest.raises(pl.PurelensError, match=r"purelens\.ops") as info:
        pl.run(remote, PROMPTS, [pl.patch("h.0", lambda v: v * 2)])
    assert "pl.functions.register" in str(info.value)
    with pytest.raises(pl.PurelensError, match="not registered"):
        pl.run(remote, PROMPTS, [pl.save_grad("h.0")], loss=lambda out: out.logits.sum())
    with pytest.raises(pl.PurelensError, match="weights live on the server"):
        pl.run(remote, PROMPTS, params={})
    with pytest.raises(pl.PurelensError, match="tokenizes text"):
        pl.run(remote, PROMPTS, tokenizer=object())
    for call in (
        lambda: pl.sweep(remote, PROMPTS, [pl.save("h.0")]),
        lambda: pl.shapes(remote, PROMPTS),
        lambda: pl.edit(remote, [pl.ablate("h.0")]),
    ):
        with pytest.raises(pl.PurelensError, match="needs the model in this process"):
            call()


# Auth --------------------------------------------------------------------------------


def test_requests_without_a_known_token_get_401(url: str) -> None:
    assert httpx.get(f"{url}/v1/health").json()["status"] == "ok"
    body = encode_request(Request("run", PROMPTS, []))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic alice-token"}):
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
        answer = httpx.post(f"{url}/v1/models/default/run", content=body, headers=headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    with pytest.raises(pl.RemoteError) as info:
        pl.remote(url, "default", token="nope")
    assert info.value.status == 401
    with pytest.raises(pl.RemoteError, match="serves 'default'") as info:
        pl.remote(url, "gpt-17", token=TOKENS[1])
    assert info.value.status == 404
    bob = pl.remote(url, "default", token=TOKENS[1])
    assert pl.run(bob, PROMPTS[0]).output.logits.shape[1] == 4


# Limits ------------------------------------------------------------------------------


def test_each_limit_answers_4xx_naming_it(remote: Any, url: str) -> None:
    def hit(call: Any) -> pl.RemoteError:
        with pytest.raises(pl.RemoteError) as info:
            call()
        return info.value

    tokens = hit(lambda: pl.run(remote, torch.zeros(20, 30, dtype=torch.long)))
    assert (tokens.status, tokens.limit) == (413, "input_tokens") and "600" in str(tokens)
    new = hit(lambda: pl.generate(remote, PROMPTS, max_new_tokens=17))
    assert (new.status, new.limit) == (413, "new_tokens")
    beams = hit(lambda: pl.generate(remote, [PROMPTS[0]] * 40, max_new_tokens=2, num_beams=4))
    assert beams.limit == "input_tokens"
    saved = hit(lambda: pl.run(remote, torch.zeros(16, 30, dtype=torch.long), [pl.save("h.0")]))
    assert (saved.status, saved.limit) == (413, "saved_bytes")
    big = hit(lambda: pl.run(remote, PROMPTS, [pl.add("h.0", torch.zeros(2**19))]))
    assert (big.status, big.limit) == (413, "request_bytes")
    grow = ops.value[..., None] * torch.ones(1, 4096)
    elements = hit(lambda: pl.run(remote, PROMPTS, [pl.save("h.0", grow)]))
    assert (elements.status, elements.limit) == (413, "elements")
    with serving(create_app(tokens=TOKENS, limits=Limits(seconds=1e-4))) as slow_url:
        slow = pl.remote(slow_url, token=TOKENS[0])
        timeout = hit(lambda: pl.run(slow, PROMPTS))
        assert (timeout.status, timeout.limit) == (408, "seconds")
    # After all of that, a good request still works.
    assert pl.run(remote, PROMPTS, [pl.save("h.0")])["h.0"].shape[-1] == 128


# Hostile and malformed requests -------------------------------------------------------


def raw(header: dict[str, Any], blob: bytes = b"") -> bytes:
    """A request container with any header (the client would never write these)."""
    data = json.dumps(header).encode()
    blob = blob or safetensors.torch.save({})
    return b"purelens request\n" + struct.pack("<Q", len(data)) + data + blob


def request(**fields: Any) -> dict[str, Any]:
    header = {"format": "purelens.request", "version": 1, "call": "run", "inputs": "the home of"}
    header.update(fields)
    return header


def nested(depth: int) -> Any:
    tree: Any = {"list": []}
    for _ in range(depth):
        tree = {"list": [tree]}
    return tree


def safetensors_blob(dtype: str, shape: list[int], data: bytes) -> bytes:
    meta = json.dumps({"0": {"dtype": dtype, "shape": shape, "data_offsets": [0, len(data)]}})
    meta_bytes = meta.encode()
    return struct.pack("<Q", len(meta_bytes)) + meta_bytes + data


def deep_json(depth: int) -> bytes:
    header = b'{"format":"purelens.request","version":1,"call":"run","interventions":'
    header += b"[" * depth + b"]" * depth + b"}"
    return b"purelens request\n" + struct.pack("<Q", len(header)) + header


def save_node(site: str, fn: Any) -> dict[str, Any]:
    return {"node": "save", "fields": {"site": site, "fn": fn}}


HOSTILE = {
    "pickle": b"\x80\x04\x95\x1e\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94.",
    "not a request": b"purelens interventions\n" + b"\x00" * 8,
    "header longer than the body": b"purelens request\n" + struct.pack("<Q", 2**40) + b"{}",
    "bad json": b"purelens request\n" + struct.pack("<Q", 5) + b"{oops",
    "wrong version": raw(request(version=99)),
    "unknown call": raw(request(call="exec")),
    "unknown field": raw(request(__class__="x")),
    "unknown intervention": raw(request(interventions={"list": [{"node": "eval", "fields": {}}]})),
    # found by the fuzz test below: an unhashable name was a 500
    "node named by a list": raw(request(interventions={"node": [], "fields": []})),
    "expression named by a list": raw(
        request(interventions={"list": [save_node("h.0", {"expr": [], "fields": {}})]})
    ),
    "unknown op": raw(
        request(
            interventions={
                "list": [
                    save_node(
                        "h.0",
                        {
                            "expr": "binary",
                            "fields": {
                                "op": "__import__",
                                "a": {"expr": "value", "fields": {}},
                                "b": {"expr": "value", "fields": {}},
                            },
                        },
                    )
                ]
            }
        )
    ),
    "function smuggled by name": raw(
        request(interventions={"list": [save_node("h.0", {"function": "os.system"})]})
    ),
    "dunder index": raw(
        request(
            interventions={
                "list": [
                    save_node(
                        "h.0",
                        {
                            "expr": "index",
                            "fields": {
                                "a": {"expr": "value", "fields": {}},
                                "key": {"tuple": ["__class__"]},
                            },
                        },
                    )
                ]
            }
        )
    ),
    "einops pattern with code": raw(
        request(
            interventions={
                "list": [
                    save_node(
                        "h.0",
                        {
                            "expr": "einops",
                            "fields": {
                                "a": {"expr": "value", "fields": {}},
                                "pattern": "b s d -> b; import os",
                            },
                        },
                    )
                ]
            }
        )
    ),
    "deep nesting": raw(request(interventions=nested(200))),
    "deeper than json allows": deep_json(100_000),
    "deep inputs": raw(request(inputs=nested(100))),
    "missing tensor": raw(request(inputs={"tensor": "7"})),
    "huge declared shape": raw(
        request(inputs={"tensor": "0"}),
        safetensors_blob("I64", [2**40, 2**40], b"\x00" * 8),
    ),
    "float token ids": raw(
        request(inputs={"tensor": "0"}), safetensors_blob("F32", [1, 2], b"\x00" * 8)
    ),
    "negative token ids": raw(
        request(inputs={"tensor": "0"}),
        safetensors_blob("I64", [1, 1], struct.pack("<q", -(2**40))),
    ),
    "huge token ids": raw(
        request(inputs={"tensor": "0"}), safetensors_blob("I64", [1, 1], struct.pack("<q", 2**40))
    ),
    "object as kwargs": raw(request(kwargs={"dict": [["past_key_values", {"node": "x"}]]})),
    "bad generate kwargs": raw(
        request(call="generate", kwargs={"dict": [["streamer", "x"], ["max_new_tokens", 2]]})
    ),
    "no max_new_tokens": raw(request(call="generate")),
    "site that is not a string": raw(
        request(interventions={"list": [{"node": "save", "fields": {"site": 5}}]})
    ),
    "empty body": b"",
}


# What the answer to each (at the run endpoint) must say.
EXPECTED = {
    "pickle": "no purelens header",
    "not a request": "no purelens header",
    "header longer than the body": "does not fit",
    "bad json": "not valid JSON",
    "wrong version": "format version 99",
    "unknown call": "`call` must be one of",
    "unknown field": "unknown fields ['__class__']",
    "unknown intervention": "unknown intervention 'eval'",
    "node named by a list": "unknown intervention []",
    "expression named by a list": "unknown expression []",
    "unknown op": "unknown operation '__import__'",
    "function smuggled by name": "no function is registered under 'os.system'",
    "dunder index": "got '__class__'",
    "einops pattern with code": "an einops pattern uses",
    "deep nesting": "nested deeper than 64",
    "deeper than json allows": "not valid JSON",
    "deep inputs": "nested deeper than 64",
    "missing tensor": "'tensor' with '7' is not allowed",
    "huge declared shape": "tensors are unreadable",
    "float token ids": "the run failed: RuntimeError",
    "negative token ids": "the run failed: IndexError",
    "huge token ids": "the run failed: IndexError",
    "object as kwargs": "'node' with 'x' is not allowed",
    "bad generate kwargs": "a 'generate' request was sent to the 'run' endpoint",
    "no max_new_tokens": "a 'generate' request was sent to the 'run' endpoint",
    "site that is not a string": "a site is a string",
    "empty body": "no purelens header",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_requests_get_4xx_and_the_server_keeps_serving(
    url: str, remote: Any, name: str
) -> None:
    headers = {"Authorization": f"Bearer {TOKENS[0]}"}
    for endpoint in ("run", "generate"):
        answer = httpx.post(
            f"{url}/v1/models/default/{endpoint}", content=HOSTILE[name], headers=headers
        )
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
        if endpoint == "run":
            assert EXPECTED[name] in answer.json()["error"], answer.text
    assert pl.run(remote, PROMPTS[0]).output.logits.shape == (1, 4, 344)


def valid_request() -> bytes:
    ivs = [pl.save("h.0"), pl.add("h.1", torch.ones(128)), pl.patch("h.0", ops.value * 2)]
    return encode_request(Request("run", PROMPTS, ivs))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda data, cuts: _mutate(data, cuts),
            st.just(b""),
            st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
        ),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["list", "tuple", "node", "fields", "expr", "tensor", "dict"]),
                    inner,
                    max_size=3,
                )
            ),
            max_leaves=20,
        ).map(lambda tree: raw(request(interventions=tree, inputs=tree))),
    )
)
def test_fuzzed_requests_never_break_the_server(url: str, payload: bytes) -> None:
    headers = {"Authorization": f"Bearer {TOKENS[1]}"}
    answer = httpx.post(f"{url}/v1/models/default/run", content=payload, headers=headers)
    assert answer.status_code < 500, answer.text
    assert httpx.get(f"{url}/v1/health").status_code == 200


def _mutate(_: bytes, cuts: list[tuple[int, int]]) -> bytes:
    data = bytearray(valid_request())
    for where, byte in cuts:
        data[where % len(data)] = byte
    return bytes(data)


# Isolation under load -------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_concurrent_users_each_get_their_own_correct_records(local: Any, concurrency: int) -> None:
    """8 clients x 50 requests, each with its own steering vector; every record is checked.

    With ``concurrency=4`` the server runs up to four requests on its model at
    once, in threads: each still sees only its own interventions.
    """
    with serving(create_app(tokens=TOKENS, concurrency=concurrency)) as url:
        assert_load(url, local)


def assert_load(url: str, local: Any) -> None:
    model, tokenizer = local
    ids = pl.tokenize(tokenizer, PROMPTS)
    clients, per_client = 8, 50
    vectors = torch.randn(clients, per_client, 128, generator=torch.Generator().manual_seed(0))
    errors: list[str] = []
    done = [0]

    def client(k: int) -> None:
        with pl.remote(url, "default", token=TOKENS[k % 2]) as handle:
            for i in range(per_client):
                ivs = [pl.add("h.0", vectors[k, i]), pl.save("h.1", name="mine")]
                try:
                    got = pl.run(handle, ids, ivs)
                except pl.PurelensError as e:  # a failed request is an error too, not a pass
                    errors.append(f"client {k} request {i}: {e}")
                    continue
                want = pl.run(model, ids, ivs)
                if not torch.equal(got["mine"], want["mine"]):
                    errors.append(f"client {k} request {i}")
                done[0] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors[:5] == [] and done[0] == clients * per_client

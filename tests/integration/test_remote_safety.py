"""A server no request can subvert, and a client that never fails with a raw error.

Regressions of issue 13: requests that changed the served weights, bypassed
the token limit, hung a worker, or broke concurrent runs; a client that
raised raw errors on a single intervention, inside torch.func, or on a
broken server's answer.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

import purelens as pl
from purelens import ops
from purelens._server import Limits, create_app
from purelens._wire import Request, encode_request
from tests.helpers import serving
from tests.integration.test_remote import (
    PROMPTS,
    TOKENS,
    assert_same_record,
    raw,
    request,
)

HEADERS = {"Authorization": f"Bearer {TOKENS[0]}"}


def post(url: str, body: bytes, endpoint: str = "run", timeout: float = 10.0) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/models/default/{endpoint}", content=body, headers=HEADERS, timeout=timeout
    )


# Keyword arguments are data the model takes, nothing else -----------------------------


def test_run_kwargs_cannot_swap_the_served_weights(url: str, remote: Any, local: Any) -> None:
    model, tokenizer = local
    weights = {"transformer.wte.weight": torch.zeros_like(model.transformer.wte.weight)}
    for kwargs in ({"params": weights}, {"tokenizer": "gpt2"}, {"streamer": 1}):
        body = encode_request(Request("run", PROMPTS, [pl.save("h.0")], kwargs=kwargs))
        answer = post(url, body)
        assert answer.status_code == 400, answer.text[:300]
        error = answer.json()["error"]
        assert repr(next(iter(kwargs))) in error and "attention_mask" in error, error
    # The weights are the served ones still.
    got = pl.run(remote, PROMPTS, [pl.save("h.0")])
    assert_same_record(got, pl.run(model, PROMPTS, [pl.save("h.0")], tokenizer=tokenizer))


def test_model_kwargs_that_are_data_still_travel(remote: Any, local: Any) -> None:
    model, tokenizer = local
    ids = pl.tokenize(tokenizer, PROMPTS)
    kwargs = {"attention_mask": ids["attention_mask"], "output_hidden_states": True}
    got = pl.run(remote, {"input_ids": ids["input_ids"]}, [pl.save("h.0")], **kwargs)
    want = pl.run(model, {"input_ids": ids["input_ids"]}, [pl.save("h.0")], **kwargs)
    assert_same_record(got, want)


@pytest.mark.parametrize("name", ["input_ids", "inputs_embeds"])
def test_token_limit_counts_the_keyword_arguments_too(remote: Any, name: str) -> None:
    value = torch.zeros(20, 30, dtype=torch.long)  # 600 positions, over the limit of 512
    if name == "inputs_embeds":
        value = torch.zeros(20, 30, 128)
    with pytest.raises(pl.RemoteError) as info:
        pl.run(remote, {}, **{name: value})
    assert (info.value.status, info.value.limit) == (413, "input_tokens"), info.value
    assert "600" in str(info.value)


# Decoding is checked, bounded and timed --------------------------------------------------


def transplant(**fields: Any) -> bytes:
    node = {"node": "transplant", "fields": {"site": "h.0", **fields}}
    return raw(request(interventions={"list": [node]}))


EXPRESSION = {"expr": "value", "fields": {}}
BAD_TRANSPLANTS = {
    "src an expression": {"src": EXPRESSION, "dst": {"list": [1]}},
    "dst an expression": {"src": 0, "dst": EXPRESSION},
    "src a string": {"src": "01", "dst": {"list": [1]}},
    "src an int, no dst": {"src": 3},
    "src a float": {"src": {"float": "1.5"}, "dst": {"list": [1]}},
    "src null": {"src": None, "dst": {"list": [1]}},
}


@pytest.mark.parametrize("name", sorted(BAD_TRANSPLANTS))
def test_transplants_with_bad_rows_are_refused_quickly(url: str, remote: Any, name: str) -> None:
    payload = transplant(**BAD_TRANSPLANTS[name])
    assert len(payload) < 400
    start = time.monotonic()
    answer = post(url, payload, timeout=10.0)
    assert answer.status_code == 400, answer.text[:300]
    assert time.monotonic() - start < 5.0
    assert pl.run(remote, PROMPTS[0]).output.logits.shape == (1, 4, 344)


def test_the_time_limit_covers_decoding() -> None:
    # Many interventions take longer than 0.1 ms to decode; the inputs are bad, so
    # without a deadline on decoding this would be a 400 after decoding.
    ivs = [pl.save("h.0", ops.value * 2 + 1, name=f"s{i}") for i in range(500)]
    body = encode_request(Request("run", [[1, 2], [3]], ivs))
    with serving(create_app(tokens=TOKENS, limits=Limits(seconds=1e-4))) as url:
        answer = post(url, body)
    assert answer.status_code == 408, answer.text[:300]
    assert answer.json()["limit"] == "seconds"


def test_dict_inputs_take_the_same_allow_list_as_keyword_arguments(url: str, local: Any) -> None:
    _, tokenizer = local
    ids = pl.tokenize(tokenizer, PROMPTS)["input_ids"]
    body = encode_request(Request("run", {"input_ids": ids, "params": {"x": ids}}, []))
    answer = post(url, body)
    assert answer.status_code == 400 and "'params'" in answer.json()["error"], answer.text


@pl.functions.register("tests.remote_safety.slow")
def slow(v: torch.Tensor) -> torch.Tensor:
    """A patch that outlasts a short deadline (which passes inside it)."""
    time.sleep(0.3)
    return v


@pytest.mark.parametrize("many", [True, False])
def test_a_deadline_during_validation_is_a_deadline(local: Any, many: bool) -> None:
    # It was wrapped as "could not run the model on fake tensors" (422): always where the
    # deadline was met between interventions, and (many=False) where the check before
    # every module met it, which raised an unmarked Timeout.
    _, tokenizer = local
    ids = pl.tokenize(tokenizer, PROMPTS)["input_ids"]
    ivs = (
        [pl.patch("h.0", ops.value * 1.0) for _ in range(2000)] if many else [pl.patch("h.0", slow)]
    )
    body = encode_request(Request("run", ids, ivs, validate=True))
    with serving(create_app(tokens=TOKENS, limits=Limits(seconds=0.2 if many else 0.1))) as url:
        answer = post(url, body, timeout=60)
    assert answer.status_code == 408 and answer.json()["limit"] == "seconds", answer.text[:300]


REACHED: list[int] = []


@pl.functions.register("tests.remote_safety.reached")
def reached(v: torch.Tensor) -> torch.Tensor:
    """A patch that records, in this process (the test's own server), that it ran."""
    REACHED.append(1)
    return v


def test_saved_values_are_bounded_while_the_run_saves_them(local: Any) -> None:
    # The saved_bytes limit was checked after the run: 2000 copies of an activation took
    # a gigabyte of the shared server's memory first.
    _, tokenizer = local
    ids = pl.tokenize(tokenizer, PROMPTS)["input_ids"]
    ivs = [pl.save("h.0", torch.clone, name=f"s{i}") for i in range(200)]
    body = encode_request(Request("run", ids, [*ivs, pl.patch("h.0", reached)]))
    REACHED.clear()
    with serving(create_app(tokens=TOKENS, limits=Limits(saved_bytes=2**16))) as url:
        answer = post(url, body)
    assert answer.status_code == 413 and answer.json()["limit"] == "saved_bytes", answer.text
    assert not REACHED  # it stopped at the first save over the budget, before the patch


def test_the_time_limit_holds_between_interventions_and_inside_expressions(local: Any) -> None:
    # The deadline was checked before modules only: heavy ops expressions at one site ran on.
    _, tokenizer = local
    ids = pl.tokenize(tokenizer, PROMPTS)["input_ids"]
    heavy = ops.value[None] * torch.ones(300, 1, 1, 1)  # 300 copies of the value...
    for _ in range(10):
        heavy = ops.unary("tanh", heavy * 1.0001)  # ...worked on again and again
    ivs = [pl.save("h.0", heavy, name=f"s{i}") for i in range(40)]
    body = encode_request(Request("run", ids, [*ivs, pl.patch("h.0", reached)]))
    REACHED.clear()
    with serving(create_app(tokens=TOKENS, limits=Limits(seconds=0.05))) as url:
        answer = post(url, body, timeout=60)
    assert answer.status_code == 408 and answer.json()["limit"] == "seconds", answer.text
    assert not REACHED  # it stopped between the saves at h.0, before the patch there


# Describing shapes shares the gate and the deadline of runs --------------------------


# With requests at once, pl.shapes must not swap the shared model's parameters for fake
# tensors (issue 13, item 2; purelens._validate).
@pytest.mark.parametrize("concurrency", [1, 4])
def test_shapes_requests_beside_runs_leave_every_run_right(local: Any, concurrency: int) -> None:
    model, tokenizer = local
    ids = pl.tokenize(tokenizer, PROMPTS)
    ivs = [pl.save("h.1", name="mine")]
    want = pl.run(model, ids, ivs)["mine"]
    errors: list[str] = []
    runs = [0]
    stop = time.monotonic() + 3.0

    def shapes(address: str) -> None:
        with httpx.Client(headers=HEADERS, timeout=30) as client:
            while time.monotonic() < stop:
                answer = client.get(f"{address}/v1/models/default", params={"prompt": "a b c"})
                if answer.status_code != 200:
                    errors.append(f"shapes: {answer.status_code} {answer.text[:200]}")

    def runner(address: str) -> None:
        with pl.remote(address, token=TOKENS[1]) as handle:
            while time.monotonic() < stop:
                try:
                    got = pl.run(handle, ids, ivs)["mine"]
                except pl.RemoteError as e:
                    errors.append(f"run: {e}")
                    continue
                runs[0] += 1
                if not torch.equal(got, want):
                    errors.append("run: a wrong record")

    with serving(create_app(tokens=TOKENS, concurrency=concurrency)) as address:
        threads = [threading.Thread(target=shapes, args=(address,)) for _ in range(2)]
        threads += [threading.Thread(target=runner, args=(address,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors[:5] == [] and runs[0] > 0


# The client ------------------------------------------------------------------------------


def test_a_single_intervention_runs_remotely_as_locally(remote: Any, local: Any) -> None:
    model, tokenizer = local
    iv = pl.save("h.0")
    assert_same_record(pl.run(remote, PROMPTS, iv), pl.run(model, PROMPTS, iv, tokenizer=tokenizer))
    got = pl.generate(remote, PROMPTS, iv, max_new_tokens=2)
    want = pl.generate(model, PROMPTS, iv, max_new_tokens=2, tokenizer=tokenizer)
    assert_same_record(got, want)
    with pytest.raises(pl.PurelensError, match="must hold purelens interventions"):
        pl.run(remote, PROMPTS, [pl.save("h.0"), "h.1"])


def test_torch_clone_travels_to_the_server(remote: Any, local: Any) -> None:
    model, tokenizer = local
    ivs = [pl.save("h.0", torch.clone), pl.patch("h.1.mlp", torch.zeros_like)]
    got = pl.run(remote, PROMPTS, ivs)
    assert_same_record(got, pl.run(model, PROMPTS, ivs, tokenizer=tokenizer))


def test_remote_models_refuse_torch_func_transforms(remote: Any, local: Any) -> None:
    _, tokenizer = local
    ids = pl.tokenize(tokenizer, PROMPTS)

    def logits(v: torch.Tensor) -> torch.Tensor:
        return pl.run(remote, ids, [pl.add("h.0", v)]).output.logits

    with pytest.raises(pl.PurelensError, match=r"(?s)torch\.func.*vmap"):
        torch.func.vmap(logits)(torch.zeros(2, 128))
    with pytest.raises(pl.PurelensError, match=r"torch\.func"):
        torch.func.grad(lambda v: logits(v).sum())(torch.zeros(128))
    with pytest.raises(pl.PurelensError, match=r"torch\.func"):
        torch.func.vmap(
            lambda v: pl.generate(remote, ids, [pl.add("h.0", v)], max_new_tokens=1).output
        )(torch.zeros(2, 128))


def test_remote_models_refuse_tensors_that_autograd_records(remote: Any, local: Any) -> None:
    # Gradients through a remote run were silently zero (the answer has no autograd history).
    _, tokenizer = local
    ids = pl.tokenize(tokenizer, PROMPTS)
    v = torch.zeros(128, requires_grad=True)
    with pytest.raises(pl.PurelensError, match="requires gradients"):
        pl.run(remote, ids, [pl.add("h.1", v)])
    with pytest.raises(pl.PurelensError, match="requires gradients"):
        torch.autograd.functional.jacobian(
            lambda d: pl.run(remote, ids, [pl.add("h.1", d)]).output.logits[0, -1, 5],
            torch.zeros(128),
        )
    with torch.no_grad():  # nothing recorded: fine
        assert pl.run(remote, ids, [pl.add("h.1", v)]).output.logits.shape[0] == 2
    with pytest.raises(pl.RemoteError, match="max_new_tokens") as info:
        pl.generate(remote, ids)  # the server needs a bound; it says so (a TypeError before)
    assert info.value.status == 400


def record_bytes(header: dict[str, Any]) -> bytes:
    data = json.dumps({"format": "purelens.record", "version": 1, **header}).encode()
    return b"purelens record\n" + struct.pack("<Q", len(data)) + data + safetensors.torch.save({})


BROKEN_ANSWERS = {
    "bad model-output fields": record_bytes(
        {
            "saved": {"dict": []},
            "output": {
                "model_output": ["transformers.modeling_outputs", "CausalLMOutput"],
                "fields": {"no_such_field": 1},
            },
            "grads": {"dict": []},
            "loss": None,
        }
    ),
    "saved values not a mapping": record_bytes({"saved": 3, "grads": {"dict": []}}),
    "not a record": b"<html>hello</html>",
}


@pytest.mark.parametrize("name", sorted(BROKEN_ANSWERS))
def test_a_broken_servers_answer_is_a_remote_error(name: str) -> None:
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()

    @app.get("/v1/models/default")
    def describe() -> dict[str, Any]:
        return {"name": "default", "sites": []}

    @app.post("/v1/models/default/run")
    def run() -> Response:
        return Response(BROKEN_ANSWERS[name], media_type="application/vnd.purelens")

    with serving(app) as address, pl.remote(address, token="t") as handle:
        with pytest.raises(pl.RemoteError, match="answer could not be read") as info:
            pl.run(handle, PROMPTS)
    assert info.value.status == 200

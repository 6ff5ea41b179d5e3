"""purelens.ops: functions as data, evaluated by a small interpreter, sent through pl.dumps."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import purelens as pl
from purelens import ops
from tests.helpers import TinyMLP


def roundtrip(expr: ops.Expr) -> ops.Expr:
    return pl.loads(pl.dumps([pl.patch("layers.0", expr)]))[0].fn


def test_expressions_compute_what_torch_computes() -> None:
    v = torch.randn(2, 3, 4)
    rows = torch.tensor([1, 0])
    mask = v > 0
    cases = [
        (ops.value * 2 + 1, v * 2 + 1),
        (1 - ops.value / 4, 1 - v / 4),
        (-(ops.value**2), -(v**2)),
        (ops.value[:, -1], v[:, -1]),
        (ops.value[rows, ..., None], v[rows, ..., None]),
        (ops.value[:, 1:3, ::2], v[:, 1:3, ::2]),
        (ops.where(mask, ops.value, 0.0), torch.where(mask, v, torch.tensor(0.0))),
        (ops.unary("relu", ops.value) + ops.unary("tanh", ops.value), v.relu() + v.tanh()),
        (ops.rearrange(ops.value, "b s d -> s b d"), v.transpose(0, 1)),
        (ops.reduce(ops.value, "b s d -> b d", "mean"), v.mean(1)),
        (ops.rearrange(ops.value, "b s (h e) -> b s h e", h=2), v.view(2, 3, 2, 2)),
    ]
    for expr, want in cases:
        assert torch.equal(expr(v), want), expr
        assert torch.equal(roundtrip(expr)(v), want), expr


def test_in_a_run_an_expression_acts_like_the_function_it_describes() -> None:
    model, x = TinyMLP(), torch.randn(3, 4)
    steer = torch.randn(8)
    expr = ops.where(ops.saved("layers.0") > 0, ops.value + steer, ops.value * 0.5)
    ivs = [pl.save("layers.0"), pl.patch("layers.1", expr)]
    want = pl.run(
        model,
        x,
        [
            pl.save("layers.0"),
            pl.patch("layers.1", lambda v, s: torch.where(s["layers.0"] > 0, v + steer, v * 0.5)),
        ],
    )
    assert expr.takes_saved
    for loaded in (ivs, pl.loads(pl.dumps(ivs))):
        assert torch.equal(pl.run(model, x, loaded).output, want.output)


def forge(tree: object) -> bytes:
    from safetensors.torch import save

    data = json.dumps({"format": "purelens.interventions", "version": 1, "tree": tree}).encode()
    return (
        b"purelens interventions\n"
        + struct.pack("<Q", len(data))
        + data
        + save({"0": torch.zeros(2)})
    )


def patch_with(expr: object) -> bytes:
    return forge({"list": [{"node": "patch", "fields": {"site": "a", "fn": expr}}]})


VALUE = {"expr": "value", "fields": {}}


@pytest.mark.parametrize(
    "expr",
    [
        {"expr": "lambda", "fields": {}},
        {"expr": "binary", "fields": {"op": "system", "a": VALUE, "b": VALUE}},
        {"expr": "binary", "fields": {"op": "add", "a": 5, "b": VALUE}},
        {"expr": "unary", "fields": {"op": "__import__", "a": VALUE}},
        {"expr": "einops", "fields": {"a": VALUE, "pattern": "b s; import os"}},
        {"expr": "einops", "fields": {"a": VALUE, "pattern": "b -> b", "reduction": "eval"}},
        {"expr": "index", "fields": {"a": VALUE, "key": {"tuple": ["__class__"]}}},
        {"expr": "saved", "fields": {"name": {"list": []}}},
        {"expr": "value", "fields": {"code": "1"}},
    ],
)
def test_expressions_that_are_not_allowed_are_refused(expr: object) -> None:
    with pytest.raises(pl.PurelensError):
        pl.loads(patch_with(expr))


def test_huge_expressions_are_refused() -> None:
    expr: object = VALUE
    for _ in range(10):  # a balanced tree of 2**10 leaves, nested only 10 deep
        expr = {"expr": "binary", "fields": {"op": "add", "a": expr, "b": expr}}
    with pytest.raises(pl.PurelensError, match="at most"):
        pl.loads(patch_with(expr))


def exprs() -> st.SearchStrategy[ops.Expr]:
    leaves = st.just(ops.value) | st.floats(-2, 2).map(ops.const)
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.tuples(st.sampled_from(["add", "sub", "mul", "maximum"]), inner, inner).map(
                lambda t: ops.Binary(*t)
            ),
            st.tuples(st.sampled_from(["neg", "tanh", "relu", "abs"]), inner).map(
                lambda t: ops.unary(*t)
            ),
            inner.map(lambda e: ops.where(ops.value > 0, e, ops.value)),
        ),
        max_leaves=10,
    )


@settings(max_examples=100, deadline=None)
@given(exprs())
def test_any_expression_round_trips_and_evaluates_the_same(expr: ops.Expr) -> None:
    v = torch.linspace(-1, 1, 6).view(2, 3)
    got, want = torch.as_tensor(roundtrip(expr)(v)), torch.as_tensor(expr(v))
    assert torch.equal(got, want)


def test_a_loss_reads_fields_of_the_model_output() -> None:
    from tests.helpers import tiny_gpt2

    model, x = tiny_gpt2(n_layer=2), torch.randint(0, 97, (2, 5))
    expr = ops.reduce(ops.value["logits"][:, -1, 7], "b ->", "sum")
    by_expr = pl.run(model, x, [pl.save_grad("h.0")], loss=roundtrip(expr))
    by_lambda = pl.run(model, x, [pl.save_grad("h.0")], loss=lambda o: o.logits[:, -1, 7].sum())
    assert torch.equal(by_expr.grads["h.0"], by_lambda.grads["h.0"])
    assert torch.equal(by_expr.loss, by_lambda.loss)
    for name in ("__class__", "_secret", "a-b", ""):
        with pytest.raises(pl.PurelensError, match="field name"):
            ops.value[name]


def test_limit_elements_refuses_results_before_computing_them() -> None:
    v = torch.ones(10, 10)
    grow = [
        ops.value[..., None] * torch.ones(1, 1, 100),
        ops.where(torch.ones(100, 1, 1, dtype=torch.bool), ops.value, 0.0),
        ops.value[torch.zeros(100, dtype=torch.long)],
    ]
    for expr in grow:
        assert expr(v).numel() >= 1000  # no limit outside the context
        with ops.limit_elements(999), pytest.raises(ops.ElementLimitError, match="limit of 999"):
            roundtrip(expr)(v)
    with ops.limit_elements(100):
        assert torch.equal((ops.value * 2)(v), v * 2)  # within the limit


@pytest.mark.parametrize("expr", [ops.value, ops.value * 2, ops.saved("x")[0], ops.const(1.0)])
def test_expressions_are_not_iterable(expr: ops.Expr) -> None:
    # `__getitem__` builds a new expression for any int, so iterating would never end.
    with pytest.raises(pl.PurelensError, match="not iterable") as info:
        next(iter(expr))
    assert isinstance(info.value, TypeError)
    with pytest.raises(pl.PurelensError, match="not iterable"):
        list(expr)


def test_the_element_limit_counts_every_result_of_one_expression() -> None:
    # Each result was checked alone, so nested ones (all alive at once) had no bound.
    big = ops.value[:, None] * torch.ones(1, 100)  # 1,000 elements from 10
    nested = big + (big + (big + big))
    with ops.limit_elements(2_500):
        assert big(torch.ones(10)).shape == (10, 100)
        with pytest.raises(ops.ElementLimitError, match="results of one expression"):
            nested(torch.ones(10))

"""Composition with torch.func on a tiny MLP: vmap, grad, jacrev, vmap(grad)."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacrev, vmap

import purelens as pl
from tests.helpers import TinyMLP


def steered(mlp: TinyMLP, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return pl.run(mlp, x, [pl.add("0", v)]).output


def test_vmap_over_steering_vectors_equals_a_loop(mlp: TinyMLP) -> None:
    x, vs = torch.randn(2, 4), torch.randn(64, 8)
    batched = vmap(lambda v: steered(mlp, x, v))(vs)
    looped = torch.stack([steered(mlp, x, v) for v in vs])
    assert batched.shape == (64, 2, 3) and torch.allclose(batched, looped, atol=1e-6)


def test_vmap_over_whole_interventions(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4)
    ivs = [pl.add("0", torch.randn(5, 8)), pl.scale("2", torch.randn(5, 1, 1))]
    recs = vmap(lambda ivs: pl.run(mlp, x, [*ivs, pl.save("1")]))(ivs)
    for k in range(5):
        one = pl.run(
            mlp, x, [pl.add("0", ivs[0].delta[k]), pl.scale("2", ivs[1].factor[k]), pl.save("1")]
        )
        assert torch.allclose(recs["1"][k], one["1"], atol=1e-6)
        assert torch.allclose(recs.output[k], one.output, atol=1e-6)


def test_vmap_over_inputs(mlp: TinyMLP) -> None:
    xs = torch.randn(7, 3, 4)
    recs = vmap(lambda x: pl.run(mlp, x, [pl.save("1"), pl.ablate("0", "mean")]))(xs)
    for k in range(7):
        one = pl.run(mlp, xs[k], [pl.save("1"), pl.ablate("0", "mean")])
        assert torch.allclose(recs["1"][k], one["1"], atol=1e-6)


def finite_difference(f, v: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = torch.zeros_like(v)
    for i in range(v.numel()):
        e = torch.zeros_like(v).flatten()
        e[i] = eps
        e = e.view_as(v)
        out.view(-1)[i] = (f(v + e) - f(v - e)) / (2 * eps)
    return out


def test_grad_with_respect_to_a_steering_vector(mlp: TinyMLP) -> None:
    mlp = mlp.double()
    x = torch.randn(2, 4, dtype=torch.float64)

    def f(v: torch.Tensor) -> torch.Tensor:
        return pl.run(mlp, x, [pl.add("0", v)]).output[0, 1]

    v = torch.randn(8, dtype=torch.float64)
    assert torch.allclose(grad(f)(v), finite_difference(f, v), atol=1e-6)


def test_grad_through_a_saved_value_and_batch_patch(mlp: TinyMLP) -> None:
    mlp = mlp.double()
    x = torch.randn(3, 4, dtype=torch.float64)

    def f(v: torch.Tensor) -> torch.Tensor:
        rec = pl.run(mlp, x, [pl.add("0", v, batch=[0, 2]), pl.save("1")])
        return rec["1"].pow(2).sum()

    v = torch.randn(8, dtype=torch.float64)
    assert torch.allclose(grad(f)(v), finite_difference(f, v), atol=1e-6)


def test_jacrev_and_vmap_of_grad(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4)
    vs = torch.randn(6, 8)
    jac = jacrev(lambda v: steered(mlp, x, v)[0])(vs[0])
    assert jac.shape == (3, 8)
    grads = vmap(grad(lambda v: steered(mlp, x, v)[0, 0]))(vs)
    for k in range(6):
        assert torch.allclose(
            grads[k], jacrev(lambda v: steered(mlp, x, v)[0, 0])(vs[k]), atol=1e-6
        )


def test_grad_with_respect_to_params(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4)
    params = {k: v.detach() for k, v in mlp.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return pl.run(mlp, x, [pl.scale("1", 2.0)], params=p).output.sum()

    g = grad(loss)(params)
    mlp.zero_grad()
    pl.run(mlp, x, [pl.scale("1", 2.0)]).output.sum().backward()
    for name, p in mlp.named_parameters():
        assert torch.allclose(g[name], p.grad, atol=1e-6), name


def test_jacrev_with_respect_to_params_and_intervention_leaves(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4)
    params = {k: v.detach() for k, v in mlp.named_parameters()}
    iv = pl.add("0", torch.zeros(8))

    def f(p: dict[str, torch.Tensor], iv: pl.Intervention) -> torch.Tensor:
        return pl.run(mlp, x, [iv], params=p).output[0]

    jac_p, jac_iv = jacrev(f, argnums=(0, 1))(params, iv)
    assert jac_p["layers.2.bias"].shape == (3, 3)
    assert torch.allclose(jac_p["layers.2.bias"], torch.eye(3))
    assert isinstance(jac_iv, pl.Intervention) and jac_iv.delta.shape == (3, 8)
    assert torch.allclose(jac_iv.delta, jacrev(lambda v: steered(mlp, x, v)[0])(torch.zeros(8)))


def test_params_equal_functional_call_with_tied_weights_buffers_and_vmap() -> None:
    from tests.helpers import tiny_gpt2

    model = tiny_gpt2(n_layer=1)
    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    wte = torch.randn(97, 32) * 0.02  # tied to lm_head.weight: one name replaces both
    params = {"transformer.wte.weight": wte, "transformer.h.0.ln_1.bias": torch.ones(32)}
    want = torch.func.functional_call(model, params, (x,)).logits
    assert torch.allclose(pl.run(model, x, params=params).output.logits, want, atol=1e-6)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return pl.run(model, x, params=p).output.logits.square().mean()

    def reference(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, p, (x,)).logits.square().mean()

    got, expected = torch.func.grad(loss)(params), torch.func.grad(reference)(params)
    for name in params:
        assert torch.allclose(got[name], expected[name], atol=1e-6)
    stacked = {"transformer.wte.weight": torch.stack([wte, 2 * wte])}
    ensemble = vmap(lambda p: pl.run(model, x, params=p).output.logits)(stacked)
    assert torch.allclose(
        ensemble[1],
        pl.run(model, x, params={"transformer.wte.weight": 2 * wte}).output.logits,
        atol=1e-5,
    )
    with pytest.raises(pl.PurelensError, match="ties them"):
        pl.run(model, x, params={"transformer.wte.weight": wte, "lm_head.weight": wte.clone()})


def test_a_runs_functions_see_the_models_own_params(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4)
    zeros = {n: torch.zeros_like(p) for n, p in mlp.named_parameters()}
    inner = {}

    def patch(v: torch.Tensor) -> torch.Tensor:
        inner["out"] = mlp(x)  # the model, not the run's params
        return v

    rec = pl.run(mlp, x, [pl.patch("0", patch)], params=zeros)
    assert torch.equal(inner["out"], mlp(x)) and bool((rec.output == 0).all())

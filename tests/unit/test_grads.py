"""Gradients: save_grad, patch_grad and run(..., loss=)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import purelens as pl
from tests.helpers import TinyMLP


@pytest.fixture
def mlp64(mlp: TinyMLP) -> TinyMLP:
    return mlp.double()


@pytest.fixture
def x64() -> torch.Tensor:
    return torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def head_loss(out: torch.Tensor) -> torch.Tensor:
    return (out[:, 0] * torch.arange(1.0, out.shape[0] + 1, dtype=out.dtype)).sum()


def by_hand(mlp: TinyMLP, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """d(head_loss)/d(each layer's output and the input), with plain autograd."""
    x = x.clone().requires_grad_(True)
    hs = []
    h = x
    for layer in mlp.layers:
        h = layer(h)
        h.retain_grad()
        hs.append(h)
    grads = torch.autograd.grad(head_loss(h), [x, *hs])
    return {"input": grads[0], **{str(i): g for i, g in enumerate(grads[1:])}}


def test_save_grad_equals_plain_autograd(mlp64: TinyMLP, x64: torch.Tensor) -> None:
    expected = by_hand(mlp64, x64)
    ivs = [
        pl.save_grad("0"),
        pl.save_grad("1"),
        pl.save_grad("2"),
        pl.save_grad("0:input", name="in"),
    ]
    rec = pl.run(mlp64, x64, ivs, loss=head_loss)
    for name in ("0", "1", "2"):
        assert torch.allclose(rec.grads[name], expected[name]), name
    assert torch.allclose(rec.grads["in"], expected["input"])
    assert torch.allclose(rec.loss, head_loss(mlp64(x64)))


def test_save_grad_matches_finite_differences(mlp64: TinyMLP, x64: torch.Tensor) -> None:
    rec = pl.run(mlp64, x64, [pl.save_grad("1"), pl.save("1")], loss=head_loss)
    h = rec["1"]
    eps = 1e-6
    for index in [(0, 0), (1, 3), (2, 7)]:
        e = torch.zeros_like(h)
        e[index] = eps
        up = pl.run(mlp64, x64, [pl.replace("1", h + e)]).output
        down = pl.run(mlp64, x64, [pl.replace("1", h - e)]).output
        fd = (head_loss(up) - head_loss(down)) / (2 * eps)
        assert torch.allclose(rec.grads["1"][index], fd, atol=1e-7), index


def test_save_grad_keeps_the_selected_rows(mlp64: TinyMLP, x64: torch.Tensor) -> None:
    full = pl.run(mlp64, x64, [pl.save_grad("1")], loss=head_loss).grads["1"]
    rows = pl.run(mlp64, x64, [pl.save_grad("1", batch=[2, 0])], loss=head_loss).grads["1"]
    assert torch.equal(rows, full[[2, 0]])


def test_patch_grad_changes_what_upstream_receives(mlp64: TinyMLP, x64: torch.Tensor) -> None:
    expected = by_hand(mlp64, x64)
    rec = pl.run(
        mlp64,
        x64,
        [pl.save_grad("0"), pl.patch_grad("1", lambda g: g * 3), pl.save_grad("1")],
        loss=head_loss,
    )
    # save_grad on the patched site reports the gradient as it arrives, before the patch.
    assert torch.allclose(rec.grads["1"], expected["1"])
    assert torch.allclose(rec.grads["0"], expected["0"] * 3)


def test_patch_grad_with_batch_and_in_list_order(mlp64: TinyMLP, x64: torch.Tensor) -> None:
    expected = by_hand(mlp64, x64)
    rec = pl.run(
        mlp64,
        x64,
        [
            pl.patch_grad("1:input", lambda g: g * 2, batch=1),
            pl.patch_grad("1:input", lambda g: g + 1, batch=1),
            pl.save_grad("0:input", name="x"),
        ],
        loss=head_loss,
    )
    w = mlp64.layers[0].weight
    patched = expected["0"].clone()
    patched[1] = patched[1] * 2 + 1  # the first patch_grad in the list applies first
    assert torch.allclose(rec.grads["x"], patched @ w)


def test_patch_grad_of_the_wrong_shape_names_the_site(mlp64: TinyMLP, x64: torch.Tensor) -> None:
    with pytest.raises(
        pl.PurelensError,
        match=r"site '1' returned float64\[3\], but the gradient there is float64\[3, 8\]",
    ):
        pl.run(
            mlp64, x64, [pl.patch_grad("1", lambda g: g.sum(1)), pl.save_grad("0")], loss=head_loss
        )


def test_patch_grad_under_torch_func_grad(mlp64: TinyMLP, x64: torch.Tensor) -> None:
    def f(x: torch.Tensor, factor: float) -> torch.Tensor:
        ivs = [pl.patch_grad("1", lambda g: g * factor)]
        return head_loss(pl.run(mlp64, x, ivs).output)

    plain = grad(lambda x: head_loss(mlp64(x)))(x64)
    assert torch.allclose(grad(f)(x64, 3.0), plain * 3)
    xs = torch.stack([x64, 2 * x64])
    batched = vmap(grad(f), in_dims=(0, None))(xs, 0.5)
    assert torch.allclose(batched[1], grad(lambda x: head_loss(mlp64(x)))(2 * x64) * 0.5)


def test_patch_grad_under_plain_backward(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4, requires_grad=True)
    pl.run(mlp, x, [pl.patch_grad("0", torch.zeros_like)]).output.sum().backward()
    assert torch.equal(x.grad, torch.zeros(2, 4))


def test_loss_never_touches_param_grad_and_frees_the_graph(
    mlp64: TinyMLP, x64: torch.Tensor
) -> None:
    rec = pl.run(mlp64, x64, [pl.save("1"), pl.save_grad("1")], loss=head_loss)
    assert all(p.grad is None for p in mlp64.parameters())
    for t in (rec["1"], rec.output, rec.loss, rec.grads["1"]):
        assert t.grad_fn is None and not t.requires_grad


def test_loss_works_inside_no_grad_and_with_frozen_parameters(
    mlp64: TinyMLP, x64: torch.Tensor
) -> None:
    expected = by_hand(mlp64, x64)
    mlp64.requires_grad_(False)
    with torch.no_grad():
        rec = pl.run(
            mlp64, x64, [pl.save_grad("0"), pl.save_grad(":input", name="x")], loss=head_loss
        )
        assert not torch.is_grad_enabled()  # restored for the caller
    assert torch.allclose(rec.grads["0"], expected["0"])
    assert torch.allclose(rec.grads["x"], expected["input"])


def test_several_losses_give_a_dict_per_gradient(mlp64: TinyMLP, x64: torch.Tensor) -> None:
    rec = pl.run(
        mlp64,
        x64,
        [pl.save_grad("1"), pl.save_grad("2")],
        loss=lambda out: {"first": out[:, 0].sum(), "second": out[:, 1].pow(2).sum()},
    )
    assert set(rec.loss) == {"first", "second"} and set(rec.grads["1"]) == {"first", "second"}
    one = pl.run(mlp64, x64, [pl.save_grad("1")], loss=lambda out: out[:, 1].pow(2).sum())
    assert torch.allclose(rec.grads["1"]["second"], one.grads["1"])
    assert torch.allclose(
        rec.grads["2"]["first"], torch.zeros(3, 3).index_fill(1, torch.tensor([0]), 1).double()
    )


def test_loss_of_output_and_saved(mlp64: TinyMLP, x64: torch.Tensor) -> None:
    rec = pl.run(
        mlp64,
        x64,
        [pl.save("1"), pl.save_grad("0"), pl.stop("1")],
        loss=lambda out, saved: saved["1"].pow(2).sum(),
    )
    assert rec.output is None
    h0 = mlp64.layers[0](x64)
    assert torch.allclose(rec.grads["0"], 2 * torch.tanh(h0) * (1 - torch.tanh(h0) ** 2))


def test_gradient_of_a_site_the_loss_does_not_use_is_zero() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(x)

    rec = pl.run(TwoHeads(), torch.ones(1, 2), [pl.save_grad("b")], loss=lambda out: out[0].sum())
    assert torch.equal(rec.grads["b"], torch.zeros(1, 2))


def test_save_grad_without_loss_is_an_error(mlp: TinyMLP) -> None:
    with pytest.raises(pl.PurelensError, match=r"needs `loss=` in run"):
        pl.run(mlp, torch.randn(2, 4), [pl.save_grad("1")])


def test_loss_inside_a_torch_func_transform_is_an_error(mlp: TinyMLP) -> None:
    with pytest.raises(pl.PurelensError, match=r"cannot be used inside torch\.func transforms"):
        vmap(lambda x: pl.run(mlp, x, loss=lambda out: out.sum()).loss)(torch.randn(3, 2, 4))
    with pytest.raises(pl.PurelensError, match=r"cannot be used inside torch\.func transforms"):
        grad(
            lambda v: pl.run(mlp, torch.randn(2, 4), [pl.add("0", v)], loss=lambda o: o.sum()).loss
        )(torch.zeros(8))


def test_loss_under_inference_mode_is_an_error(mlp: TinyMLP) -> None:
    with torch.inference_mode(), pytest.raises(pl.PurelensError, match="inference_mode"):
        pl.run(mlp, torch.randn(2, 4), loss=lambda out: out.sum())


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        (lambda out: out, r"got a tensor of shape \[3, 3\]"),
        (lambda out: 1.0, "got 1.0"),
        (lambda out: {"a": out.sum(), "b": out}, r"`b` is a tensor of shape \[3, 3\]"),
    ],
)
def test_loss_must_be_scalar(mlp: TinyMLP, loss, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(pl.PurelensError, match=match):
        pl.run(mlp, torch.randn(3, 4), [pl.save_grad("1")], loss=loss)


def test_save_grad_on_token_ids_is_an_error() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 1))
    with pytest.raises(pl.PurelensError, match=r"torch.int64, which has no gradient"):
        pl.run(model, torch.tensor([[1, 2]]), [pl.save_grad("0:input")], loss=lambda o: o.sum())


def test_duplicate_save_grad_names_are_an_error(mlp: TinyMLP) -> None:
    with pytest.raises(pl.PurelensError, match="two save_grads are named 'g'"):
        pl.run(
            mlp,
            torch.randn(1, 4),
            [pl.save_grad("0", name="g"), pl.save_grad("1", name="g")],
            loss=torch.sum,
        )


def test_vjp_and_jacrev_compose_with_patch_grad(mlp64: TinyMLP, x64: torch.Tensor) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return pl.run(mlp64, x, [pl.patch_grad("2", lambda g: -g)]).output

    out, vjp_fn = torch.func.vjp(f, x64)
    (vx,) = vjp_fn(torch.ones_like(out))
    plain = grad(lambda x: mlp64(x).sum())(x64)
    assert torch.allclose(vx, -plain)
    jac = torch.func.jacrev(lambda x: f(x)[0, 0])(x64)
    assert torch.allclose(jac, -grad(lambda x: mlp64(x)[0, 0])(x64))


def test_save_grad_on_an_input_port_does_not_depend_on_frozen_weights() -> None:
    # With frozen weights the value was a fresh leaf (the path through the module only);
    # with trainable weights, the tensor itself (the residual path counted too).
    from tests.helpers import tiny_gpt2

    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))

    def grads(frozen: bool) -> dict[str, torch.Tensor]:
        model = tiny_gpt2(n_layer=2).requires_grad_(not frozen)
        ivs = [pl.save_grad("h.0.ln_1:input", name="in"), pl.save_grad("h.0:input", name="block")]
        return dict(pl.run(model, x, ivs, loss=lambda out: out.logits.square().sum()).grads)

    trainable, frozen = grads(False), grads(True)
    for name in ("in", "block"):
        assert torch.allclose(trainable[name], frozen[name], atol=1e-6), name
    assert not torch.allclose(frozen["in"], frozen["block"], atol=1e-4)  # the residual differs

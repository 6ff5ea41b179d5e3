"""run() never changes the model: hooks, forward, parameters, buffers, mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purelens as pl
from tests.helpers import hooks_on, tiny_gpt2


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
        for k in a
    )


class Fails(Exception):
    pass


def fail(v: torch.Tensor) -> torch.Tensor:
    raise Fails


ALL_KINDS = [
    pl.save("h.0"),
    pl.save("h.0.attn:input", name="attn_in"),
    pl.patch("h.0.mlp", lambda v: v * 2),
    pl.add("h.1:input", 1.0),
    pl.skip("h.1.attn.resid_dropout"),
    pl.skip("h.0.mlp.dropout"),
]


@pytest.mark.parametrize("where", ["h.0.mlp", "h.1:input", "h.-1.ln_2", "lm_head"])
def test_exception_mid_forward_leaves_no_hook_and_no_change(where: str) -> None:
    model = tiny_gpt2(n_layer=3)
    model.train()
    before = snapshot(model)
    forwards = {name: type(m).forward for name, m in model.named_modules()}
    assert hooks_on(model) == 0
    with pytest.raises(Fails):
        pl.run(model, torch.randint(0, 97, (2, 5)), [*ALL_KINDS, pl.patch(where, fail)])
    assert hooks_on(model) == 0
    assert bitwise_equal(before, snapshot(model))
    assert model.training and all(m.training for m in model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert {name: type(m).forward for name, m in model.named_modules()} == forwards


def test_stop_and_errors_after_the_pass_leave_nothing_behind() -> None:
    model = tiny_gpt2(n_layer=2)
    before = snapshot(model)
    pl.run(model, torch.randint(0, 97, (1, 4)), [*ALL_KINDS, pl.stop("h.1")])
    with pytest.raises(pl.PurelensError):
        pl.run(
            model, torch.randint(0, 97, (1, 4)), [*ALL_KINDS, pl.patch("h.1", lambda v: v[:, :1])]
        )
    assert hooks_on(model) == 0
    assert bitwise_equal(before, snapshot(model))


def test_the_users_own_hooks_and_forward_are_kept() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    calls = []
    handle = model[0].register_forward_hook(lambda m, a, o: calls.append("mine"))
    own_forward = model[1].forward = lambda x: (
        x * 0
    )  # an instance-level forward, as accelerate sets
    pl.run(model, torch.ones(1, 2), [pl.skip("1"), pl.save("0")])
    assert model[1].__dict__["forward"] is own_forward
    assert len(model[0]._forward_hooks) == 1
    assert calls == ["mine"]
    assert torch.equal(model(torch.ones(1, 2)), torch.zeros(1, 2))
    handle.remove()


def test_params_leave_the_model_parameters_in_place() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    weight = model[0].weight
    before = snapshot(model)
    with pytest.raises(Fails):
        pl.run(
            model, torch.ones(1, 2), [pl.patch("0", fail)], params={"0.weight": torch.zeros(2, 2)}
        )
    assert model[0].weight is weight and bitwise_equal(before, snapshot(model))

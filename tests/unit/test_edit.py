"""pl.edit: a module that always applies its edits, sharing the original's weights."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import optree
import pytest
import torch
from torch import nn

import purelens as pl
from tests.helpers import TinyMLP, hooks_on, tiny_gpt2


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def test_edits_apply_in_plain_calls_and_leave_the_original_alone(
    mlp: TinyMLP, x: torch.Tensor
) -> None:
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    clean = mlp(x)
    edited = pl.edit(mlp, [pl.ablate("layers.1")])
    assert torch.allclose(edited(x), mlp.layers[2].bias.expand(3, 3))
    assert torch.equal(mlp(x), clean)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert hooks_on(mlp) == 0 and hooks_on(edited) == 1  # only the edited root's own forward


def test_weights_and_submodules_are_shared_not_copied(mlp: TinyMLP) -> None:
    edited = pl.edit(mlp, [pl.scale("0", 2.0)])
    assert type(edited) is type(mlp)
    assert edited.layers is mlp.layers
    assert all(a is b for a, b in zip(edited.parameters(), mlp.parameters(), strict=True))
    assert edited.state_dict().keys() == mlp.state_dict().keys()


def test_edits_are_inspectable_and_the_original_reachable(mlp: TinyMLP) -> None:
    delta = torch.ones(8)
    edited = pl.edit(mlp, [pl.add("0", delta), [pl.scale("2", 3.0)]])
    assert edited.original is mlp
    assert [type(iv).__name__ for iv in edited.edits] == ["Add", "Scale"]
    assert optree.tree_leaves(edited.edits, namespace="purelens") == [delta, 3.0]


def test_run_time_interventions_apply_after_the_edits(mlp: TinyMLP, x: torch.Tensor) -> None:
    edited = pl.edit(mlp, [pl.add("0", 1.0)])
    rec = pl.run(edited, x, [pl.save("0", name="seen"), pl.scale("0", 2.0), pl.save("0")])
    h = mlp.layers[0](x)
    assert torch.allclose(rec["seen"], h + 1)  # sites keep their names on the edited module
    assert torch.allclose(rec["0"], (h + 1) * 2)
    assert torch.allclose(rec.output, mlp.layers[2](torch.tanh((h + 1) * 2)))


def test_edits_compose_in_order(mlp: TinyMLP, x: torch.Tensor) -> None:
    twice = pl.edit(pl.edit(mlp, [pl.add("0", 1.0)]), [pl.scale("0", 2.0)])
    h = mlp.layers[0](x)
    assert torch.allclose(pl.run(twice, x, [pl.save("0")])["0"], (h + 1) * 2)
    assert twice.original.original is mlp


def test_skip_and_patch_grad_as_edits(mlp: TinyMLP, x: torch.Tensor) -> None:
    edited = pl.edit(mlp, [pl.skip("1"), pl.patch_grad("0", torch.zeros_like)])
    assert torch.allclose(edited(x), mlp.layers[2](mlp.layers[0](x)))
    edited(x).sum().backward()  # training through an edited module
    assert torch.equal(mlp.layers[0].weight.grad, torch.zeros(8, 4))
    assert mlp.layers[2].weight.grad.abs().sum() > 0
    mlp.zero_grad()


def test_stop_and_skip_at_run_time_on_an_edited_module(mlp: TinyMLP, x: torch.Tensor) -> None:
    edited = pl.edit(mlp, [pl.add("0", 1.0)])
    rec = pl.run(edited, x, [pl.skip("1"), pl.save("1"), pl.stop("1")])
    assert rec.output is None and torch.allclose(rec["1"], mlp.layers[0](x) + 1)


@pytest.mark.parametrize(
    ("iv", "match"),
    [
        (pl.save("0"), "cannot be an edit"),
        (pl.save_grad("0"), "cannot be an edit"),
        (pl.stop("0"), "cannot be an edit"),
        (pl.add("0", 1.0, step=1), "`step=` has no meaning"),
    ],
)
def test_what_cannot_be_an_edit(mlp: TinyMLP, iv: pl.Intervention, match: str) -> None:
    with pytest.raises(pl.PurelensError, match=match):
        pl.edit(mlp, [iv])


def test_an_edit_whose_site_never_runs_is_an_error(mlp: TinyMLP, x: torch.Tensor) -> None:
    mlp.spare = nn.Linear(4, 4)
    edited = pl.edit(mlp, [pl.ablate("spare")])
    with pytest.raises(pl.PurelensError, match="site 'spare' did not run"):
        edited(x)


def test_original_and_edited_run_together_in_threads(mlp: TinyMLP, x: torch.Tensor) -> None:
    edited = pl.edit(mlp, [pl.ablate("1")])
    clean, zeroed = mlp(x), mlp.layers[2].bias.expand(3, 3)

    def work(k: int) -> bool:
        model, expected = (mlp, clean) if k % 2 else (edited, zeroed)
        return all(torch.allclose(model(x), expected) for _ in range(20))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


def test_generate_on_an_edited_hf_model() -> None:
    model = tiny_gpt2(n_layer=2, seed=12, init=0.2)
    prompt = torch.tensor([[5, 6, 7, 8]])
    target = 42
    edited = pl.edit(model, [pl.add("ln_f", 50 * model.transformer.wte.weight[target].detach())])
    out = pl.generate(edited, prompt, [pl.save("h.0")], max_new_tokens=3, pad_token_id=0)
    assert (out.output[0, 4:] == target).all() and len(out["h.0"]) == 3
    assert (model.generate(prompt, max_new_tokens=3, pad_token_id=0)[0, 4:] != target).any()
    assert torch.equal(edited.generate(prompt, max_new_tokens=3, pad_token_id=0), out.output)


def test_a_deep_copy_of_an_edited_module_edits_its_own_modules(
    mlp: TinyMLP, x: torch.Tensor
) -> None:
    # Issue 13, item 6: the copy's forward still ran the original's modules (an EMA copy
    # or a reference model silently did nothing).
    edited = pl.edit(mlp, [pl.scale("0", 2.0)])
    twin = copy.deepcopy(edited)
    assert twin.layers is not edited.layers
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)  # train the copy a little
    expected = twin.layers[2](twin.layers[1](2 * twin.layers[0](x)))
    assert torch.allclose(twin(x), expected)
    assert torch.allclose(edited(x), mlp.layers[2](mlp.layers[1](2 * mlp.layers[0](x))))
    assert hooks_on(mlp) == 0 and hooks_on(twin.layers) == 0


def test_a_plain_call_of_an_edited_module_inside_a_patch_is_not_the_runs(
    mlp: TinyMLP, x: torch.Tensor
) -> None:
    # Issue 13, item 7: the outer run's interventions applied inside it (and recursed).
    edited = pl.edit(mlp, [pl.ablate("1")])
    seen = {}

    def patch(v: torch.Tensor) -> torch.Tensor:
        seen["inner"] = edited(x)  # a plain call, as in a reference model
        return v

    rec = pl.run(edited, x, [pl.patch("0", patch), pl.scale("2", 3.0)])
    alone = mlp.layers[2].bias.expand(3, 3)  # ablated layer 1: only the bias is left
    assert torch.allclose(seen["inner"], alone)  # not scaled by the outer run's 3.0
    assert torch.allclose(rec.output, 3 * alone)


@pytest.mark.parametrize(
    ("edits", "expected", "seen_in"),
    [
        ([pl.scale("", 2.0)], lambda m, x: 2 * m(x), lambda x: x),
        ([pl.add(":input", 1.0)], lambda m, x: m(x + 1), lambda x: x + 1),
        ([pl.skip("", lambda v: v[:, :3])], lambda m, x: x[:, :3], lambda x: x),
    ],
)
def test_edits_at_the_root_site_apply_before_the_runs(  # type: ignore[no-untyped-def]
    mlp: TinyMLP, x: torch.Tensor, edits, expected, seen_in
) -> None:
    # Issue 13, item 18: an edit at the root site ("", ":input") always failed, never applied;
    # then it applied after the run's interventions at the root, not before.
    edited = pl.edit(mlp, edits)
    assert torch.allclose(edited(x), expected(mlp, x))
    rec = pl.run(edited, x, [pl.save(""), pl.save(":input", name="in")])
    assert torch.allclose(rec[""], expected(mlp, x)) and torch.equal(rec["in"], seen_in(x))


def test_root_input_edits_and_run_interventions_compose_in_order(
    mlp: TinyMLP, x: torch.Tensor
) -> None:
    edited = pl.edit(mlp, [pl.add(":input", 1.0)])
    twice = pl.edit(edited, [pl.scale(":input", 3.0)])  # an edit of an edit comes after it
    assert torch.allclose(pl.run(edited, x, [pl.scale(":input", 2.0)]).output, mlp(2 * (x + 1)))
    assert torch.allclose(twice(x), mlp(3 * (x + 1)))
    assert torch.allclose(pl.run(twice, x, [pl.add(":input", 1.0)]).output, mlp(3 * (x + 1) + 1))


def test_a_runs_skip_of_an_edited_module_keeps_its_edits(x: torch.Tensor) -> None:
    seq = nn.Sequential(nn.Linear(4, 4), nn.Identity())
    edited = pl.edit(seq, [pl.scale(":input", 2.0)])
    assert torch.allclose(pl.run(edited, x, [pl.skip("")]).output, 2 * x)
    rec = pl.run(edited, x, [pl.save(":input"), pl.skip(""), pl.save("")])
    assert torch.allclose(rec[":input"], 2 * x) and torch.allclose(rec[""], 2 * x)
    twice = pl.edit(seq, [pl.skip("1", lambda v: v * 0)])
    with pytest.raises(pl.PurelensError, match="skipped twice"):
        pl.run(twice, x, [pl.skip("1")])

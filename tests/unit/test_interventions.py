"""Interventions as values: frozen, pytrees in both registries, checked when built."""

from __future__ import annotations

import dataclasses

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import given
from hypothesis import strategies as st

import purelens as pl

SITES = st.sampled_from(["h.0", "h.-1", "transformer.h.3:input", "", "mlp:output"])
VECTORS = st.integers(1, 5).map(lambda n: torch.randn(n))
ROWS = st.one_of(st.none(), st.integers(-3, 3), st.lists(st.integers(0, 3), min_size=1, max_size=3))


@st.composite
def interventions(draw: st.DrawFn) -> pl.Intervention:
    site = draw(SITES)
    batch = draw(ROWS)
    kind = draw(
        st.sampled_from(["save", "patch", "replace", "add", "scale", "ablate", "stop", "skip"])
    )
    if kind == "save":
        return pl.save(site, name=draw(st.none() | st.text(min_size=1, max_size=5)), batch=batch)
    if kind == "patch":
        return pl.patch(site, torch.neg, batch=batch)
    if kind == "replace":
        return pl.replace(site, draw(VECTORS), batch=batch)
    if kind == "add":
        return pl.add(site, draw(VECTORS), batch=batch, step=draw(st.none() | st.integers(0, 4)))
    if kind == "scale":
        return pl.scale(site, draw(st.floats(-2, 2) | VECTORS), batch=batch)
    if kind == "ablate":
        return pl.ablate(site, draw(st.sampled_from(["zero", "mean"])), batch=batch)
    if kind == "stop":
        return pl.stop(site)
    return pl.skip(site.partition(":")[0])


@given(st.lists(interventions(), max_size=4))
def test_torch_pytree_round_trip(ivs: list[pl.Intervention]) -> None:
    leaves, spec = torch_pytree.tree_flatten(ivs)
    assert all(isinstance(leaf, torch.Tensor | float) for leaf in leaves)
    assert torch_pytree.tree_unflatten(leaves, spec) == ivs


@given(st.lists(interventions(), max_size=4))
def test_optree_round_trip(ivs: list[pl.Intervention]) -> None:
    leaves, spec = optree.tree_flatten(ivs, namespace="purelens")
    assert all(isinstance(leaf, torch.Tensor | float) for leaf in leaves)
    assert optree.tree_unflatten(spec, leaves) == ivs
    doubled = optree.tree_map(lambda x: x * 2, ivs, namespace="purelens")
    assert [type(iv) for iv in doubled] == [type(iv) for iv in ivs]


def test_tensor_arguments_are_the_only_leaves() -> None:
    delta = torch.ones(4)
    ivs = [pl.add("h.0", delta), pl.save("h.1", torch.relu, name="x"), pl.patch("h.2", torch.neg)]
    leaves, _ = torch_pytree.tree_flatten(ivs)
    assert len(leaves) == 1 and leaves[0] is delta
    leaves, _ = optree.tree_flatten(ivs, namespace="purelens")
    assert len(leaves) == 1 and leaves[0] is delta


def test_tree_map_replaces_leaves_and_keeps_static_fields() -> None:
    iv = pl.add("h.0", torch.ones(3), batch=[0, 1], step=2)
    doubled = torch_pytree.tree_map(lambda t: t * 2, iv)
    assert torch.equal(doubled.delta, torch.full((3,), 2.0))
    assert (doubled.site, doubled.batch, doubled.step) == ("h.0", (0, 1), 2)


def test_nodes_are_frozen() -> None:
    iv = pl.save("h.0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        iv.site = "h.1"  # type: ignore[misc]


def test_equality_and_hash() -> None:
    v = torch.ones(2)
    assert pl.save("h.0") == pl.save("h.0")
    assert hash(pl.save("h.0", batch=slice(0, 2))) == hash(pl.save("h.0", batch=slice(0, 2)))
    assert pl.save("h.0") != pl.save("h.0", name="other")
    assert pl.add("h.0", v) == pl.add("h.0", v)
    assert pl.add("h.0", v) != pl.add("h.0", v.clone())  # tensors compare by identity
    assert len({pl.stop("h.0"), pl.stop("h.0"), pl.skip("h.0")}) == 2


def test_save_name_defaults_to_the_site_as_written() -> None:
    assert pl.save("h.-1:input").name == "h.-1:input"


def test_patch_detects_whether_fn_takes_saved() -> None:
    assert not pl.patch("h.0", lambda v: v).takes_saved
    assert pl.patch("h.0", lambda v, saved: v).takes_saved
    assert not pl.patch("h.0", torch.neg).takes_saved
    assert not pl.patch("h.0", lambda v, c=1.0: v * c).takes_saved  # a default: a closure trick


def test_repr_is_short_and_shows_shapes() -> None:
    assert repr(pl.add("h.0", torch.zeros(2, 3))) == "add(site='h.0', delta=float32[2, 3])"
    assert repr(pl.save("h.0", name="x", batch=[1])) == "save(site='h.0', name='x', batch=(1,))"


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: pl.patch("h.0", "not callable"), "`fn` of pl.patch"),
        (lambda: pl.save("h.0", fn=3), "`fn` of pl.save"),
        (lambda: pl.save("h.0", name=3), "`name` of pl.save"),
        (lambda: pl.ablate("h.0", how="max"), "must be 'zero' or 'mean'"),
        (lambda: pl.add("h.0", 1.0, batch="first"), "`batch` must be"),
        (lambda: pl.add("h.0", 1.0, batch=True), "`batch` must be"),
        (lambda: pl.add("h.0", 1.0, step="all"), "`step` must be"),
        (lambda: pl.add("h.0", 1.0, step=[-1]), "`step` must be"),
        (lambda: pl.skip("h.0:input"), "use pl.skip\\('h.0'\\)"),
        # Issue 13, item 23: these were accepted, and failed later with raw errors.
        (lambda: pl.add("0", "1"), "`delta` of pl.add\\('0', ...\\) must be a tensor or a number"),
        (lambda: pl.replace("0", None), "`value` of pl.replace\\('0', ...\\) must be a tensor"),
        (lambda: pl.scale("0", [1.0, "a"]), "`factor` of pl.scale\\('0', ...\\) must be a tensor"),
        (lambda: pl.scale("0", True), "`factor` of pl.scale"),
        (lambda: pl.add("h.0", 1.0, batch=slice(None, None, -1)), "step must be positive"),
        (lambda: pl.add("h.0", 1.0, batch=slice(0, 1.5)), "bounds must be ints"),
        (lambda: pl.add("h.0", 1.0, batch=[]), "selects no rows"),
        (lambda: pl.add("h.0", 1.0, step=-1), "counted from 0"),
        (lambda: pl.add("h.0", 1.0, step=slice(-2, None)), "cannot be negative"),
        (lambda: pl.add("h.0", 1.0, step=[]), "select at least one"),
        (lambda: pl.transplant("h.0", src=1.5, dst=0), "`src` of pl.transplant"),
        (lambda: pl.transplant("h.0", src=0, dst=None), "`dst` of pl.transplant"),
        (lambda: pl.transplant("h.0", src="01", dst=1), "`src` of pl.transplant"),
    ],
)
def test_bad_arguments_are_rejected_when_built(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(pl.PurelensError, match=match):
        build()


def test_non_interventions_are_rejected_by_run(mlp) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(pl.PurelensError, match="must hold purelens interventions"):
        pl.run(mlp, torch.randn(1, 4), [pl.save("0"), "layers.1"])


def test_lists_of_numbers_become_tensors() -> None:
    assert torch.equal(pl.add("0", [1.0, 2.0]).delta, torch.tensor([1.0, 2.0]))  # type: ignore[arg-type]
    assert pl.scale("0", 2).factor == 2

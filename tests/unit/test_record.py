"""Record: an immutable mapping, a pytree in both registries, readable."""

from __future__ import annotations

import collections.abc

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import given
from hypothesis import strategies as st

import purelens as pl


def test_is_an_immutable_mapping(mlp) -> None:  # type: ignore[no-untyped-def]
    rec = pl.run(mlp, torch.randn(2, 4), [pl.save("0"), pl.save("1", name="act")])
    assert isinstance(rec, collections.abc.Mapping)
    assert list(rec) == ["0", "act"] and len(rec) == 2
    assert "act" in rec and "2" not in rec and rec.get("2") is None
    with pytest.raises(AttributeError, match="immutable"):
        rec.output = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        rec["new"] = torch.zeros(1)  # type: ignore[index]
    assert rec.grads == {} and rec.loss is None


def test_missing_name_lists_what_was_saved(mlp) -> None:  # type: ignore[no-untyped-def]
    rec = pl.run(mlp, torch.randn(2, 4), [pl.save("0"), pl.save("1", name="act")])
    with pytest.raises(pl.PurelensError) as info:
        rec["ac"]
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("'ac' was not saved in this run. Saved: '0', 'act'.")


def test_repr_shows_names_shapes_and_dtypes(mlp) -> None:  # type: ignore[no-untyped-def]
    rec = pl.run(mlp.double(), torch.randn(2, 4, dtype=torch.float64), [pl.save("1")])
    # Not "saved=...": there is no `rec.saved` (the record is the mapping of saved values).
    assert repr(rec) == "Record({'1': float64[2, 8]}, output=float64[2, 3])"


def records() -> st.SearchStrategy[pl.Record]:
    tensors = st.integers(0, 3).map(lambda n: torch.randn(n, 2))
    saved = st.dictionaries(st.text(max_size=4), tensors | st.tuples(tensors, tensors), max_size=3)
    output = st.none() | tensors | st.fixed_dictionaries({"logits": tensors, "cache": st.none()})
    return st.builds(
        pl.Record, saved, output, st.dictionaries(st.text(max_size=3), tensors), st.none() | tensors
    )


def same(a: pl.Record, b: pl.Record) -> bool:
    pairs = zip(torch_pytree.tree_leaves(a), torch_pytree.tree_leaves(b), strict=True)
    return (
        list(a) == list(b)
        and list(a.grads) == list(b.grads)
        and torch_pytree.tree_structure(a) == torch_pytree.tree_structure(b)
        and all(x is y for x, y in pairs)
    )


@given(records())
def test_torch_pytree_round_trip(rec: pl.Record) -> None:
    leaves, spec = torch_pytree.tree_flatten(rec)
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    back = torch_pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, pl.Record) and same(rec, back)
    assert (back.output is None) == (rec.output is None)


@given(records())
def test_optree_round_trip(rec: pl.Record) -> None:
    leaves, spec = optree.tree_flatten(rec, namespace="purelens")
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    back = optree.tree_unflatten(spec, leaves)
    assert isinstance(back, pl.Record) and list(back) == list(rec)
    assert all(
        x is y for x, y in zip(optree.tree_leaves(back, namespace="purelens"), leaves, strict=True)
    )


def test_comes_back_through_vmap_with_a_batch_dimension(mlp) -> None:  # type: ignore[no-untyped-def]
    xs = torch.randn(5, 2, 4)
    recs = torch.func.vmap(lambda x: pl.run(mlp, x, [pl.save("1")]))(xs)
    assert isinstance(recs, pl.Record)
    assert recs["1"].shape == (5, 2, 8) and recs.output.shape == (5, 2, 3)
    assert torch.allclose(recs["1"][3], pl.run(mlp, xs[3], [pl.save("1")])["1"])

"""Invariants, checked by hypothesis on random MLPs and inputs."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import purelens as pl


@st.composite
def model_and_input(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    widths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), draw(st.sampled_from([nn.ReLU, nn.Tanh, nn.Identity]))()]
    x = torch.randn(draw(st.integers(1, 4)), widths[0])
    return nn.Sequential(*layers), x


def some_sites(model: nn.Module) -> st.SearchStrategy[list[str]]:
    paths = [p for p in pl.sites(model)]
    return st.lists(st.sampled_from(paths), unique=True, min_size=1, max_size=len(paths))


@given(model_and_input())
def test_run_without_interventions_equals_the_model(mx: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = mx
    assert torch.equal(pl.run(model, x).output, model(x))


@given(model_and_input(), st.data())
def test_saving_never_changes_the_output(
    mx: tuple[nn.Module, torch.Tensor], data: st.DataObject
) -> None:
    model, x = mx
    sites = data.draw(some_sites(model))
    ports = data.draw(
        st.lists(
            st.sampled_from(["", ":input", ":output"]), min_size=len(sites), max_size=len(sites)
        )
    )
    rec = pl.run(model, x, [pl.save(s + p) for s, p in zip(sites, ports, strict=True)])
    assert torch.equal(rec.output, model(x))
    assert len(rec) == len(sites)


@given(model_and_input(), st.data())
def test_identity_patches_change_nothing(
    mx: tuple[nn.Module, torch.Tensor], data: st.DataObject
) -> None:
    model, x = mx
    sites = data.draw(some_sites(model))

    def identities(s: str) -> list[pl.Intervention]:
        return [
            pl.patch(s, lambda v: v),
            pl.patch(s + ":input", lambda v, saved: v),
            pl.add(s, 0.0),
            pl.scale(s, 1.0),
            pl.patch(s, lambda v: v, batch=0),
        ]

    ivs = [data.draw(st.sampled_from(identities(s))) for s in sites]
    assert torch.equal(pl.run(model, x, ivs).output, model(x))


@given(model_and_input(), st.data())
def test_replace_with_the_saved_value_changes_nothing(
    mx: tuple[nn.Module, torch.Tensor], data: st.DataObject
) -> None:
    model, x = mx
    site = data.draw(st.sampled_from(pl.sites(model)[1:]))
    clean = pl.run(model, x, [pl.save(site)])[site]
    assert torch.allclose(pl.run(model, x, [pl.replace(site, clean)]).output, model(x))

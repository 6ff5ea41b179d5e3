"""Positions under padding, `pl.at`, and cross-prompt `pl.transplant`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purelens as pl

LEFT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
RIGHT = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def test_last_token_under_left_and_right_padding() -> None:
    assert pl.last_token(LEFT).tolist() == [4, 4, 4]
    assert pl.last_token(RIGHT).tolist() == [2, 4, 0]


def test_token_index_counts_real_tokens_only() -> None:
    assert pl.token_index(LEFT, 0).tolist() == [2, 0, 4]
    assert pl.token_index(RIGHT, 0).tolist() == [0, 0, 0]
    assert pl.token_index(LEFT[:2], 1).tolist() == [3, 1]
    assert pl.token_index(RIGHT[:2], -2).tolist() == [1, 3]


def test_token_that_a_row_lacks_is_an_error() -> None:
    with pytest.raises(
        pl.PurelensError, match="token 1 does not exist in row 2, which has 1 real tokens"
    ):
        pl.token_index(LEFT, 1)
    with pytest.raises(pl.PurelensError, match="2-D tensor"):
        pl.last_token(torch.ones(5))


def test_at_saves_one_position_per_row() -> None:
    model = nn.Sequential(nn.Identity())
    x = torch.randn(3, 5, 2)
    rec = pl.run(model, x, [pl.save("0", pl.at(pl.last_token(RIGHT)), name="last")])
    assert torch.equal(rec["last"], torch.stack([x[0, 2], x[1, 4], x[2, 0]]))


def test_at_patches_only_its_positions() -> None:
    model = nn.Sequential(nn.Identity())
    x = torch.randn(3, 5, 2)
    index = pl.token_index(LEFT, 0)
    out = pl.run(model, x, [pl.patch("0", pl.at(index, lambda e: e * 0))]).output
    expected = x.clone()
    expected[[0, 1, 2], index] = 0
    assert torch.equal(out, expected)


def test_at_with_saved_and_batch() -> None:
    model = nn.Sequential(nn.Identity(), nn.Identity())
    x = torch.randn(3, 5, 2)
    out = pl.run(
        model,
        x,
        [
            pl.save("0", pl.at(-1), name="last"),
            pl.patch("1", pl.at(torch.tensor([0]), lambda e, saved: saved["last"][2:]), batch=1),
        ],
    ).output
    assert (
        torch.equal(out[1, 0], x[2, -1]) and torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    )


def test_at_with_the_wrong_number_of_positions() -> None:
    model = nn.Sequential(nn.Identity())
    with pytest.raises(pl.PurelensError, match=r"pl.at: \[2\] positions for a value with 3 rows"):
        pl.run(model, torch.randn(3, 5, 2), [pl.save("0", pl.at(torch.tensor([1, 2])))])


def test_transplant_copies_rows() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    x = torch.randn(3, 2)
    out = pl.run(model, x, [pl.transplant("0", src=[2, 0], dst=[0, 1])]).output
    clean = model(x)
    assert (
        torch.equal(out[0], clean[2])
        and torch.equal(out[1], clean[0])
        and torch.equal(out[2], clean[2])
    )


def test_transplant_arguments_are_checked() -> None:
    with pytest.raises(pl.PurelensError, match="2 `src` rows for 3 `dst` rows"):
        pl.transplant("0", src=[0, 1], dst=[1, 2, 3])
    model = nn.Sequential(nn.Identity())
    with pytest.raises(pl.PurelensError, match="row 5 is outside the batch of size 2"):
        pl.run(model, torch.randn(2, 2), [pl.transplant("0", src=5, dst=0)])


@pytest.mark.parametrize("index", [1.5, "a", True, torch.tensor([0.5, 1.0]), None])
def test_at_refuses_an_index_that_is_not_positions(index: object) -> None:
    with pytest.raises(pl.PurelensError, match=r"`index` of pl\.at"):
        pl.at(index)  # type: ignore[arg-type]


def test_at_with_a_row_position_outside_the_value_is_an_error() -> None:
    model = nn.Sequential(nn.Identity())
    with pytest.raises(pl.PurelensError, match="position 5 of row 0 does not exist"):
        pl.run(model, torch.randn(2, 4, 3), [pl.save("0", pl.at(torch.tensor([5, 0])))])


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda e: torch.zeros(1), r"returned float32\[1\]"),  # was broadcast over every row
        (lambda e: e[:1], r"returned float32\[1, 3\]"),
        (lambda e: "x", "returned 'x'"),
    ],
)
def test_at_checks_what_its_function_returns(fn, match: str) -> None:  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Identity())
    with pytest.raises(pl.PurelensError, match=match):
        pl.run(model, torch.randn(2, 4, 3), [pl.patch("0", pl.at(-1, fn))])


def test_at_refuses_a_lossy_result_on_token_ids() -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(pl.PurelensError, match="casts without loss"):
        pl.run(model, torch.tensor([[1, 2, 3]]), [pl.patch("0:input", pl.at(0, lambda e: e + 0.7))])

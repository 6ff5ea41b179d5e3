"""Interventions are values: a run never writes into them, never changes them lossily,
never keeps them alive, and never silently does nothing with them (issue 13)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import purelens as pl
from tests.helpers import TinyMLP


class AddsInPlace(nn.Module):
    """A residual block written the way much model code is: ``out += identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        out += 1.0
        return out


def in_place_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), AddsInPlace(), nn.ReLU(inplace=True))


@pytest.mark.parametrize(
    "writer",
    [
        lambda v: pl.replace("1.inner", v),
        lambda v: pl.patch("1.inner", lambda _, c=v: c),  # the README's patching idiom
        lambda v: pl.patch("0", lambda _, c=v: c),  # ReLU(inplace=True) writes later
    ],
)
def test_in_place_model_code_never_writes_into_an_interventions_tensor(writer) -> None:  # type: ignore[no-untyped-def]
    # Item 5: pl.replace handed the model a view of the user's tensor.
    model = in_place_model()
    x = torch.randn(3, 4)
    value = torch.randn(3, 4)
    kept = value.clone()
    first = pl.run(model, x, [writer(value)]).output
    assert torch.equal(value, kept)
    assert torch.equal(pl.run(model, x, [writer(value)]).output, first)


def test_an_earlier_record_is_not_changed_by_a_later_run() -> None:
    model = in_place_model()
    x = torch.randn(3, 4)
    with torch.no_grad():
        clean = pl.run(model, x, [pl.save("0", torch.clone)])
        kept = clean["0"].clone()
        pl.run(model, x, [pl.patch("0", lambda v, c=clean["0"]: c)])
    assert torch.equal(clean["0"], kept)


@pytest.mark.parametrize(
    "writer",
    [
        pl.replace("1.inner", torch.ones(4)),  # broadcast over the rows
        pl.ablate("1.inner", "mean"),
    ],
)
def test_broadcast_results_can_be_written_in_place(writer: pl.Intervention) -> None:
    # Item 22: "more than one element of the written-to tensor refers to a single memory
    # location" from in-place model code after a broadcast value.
    model = in_place_model()
    x = torch.randn(3, 4)
    out = pl.run(model, x, [writer, pl.save("1", torch.clone)])  # ReLU(inplace) writes after
    assert out["1"].shape == (3, 4)
    assert torch.allclose(out["1"][0], out["1"][1])


def test_a_save_under_inference_mode_holds_the_value_at_the_site() -> None:
    # Item 8: inference tensors have no version counter, so a later in-place change went unseen.
    model = in_place_model()
    x = torch.randn(3, 4)
    with torch.inference_mode():
        rec = pl.run(model, x, [pl.save("1.inner"), pl.save("0", lambda v: (v, v * 1))])
        at_site = model[0](x)
    assert torch.equal(rec["1.inner"], at_site)  # not at_site + 1, as `out += 1` left it
    assert torch.equal(rec["0"][0], at_site)


def test_a_saved_tuple_changed_in_place_is_caught() -> None:
    # Only single tensors were watched for in-place changes; tuples from save functions were not.
    model = in_place_model()
    with pytest.raises(pl.PurelensError, match="changed in place"):
        pl.run(model, torch.randn(2, 4), [pl.save("1.inner", lambda v: (v, v.sum()))])


@pytest.mark.parametrize("shape", [(4,), (1, 4), (1, 1, 4)])
def test_mean_ablation_over_a_single_value_is_an_error(shape: tuple[int, ...]) -> None:
    # Item 12: on 1-D values (and on one row of one token) it returned the value unchanged.
    model = nn.Sequential(nn.Identity(), nn.Identity())
    with pytest.raises(pl.PurelensError, match="one token or example to average"):
        pl.run(model, torch.randn(shape), [pl.ablate("0", "mean")])


def test_mean_ablation_under_vmap_over_single_examples_is_an_error() -> None:
    mlp = TinyMLP()
    with pytest.raises(pl.PurelensError, match="one token or example to average"):
        torch.func.vmap(lambda x: pl.run(mlp, x, [pl.ablate("0", "mean")]).output)(
            torch.randn(5, 4)
        )


def test_mean_ablation_of_token_ids_is_an_error() -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(pl.PurelensError, match="mean of integers"):
        pl.run(model, torch.tensor([[1, 2], [3, 4]]), [pl.ablate("0:input", "mean")])


def test_vmap_over_batches_mean_ablates_each_batch_as_its_own_run() -> None:
    mlp = TinyMLP()
    xs = torch.randn(5, 3, 4)
    outs = torch.func.vmap(lambda x: pl.run(mlp, x, [pl.ablate("0", "mean")]).output)(xs)
    for k in range(5):
        assert torch.allclose(outs[k], pl.run(mlp, xs[k], [pl.ablate("0", "mean")]).output)


@pytest.mark.parametrize(
    "writer",
    [pl.add("0:input", 0.5), pl.scale("0:input", 1.5), pl.replace("0:input", torch.ones(3))],
)
def test_a_float_value_on_an_integer_site_is_refused(writer: pl.Intervention) -> None:
    # Item 13: pl.add("wte:input", 0.5) was silently truncated.
    model = nn.Sequential(nn.Embedding(10, 4))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(pl.PurelensError, match="integer values"):
        pl.run(model, ids, [writer])


def test_integer_values_on_an_integer_site_and_any_on_floats_are_fine() -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    ids = torch.tensor([[1, 2, 3]])
    rec = pl.run(model, ids, [pl.add("0:input", 1), pl.save("0:input")])
    assert torch.equal(rec["0:input"], ids + 1)
    rec = pl.run(model, ids, [pl.add("0", torch.ones(4, dtype=torch.float64))])  # double -> float
    assert rec.output.dtype == torch.float32


def test_a_function_in_an_intervention_is_not_kept_alive_by_purelens() -> None:
    # Item 15: an lru_cache keyed on the function kept it, and all it captured, alive.
    mlp = TinyMLP()
    x = torch.randn(2, 4)
    captured = torch.randn(2, 8)
    alive = weakref.ref(captured)
    pl.run(mlp, x, [pl.patch("0", lambda v, c=captured: c)])
    pl.run(mlp, x, [pl.save("1"), pl.patch("2", lambda v, s, c=captured[:, :3]: v + c)])
    del captured
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize(("index", "length"), [(5, 4), (9, 4), (-5, 4)])
def test_at_an_int_outside_the_value_is_an_error(index: int, length: int) -> None:
    # Item 11: pl.at(int) wrapped around (index % length).
    model = nn.Sequential(nn.Identity())
    x = torch.randn(2, length, 3)
    with pytest.raises(pl.PurelensError, match=f"position {index} does not exist"):
        pl.run(model, x, [pl.save("0", pl.at(index))])
    with pytest.raises(pl.PurelensError, match=f"position {index} does not exist"):
        pl.run(model, x, [pl.patch("0", pl.at(index, torch.zeros_like))])


def test_a_plain_model_call_inside_a_patch_is_untouched_by_the_run() -> None:
    # Item 7 (its mechanism): the run's interventions act on its own forward only.
    mlp = TinyMLP()
    x = torch.randn(2, 4)
    inner = {}

    def patch(v: torch.Tensor) -> torch.Tensor:
        inner["out"] = mlp(x)  # a plain call of the same model, mid-run
        return v

    pl.run(mlp, x, [pl.patch("0", patch), pl.ablate("2")])
    assert torch.equal(inner["out"], mlp(x))


@pytest.mark.parametrize(
    ("dtype", "writer"),
    [
        (torch.int32, pl.add("0", torch.tensor(2**40))),  # int64 -> int32 wraps around
        (torch.float16, pl.add("0", 1e5)),  # overflows to inf
        (torch.float16, pl.replace("0", torch.tensor([7e4, 0.0]))),
    ],
)
def test_a_value_that_does_not_fit_the_sites_dtype_is_refused(
    dtype: torch.dtype, writer: pl.Intervention
) -> None:
    model = nn.Sequential(nn.Identity())
    with pytest.raises(pl.PurelensError, match="does not fit the site's"):
        pl.run(model, torch.zeros(1, 2, dtype=dtype), [writer])


def test_a_value_that_fits_after_rounding_is_fine() -> None:
    model = nn.Sequential(nn.Identity())
    out = pl.run(model, torch.zeros(1, 2, dtype=torch.float16), [pl.add("0", 0.1)]).output
    assert out.dtype == torch.float16 and torch.allclose(
        out.float(), torch.full((1, 2), 0.1), atol=1e-3
    )


def test_a_default_skip_hands_the_model_a_copy_of_its_input() -> None:
    # The skipped module's output was the input tensor itself, so `h += 1` changed the user's x.
    x = torch.randn(3, 4)
    kept = x.clone()
    out = pl.run(nn.Sequential(nn.Linear(4, 4), AddsInPlace()), x, [pl.skip("0")]).output
    assert torch.equal(x, kept) and torch.equal(out, kept + 1)


@pytest.mark.parametrize(
    "writer", [pl.ablate("0", batch=slice(5, 9)), pl.save("0", batch=slice(5, 9))]
)
def test_a_slice_selecting_no_rows_is_an_error(writer: pl.Intervention) -> None:
    model = nn.Sequential(nn.Identity())
    with pytest.raises(pl.PurelensError, match="selects rows outside the batch of size 2"):
        pl.run(model, torch.randn(2, 3), [writer])


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("zeros", "not a tensor"),
        (torch.zeros(3, 3), r"float32\[3, 3\], but the model's is float32\[8, 4\]"),
        (torch.zeros(8, 4, dtype=torch.float64), r"float64\[8, 4\]"),
    ],
)
def test_params_of_the_wrong_kind_are_refused(value: object, match: str) -> None:
    mlp = TinyMLP()
    with pytest.raises(pl.PurelensError, match=match):
        pl.run(mlp, torch.randn(2, 4), params={"layers.0.weight": value})  # type: ignore[dict-item]

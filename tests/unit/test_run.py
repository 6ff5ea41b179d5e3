"""run(): what each intervention does, in which order, and the errors it raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purelens as pl
from tests.helpers import TinyMLP


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def by_hand(mlp: TinyMLP, x: torch.Tensor, at: int, fn) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The MLP's output with `fn` applied to layer `at`'s output, computed by hand."""
    h = x
    for i, layer in enumerate(mlp.layers):
        h = layer(h)
        if i == at:
            h = fn(h)
    return h


def test_no_interventions_is_a_plain_call(mlp: TinyMLP, x: torch.Tensor) -> None:
    rec = pl.run(mlp, x)
    assert torch.equal(rec.output, mlp(x)) and len(rec) == 0


@pytest.mark.parametrize(
    ("iv", "fn"),
    [
        (pl.patch("0", lambda v: v * 3), lambda h: h * 3),
        (pl.replace("0", torch.arange(8.0)), lambda h: torch.arange(8.0).expand_as(h)),
        (pl.replace("0", 2.5), lambda h: torch.full_like(h, 2.5)),
        (pl.add("0", torch.ones(8)), lambda h: h + 1),
        (pl.scale("0", 0.5), lambda h: h * 0.5),
        (pl.scale("0", torch.tensor(-2.0)), lambda h: h * -2),
        (pl.ablate("0"), torch.zeros_like),
        (pl.ablate("0", "mean"), lambda h: h.mean(0, keepdim=True).expand_as(h)),
    ],
)
def test_each_writer_matches_the_hand_written_computation(
    mlp: TinyMLP, x: torch.Tensor, iv, fn
) -> None:  # type: ignore[no-untyped-def]
    rec = pl.run(mlp, x, [iv, pl.save("0")])
    expected = by_hand(mlp, x, 0, fn)
    assert torch.allclose(rec.output, expected)
    assert torch.allclose(rec["0"], fn(mlp.layers[0](x)))


def test_interventions_on_one_site_compose_in_list_order(mlp: TinyMLP, x: torch.Tensor) -> None:
    rec = pl.run(
        mlp,
        x,
        [
            pl.save("0", name="raw"),
            pl.add("0", 1.0),
            pl.save("0", name="added"),
            pl.scale("0", 2.0),
        ],
    )
    raw = mlp.layers[0](x)
    assert torch.equal(rec["raw"], raw)
    assert torch.allclose(rec["added"], raw + 1)
    assert torch.allclose(rec.output, by_hand(mlp, x, 0, lambda h: (h + 1) * 2))


def test_nested_lists_are_flattened_in_order(mlp: TinyMLP, x: torch.Tensor) -> None:
    rec = pl.run(mlp, x, [[pl.add("0", 1.0)], ([pl.scale("0", 2.0)], pl.save("0"))])
    assert torch.allclose(rec["0"], (mlp.layers[0](x) + 1) * 2)


def test_patch_sees_what_was_saved_earlier_in_the_pass(mlp: TinyMLP, x: torch.Tensor) -> None:
    seen = {}

    def fn(value: torch.Tensor, saved) -> torch.Tensor:  # type: ignore[no-untyped-def]
        seen["keys"] = list(saved)
        with pytest.raises(TypeError):
            saved["x"] = value
        return value + saved["first"].sum()

    rec = pl.run(mlp, x, [pl.save("0", name="first"), pl.patch("1", fn), pl.save("1")])
    first = mlp.layers[0](x)
    assert seen["keys"] == ["first"]
    assert torch.allclose(rec["1"], torch.tanh(first) + first.sum())


def test_save_with_fn_keeps_the_result(mlp: TinyMLP, x: torch.Tensor) -> None:
    rec = pl.run(mlp, x, [pl.save("0", lambda v: v[:, :2].sum())])
    assert torch.allclose(rec["0"], mlp.layers[0](x)[:, :2].sum())


@pytest.mark.parametrize(
    ("batch", "rows"), [(1, [1]), (-1, [2]), ([0, 2], [0, 2]), (slice(1, None), [1, 2])]
)
def test_batch_selects_rows(mlp: TinyMLP, x: torch.Tensor, batch, rows: list[int]) -> None:  # type: ignore[no-untyped-def]
    rec = pl.run(
        mlp, x, [pl.save("0", name="all"), pl.save("0", batch=batch), pl.ablate("0", batch=batch)]
    )
    assert torch.equal(rec["0"], rec["all"][rows])  # an int keeps its dimension
    out = rec.output
    clean = mlp(x)
    others = [r for r in range(3) if r not in rows]
    assert torch.equal(out[others], clean[others])
    assert torch.allclose(out[rows], mlp.layers[2](torch.tanh(torch.zeros(len(rows), 8))))


def test_batch_mean_ablation_averages_the_selected_rows(mlp: TinyMLP, x: torch.Tensor) -> None:
    rec = pl.run(mlp, x, [pl.ablate("0", "mean", batch=[0, 1]), pl.save("0")])
    h = mlp.layers[0](x)
    assert torch.allclose(rec["0"][:2], h[:2].mean(0).expand(2, 8))
    assert torch.equal(rec["0"][2], h[2])


def test_batch_outside_the_batch_is_an_error(mlp: TinyMLP, x: torch.Tensor) -> None:
    with pytest.raises(
        pl.PurelensError, match=r"`batch=5` at site '0' selects rows outside the batch of size 3"
    ):
        pl.run(mlp, x, [pl.ablate("0", batch=5)])


def test_stop_ends_the_pass_after_its_site(mlp: TinyMLP, x: torch.Tensor) -> None:
    ran = []
    handle = mlp.layers[2].register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        rec = pl.run(mlp, x, [pl.save("0"), pl.add("1", 1.0), pl.save("1"), pl.stop("1")])
    finally:
        handle.remove()
    assert rec.output is None and not ran
    assert torch.allclose(rec["1"], torch.tanh(mlp.layers[0](x)) + 1)


def test_sites_after_a_stop_never_run_and_that_is_an_error(mlp: TinyMLP, x: torch.Tensor) -> None:
    with pytest.raises(pl.PurelensError, match=r"stopped at '0', and site '2' had not run by then"):
        pl.run(mlp, x, [pl.stop("0"), pl.save("2")])


def test_skip_does_not_run_the_module(mlp: TinyMLP, x: torch.Tensor) -> None:
    calls = []
    handle = mlp.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        rec = pl.run(mlp, x, [pl.skip("layers.0", lambda v: v.repeat(1, 2)), pl.save("0")])
    finally:
        handle.remove()
    # Pre-hooks run (they belong to the call), the module's own forward does not.
    assert torch.equal(rec["0"], x.repeat(1, 2))
    assert torch.allclose(rec.output, mlp.layers[2](torch.tanh(x.repeat(1, 2))))


def test_skip_defaults_to_the_identity(mlp: TinyMLP, x: torch.Tensor) -> None:
    rec = pl.run(mlp, x, [pl.skip("1")])
    assert torch.allclose(rec.output, mlp.layers[2](mlp.layers[0](x)))


def test_skip_actually_avoids_the_computation() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("ran")

    model = nn.Sequential(nn.Identity(), Boom())
    assert torch.equal(pl.run(model, torch.ones(2), [pl.skip("1")]).output, torch.ones(2))
    with pytest.raises(RuntimeError, match="ran"):
        model(torch.ones(2))


class Pair(nn.Module):
    """Returns a tuple, as transformers' attention modules do; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        self.calls += 1
        return x * 2, None


class UnpacksPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.pair(x)
        return out + x


def test_a_skip_whose_value_is_not_shaped_as_the_output_is_an_error() -> None:
    # A tensor where the module returns a pair was unpacked into its two rows: for a batch
    # of two the model ran on, silently wrong (pl.skip on a GPT-2 attention module).
    model, x = UnpacksPair(), torch.randn(2, 3)
    for skip in (pl.skip("pair"), pl.skip("pair", lambda v: v * 0)):
        with pytest.raises(
            pl.PurelensError, match=r"(?s)returns a tuple of 2.*lambda x: \(x, None\)"
        ):
            pl.run(model, x, [skip])
    rec = pl.run(model, x, [pl.skip("pair", lambda v: (v * 0, None))])
    assert torch.equal(rec.output, x)
    assert model.pair.calls == 0  # the check ran it on fake tensors, and left it as it was


def test_a_skip_of_an_hf_attention_module_must_give_its_tuple(gpt2: nn.Module) -> None:
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(pl.PurelensError, match="GPT2Attention returns a tuple of 2"):
        pl.run(gpt2, ids, [pl.skip("h.0.attn")])
    zeroed = [pl.skip("h.0.attn", lambda v: (torch.zeros_like(v), None))]
    want = pl.run(gpt2, ids, [pl.ablate("h.0.attn")]).output.logits
    torch.testing.assert_close(pl.run(gpt2, ids, zeroed).output.logits, want)
    generated = pl.generate(gpt2, ids, zeroed, max_new_tokens=3, do_sample=False)
    ablated = pl.generate(gpt2, ids, [pl.ablate("h.0.attn")], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated.output, ablated.output)
    batched = torch.func.vmap(lambda row: pl.run(gpt2, row[None], zeroed).output.logits[0])(ids)
    torch.testing.assert_close(batched, want)


def test_tuple_and_dict_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.a(x) * y * scale

    model = TwoInputs()
    x, y = torch.randn(2, 2), torch.randn(2, 2)
    assert torch.equal(pl.run(model, (x, y)).output, model(x, y))
    assert torch.equal(pl.run(model, {"x": x, "y": y}, scale=2.0).output, model(x, y, scale=2.0))
    assert torch.equal(pl.run(model, (x, y), [pl.save("a:input")])["a:input"], x)


def test_params_replace_the_model_parameters(mlp: TinyMLP, x: torch.Tensor) -> None:
    params = {k: torch.zeros_like(v) for k, v in mlp.named_parameters()}
    rec = pl.run(mlp, x, [pl.save("0")], params=params)
    assert torch.equal(rec["0"], torch.zeros(3, 8)) and torch.equal(rec.output, torch.zeros(3, 3))
    partial = {"layers.2.bias": torch.ones(3)}
    assert torch.allclose(pl.run(mlp, x, params=partial).output, mlp(x) - mlp.layers[2].bias + 1)


def test_unknown_params_are_an_error(mlp: TinyMLP, x: torch.Tensor) -> None:
    with pytest.raises(pl.PurelensError, match=r"'layers\.9\.weight' is not one of the model's"):
        pl.run(mlp, x, params={"layers.9.weight": torch.zeros(1)})
    with pytest.raises(pl.PurelensError, match="must be a mapping"):
        pl.run(mlp, x, params=[torch.zeros(1)])  # type: ignore[arg-type]


def test_wrong_shape_names_the_site_and_both_shapes(mlp: TinyMLP, x: torch.Tensor) -> None:
    with pytest.raises(pl.PurelensError) as info:
        pl.run(mlp, x, [pl.patch("layers.0", lambda v: v[:, :4])])
    message = str(info.value)
    assert "site 'layers.0'" in message
    assert "float32[3, 4]" in message and "float32[3, 8]" in message


def test_wrong_dtype_is_an_error(mlp: TinyMLP, x: torch.Tensor) -> None:
    with pytest.raises(pl.PurelensError, match=r"float64\[3, 8\].*float32\[3, 8\]"):
        pl.run(mlp, x, [pl.patch("0", lambda v: v.double())])


def test_patch_returning_a_non_tensor_is_an_error(mlp: TinyMLP, x: torch.Tensor) -> None:
    with pytest.raises(pl.PurelensError, match=r"returned None, not a torch\.Tensor"):
        pl.run(mlp, x, [pl.patch("0", lambda v: None)])  # type: ignore[arg-type, return-value]


def test_replace_that_does_not_broadcast_is_an_error(mlp: TinyMLP, x: torch.Tensor) -> None:
    with pytest.raises(
        pl.PurelensError, match=r"shape \[5\] does not broadcast to the site's shape \[3, 8\]"
    ):
        pl.run(mlp, x, [pl.replace("0", torch.zeros(5))])


def test_an_add_that_does_not_broadcast_is_an_error(mlp: TinyMLP, x: torch.Tensor) -> None:
    # a delta of another shape, and one that would grow the value (never broadcast it up)
    for delta, shape in ((torch.zeros(5), r"\[5\]"), (torch.zeros(2, 3, 8), r"\[2, 3, 8\]")):
        with pytest.raises(
            pl.PurelensError,
            match=rf"shape {shape} does not broadcast to the site's shape \[3, 8\]",
        ):
            pl.run(mlp, x, [pl.add("0", delta)])
    torch.testing.assert_close(
        pl.run(mlp, x, [pl.add("0", torch.ones(8)), pl.save("0")])["0"],
        pl.run(mlp, x, [pl.save("0")])["0"] + 1,
    )


def test_add_casts_the_delta_to_the_site_dtype(mlp: TinyMLP, x: torch.Tensor) -> None:
    rec = pl.run(mlp, x, [pl.add("0", torch.ones(8, dtype=torch.float64)), pl.save("0")])
    assert rec["0"].dtype == torch.float32


def test_duplicate_save_names_are_an_error(mlp: TinyMLP, x: torch.Tensor) -> None:
    with pytest.raises(pl.PurelensError, match="two saves are named 'h'"):
        pl.run(mlp, x, [pl.save("0", name="h"), pl.save("1", name="h")])


def test_site_that_never_runs_is_an_error(x: torch.Tensor) -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(pl.PurelensError, match=r"site 'unused' did not run in this forward pass"):
        pl.run(Unused(), x, [pl.save("used"), pl.add("unused", 1.0)])


def test_step_other_than_zero_never_applies_in_run(mlp: TinyMLP, x: torch.Tensor) -> None:
    with pytest.raises(pl.PurelensError, match="not at the selected step=3"):
        pl.run(mlp, x, [pl.save("0", step=0), pl.add("0", 1.0, step=3)])


def test_saving_a_module_called_twice_is_an_error() -> None:
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    with pytest.raises(pl.PurelensError, match="ran more than once in one pass"):
        pl.run(model, torch.randn(1, 2), [pl.save("0")])
    # A patch applies at every call.
    out = pl.run(model, torch.randn(1, 2), [pl.ablate("0")]).output
    assert torch.equal(out, torch.zeros(1, 2))


def test_value_changed_in_place_after_save_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True))
    with pytest.raises(pl.PurelensError, match=r"(?s)changed in place.*pl.save\('0', torch.clone"):
        pl.run(model, -torch.ones(1, 2), [pl.save("0")])
    rec = pl.run(model, -torch.ones(1, 2), [pl.save("0", torch.clone)])
    assert torch.allclose(
        rec["0"], nn.functional.linear(-torch.ones(1, 2), model[0].weight, model[0].bias)
    )


def test_intervention_errors_propagate_unchanged(mlp: TinyMLP, x: torch.Tensor) -> None:
    def fails(v: torch.Tensor) -> torch.Tensor:
        raise ValueError("from the user")

    with pytest.raises(ValueError, match="from the user"):
        pl.run(mlp, x, [pl.patch("1", fails)])


def test_model_must_be_a_module(x: torch.Tensor) -> None:
    with pytest.raises(pl.PurelensError, match=r"must be a torch\.nn\.Module, got function"):
        pl.run(lambda t: t, x)  # type: ignore[arg-type]


def test_text_without_tokenizer_is_an_error(mlp: TinyMLP) -> None:
    with pytest.raises(pl.PurelensError, match="needs `tokenizer=`"):
        pl.run(mlp, "hello")


def test_module_returning_no_tensor_is_an_error() -> None:
    class Meta(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, int]:
            return {"n": x.shape[0]}

    model = nn.Sequential(Meta())
    with pytest.raises(pl.PurelensError, match="output is dict, which holds no tensor"):
        pl.run(model, torch.ones(2), [pl.save("0")])


class PairOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x * 10


class UsesPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = PairOut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.pair(x)
        return first + second


def test_patching_a_tuple_output_replaces_only_its_first_tensor() -> None:
    model = UsesPair()
    x = torch.ones(1, 2)
    rec = pl.run(model, x, [pl.ablate("pair"), pl.save("pair")])
    assert torch.equal(rec["pair"], torch.zeros(1, 2))
    assert torch.equal(rec.output, x * 10)  # the second element was kept


def test_patching_a_mapping_output_keeps_its_type_and_other_items() -> None:
    from collections import OrderedDict

    class DictOut(nn.Module):
        def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
            return OrderedDict(hidden=x * 3, mask=x > 0)

    model = nn.Sequential(DictOut())
    x = torch.tensor([[1.0, -1.0]])
    out = pl.run(model, x, [pl.scale("0", 2.0)]).output
    assert type(out) is OrderedDict and list(out) == ["hidden", "mask"]
    assert torch.equal(out["hidden"], x * 6) and torch.equal(out["mask"], x > 0)


def test_validate_raises_before_any_real_compute(mlp: TinyMLP, x: torch.Tensor) -> None:
    seen = []

    def narrows(v: torch.Tensor) -> torch.Tensor:
        seen.append(type(v).__name__)
        return v[:, :2]

    def keeps(v: torch.Tensor) -> torch.Tensor:
        seen.append(type(v).__name__)
        return v

    with pytest.raises(pl.PurelensError, match=r"float32\[3, 2\].*float32\[3, 8\]"):
        pl.run(mlp, x, [pl.save("1"), pl.patch("1", narrows)], validate=True)
    assert seen == ["FakeTensor"]  # the real pass never started
    seen.clear()
    mlp.unused = nn.Linear(4, 4)
    with pytest.raises(pl.PurelensError, match="site 'unused' did not run"):
        pl.run(mlp, x, [pl.patch("1", keeps), pl.save("unused")], validate=True)
    assert seen == ["FakeTensor"]


def test_validate_passes_a_good_plan_and_changes_nothing(mlp: TinyMLP, x: torch.Tensor) -> None:
    ivs = [pl.save("1"), pl.add("0", torch.ones(8)), pl.ablate("2", batch=1)]
    checked = pl.run(mlp, x, ivs, validate=True)
    plain = pl.run(mlp, x, ivs)
    assert torch.equal(checked.output, plain.output) and torch.equal(checked["1"], plain["1"])
    assert all(type(p) is nn.Parameter for p in mlp.parameters())


def test_validate_reports_what_it_cannot_trace(mlp: TinyMLP, x: torch.Tensor) -> None:
    def data_dependent(v: torch.Tensor) -> torch.Tensor:
        return v * 0 if v.sum().item() > 0 else v

    with pytest.raises(pl.PurelensError, match="validate=True could not run the model on fake"):
        pl.run(mlp, x, [pl.patch("0", data_dependent)], validate=True)

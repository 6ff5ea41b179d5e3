"""`call=` for modules the model calls several times, and `*` wildcard sites."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purelens as pl


class Looped(nn.Module):
    """One block applied three times (a weight-tied loop)."""

    def __init__(self, calls: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.calls = calls
        self.embed = nn.Linear(4, 4)
        self.block = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(self.calls):
            h = torch.tanh(self.block(h))
        return self.out(h)


def by_hand(model: Looped, x: torch.Tensor, change: dict[int, object] | None = None) -> list:
    """The block's inputs and outputs at each call, with `change[k](output)` at call k."""
    change = change or {}
    h, inputs, outputs = model.embed(x), [], []
    for k in range(model.calls):
        inputs.append(h)
        out = model.block(h)
        if k in change:
            out = change[k](out)  # type: ignore[operator]
        outputs.append(out)
        h = torch.tanh(out)
    return [inputs, outputs, model.out(h)]


@pytest.fixture
def looped() -> Looped:
    return Looped()


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))


def test_saves_by_call(looped: Looped) -> None:
    inputs, outputs, _ = by_hand(looped, X)
    rec = pl.run(
        looped,
        X,
        [
            pl.save("block", call=slice(None), name="all"),
            pl.save("block", call=1, name="second"),
            pl.save("block:input", call=2, name="third_in"),
            pl.save("block", call=[2, 0], name="two"),
        ],
    )
    assert isinstance(rec["all"], tuple) and len(rec["all"]) == 3
    for k in range(3):
        assert torch.equal(rec["all"][k], outputs[k])
    assert torch.equal(rec["second"], outputs[1])
    assert torch.equal(rec["third_in"], inputs[2])
    assert len(rec["two"]) == 2 and torch.equal(rec["two"][0], outputs[0])  # in call order


def test_writers_by_call(looped: Looped) -> None:
    *_, expected = by_hand(looped, X, {1: lambda v: v * 0})
    assert torch.equal(pl.run(looped, X, [pl.scale("block", 0.0, call=1)]).output, expected)
    *_, every = by_hand(looped, X, {k: (lambda v: v * 0) for k in range(3)})
    assert torch.equal(pl.run(looped, X, [pl.scale("block", 0.0)]).output, every)


def test_stop_and_skip_by_call(looped: Looped) -> None:
    rec = pl.run(looped, X, [pl.save("block", call=slice(None)), pl.stop("block", call=1)])
    assert rec.output is None and len(rec["block"]) == 2
    inputs, _, _ = by_hand(looped, X)
    skipped = pl.run(looped, X, [pl.skip("block", call=2), pl.save("block:input", call=2)])
    h = inputs[2]
    assert torch.equal(skipped.output, looped.out(torch.tanh(h)))


def test_without_call_a_save_of_a_repeated_module_says_to_use_call(looped: Looped) -> None:
    with pytest.raises(pl.PurelensError, match="call=slice"):
        pl.run(looped, X, [pl.save("block")])


def test_a_call_that_never_matches_gives_the_count(looped: Looped) -> None:
    with pytest.raises(pl.PurelensError, match=r"ran 3 time\(s\) per pass at most.*call=5"):
        pl.run(looped, X, [pl.save("block", call=5)])


def test_bad_calls_are_refused() -> None:
    for bad in (-1, "0", 1.5, [], [0, -2], slice(-1, None)):
        with pytest.raises(pl.PurelensError, match="call"):
            pl.save("block", call=bad)


def test_gradients_by_call(looped: Looped) -> None:
    rec = pl.run(looped, X, [pl.save_grad("block", call=slice(None))], loss=lambda o: o.sum())
    grads = rec.grads["block"]
    assert isinstance(grads, tuple) and len(grads) == 3
    one = pl.run(looped, X, [pl.save_grad("block", call=0)], loss=lambda o: o.sum())
    assert torch.allclose(one.grads["block"], grads[0])

    def out(v: torch.Tensor) -> torch.Tensor:
        return pl.run(looped, X, [pl.add("block", v, call=2)]).output.sum()

    v = torch.zeros(4, requires_grad=True)
    out(v).backward()
    assert torch.allclose(torch.func.grad(out)(torch.zeros(4)), v.grad)


@settings(max_examples=10, deadline=None)
@given(call=st.integers(0, 2), scale=st.floats(-2.0, 2.0, allow_nan=False))
def test_vmap_over_a_call_equals_a_loop(call: int, scale: float) -> None:
    model = Looped()
    vectors = torch.randn(3, 4, generator=torch.Generator().manual_seed(2)) * scale

    def run(v: torch.Tensor) -> torch.Tensor:
        return pl.run(model, X, [pl.add("block", v, call=call)]).output

    batched = torch.func.vmap(run)(vectors)
    looped = torch.stack([run(v) for v in vectors])
    assert torch.allclose(batched, looped, atol=1e-6)


def test_calls_count_again_at_each_generation_step() -> None:
    from tests.helpers import tiny_gpt2

    model = tiny_gpt2(n_layer=2)
    model.transformer.h[0] = _Twice(model.transformer.h[0])
    ids = torch.randint(1, 97, (1, 4))
    rec = pl.generate(
        model,
        ids,
        [pl.save("h.0.block", call=slice(None)), pl.save("h.0.block", step=1, call=1, name="s1")],
        max_new_tokens=2,
        do_sample=False,
    )
    steps = rec["h.0.block"]
    assert len(steps) == 2 and all(len(calls) == 2 for calls in steps)  # 2 forward passes
    assert torch.equal(rec["s1"], steps[1][1])


class _Twice(nn.Module):
    """A GPT-2 block run twice on the hidden states (the cache sees only the second call)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor, *args: object, **kwargs: object) -> object:
        kwargs.pop("past_key_values", None)
        first = self.block(hidden, *args, **kwargs)
        first = first[0] if isinstance(first, tuple) else first
        return self.block(first, *args, **kwargs)


def test_edits_count_calls_per_forward(looped: Looped) -> None:
    edited = pl.edit(looped, [pl.scale("block", 0.0, call=1)])
    *_, expected = by_hand(looped, X, {1: lambda v: v * 0})
    assert torch.equal(edited(X), expected)
    assert torch.equal(edited(X), expected)  # again: the count starts over


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
        self.unused = nn.ModuleList([nn.Linear(3, 3)])
        self.head = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_wildcards_save_every_match_under_its_own_name() -> None:
    model, x = Stack(), torch.randn(2, 3)
    rec = pl.run(model, x, [pl.save("layers.*"), pl.save("layers.*:input")])
    assert sorted(rec) == sorted(
        [f"layers.{i}" for i in range(3)] + [f"layers.{i}:input" for i in range(3)]
    )
    h = x
    for i, layer in enumerate(model.layers):
        assert torch.equal(rec[f"layers.{i}:input"], h)
        h = layer(h)
        assert torch.equal(rec[f"layers.{i}"], h)


def test_wildcard_writers_apply_at_every_match_and_skip_modules_that_never_run() -> None:
    model, x = Stack(), torch.randn(2, 3)
    # `unused.0` matches '*.0' but never runs: skipped, since another match runs
    out = pl.run(model, x, [pl.scale("*.0", 0.0)]).output
    h = torch.zeros(2, 3)
    for layer in model.layers[1:]:
        h = layer(h)
    assert torch.equal(out, model.head(h))
    with pytest.raises(pl.PurelensError, match="did not run"):
        pl.run(model, x, [pl.save("unused.*")])


def test_wildcard_errors() -> None:
    model = Stack()
    with pytest.raises(pl.PurelensError, match="name"):
        pl.save("layers.*", name="x")
    with pytest.raises(pl.SiteError, match="matches no module"):
        pl.run(model, torch.randn(1, 3), [pl.save("blocks.*")])
    with pytest.raises(pl.SiteError, match="whole path component"):
        pl.save("layers.x*")

    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList([nn.Linear(2, 2)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer[0](x)

    class EncoderDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = Half(), Half()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.encoder(x))

    with pytest.raises(pl.SiteError, match="fill its"):  # both would be 'layer.0'
        pl.run(EncoderDecoder(), torch.ones(1, 2), [pl.save("layer.*")])
    rec = pl.run(EncoderDecoder(), torch.ones(1, 2), [pl.save("*.layer.*")])
    assert sorted(rec) == ["decoder.layer.0", "encoder.layer.0"]


def test_wildcards_and_calls_serialize() -> None:
    ivs = [pl.save("h.*.attn:pattern", call=[0, 2]), pl.add("h.*", 1.0, call=slice(1, None))]
    assert pl.loads(pl.dumps(ivs)) == ivs


def test_a_stop_acts_only_at_what_it_selects(looped: Looped) -> None:
    # A run is step 0: a stop at step 1 never acts (it used to stop the pass anyway).
    with pytest.raises(pl.PurelensError, match="not at the selected step=1"):
        pl.run(looped, X, [pl.stop("embed", step=1)])


class Ops(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y.add_(1)
        a, b = y.split(2, -1)
        return a + b


def test_op_sites_on_a_module_of_ones_own() -> None:
    x = torch.ones(2, 4)
    assert pl.sites(Ops(), x, ops=True) == ["", "#mul.0", "#split.0", "#add.0"]
    rec = pl.run(Ops(), x, [pl.save("#mul.0", torch.clone), pl.patch("#add.0", torch.zeros_like)])
    assert torch.equal(rec["#mul.0"], x * 2) and torch.equal(rec.output, torch.zeros(2, 2))
    with pytest.raises(pl.PurelensError, match="in-place operation"):
        pl.run(Ops(), x, [pl.save("#add_.0")])
    with pytest.raises(pl.PurelensError, match="returns a tuple of 2"):
        pl.run(Ops(), x, [pl.save("#split.0")])
    with pytest.raises(pl.PurelensError, match="needs an example input"):
        pl.sites(Ops(), ops=True)

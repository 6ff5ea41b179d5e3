"""Plans are built once per model and structure, and never used once they are stale."""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purelens as pl
from purelens import _plan
from tests.helpers import Sliced


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def manual(model: nn.Sequential, x: torch.Tensor, index: int) -> torch.Tensor:
    """The output of `model[index]`, computed without purelens."""
    out = x
    for module in list(model)[: index + 1]:
        out = module(out)
    return out


@contextlib.contextmanager
def counted_builds() -> Iterator[list[object]]:
    """The plans `Plan.build` makes inside the block (their interventions)."""
    builds: list[object] = []
    real = _plan.Plan.build.__func__  # type: ignore[attr-defined]

    def counting(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        builds.append(args[1])
        return real(cls, *args, **kwargs)

    _plan.Plan.build = classmethod(counting)  # type: ignore[method-assign, assignment]
    try:
        yield builds
    finally:
        _plan.Plan.build = classmethod(real)  # type: ignore[method-assign, assignment]


def test_a_structure_is_planned_once_and_bound_to_each_calls_leaves() -> None:
    model, x = mlp(), torch.randn(5, 3)
    with counted_builds() as builds:
        for scale in (0.0, 1.0, 2.0, 3.0):
            vector = torch.full((4,), scale)
            rec = pl.run(model, x, [pl.add("2", vector), pl.save("2")])
            assert torch.allclose(rec["2"], manual(model, x, 2) + vector)
    assert len(builds) == 1  # the first call builds it; the others bind


def test_a_replaced_submodule_is_seen() -> None:
    model, x = mlp(), torch.randn(5, 3)
    pl.run(model, x, [pl.save("2")])
    old = model[2]  # still alive: the cached plan's module is not gone, only moved out
    model[2] = nn.Linear(4, 4)
    assert torch.equal(pl.run(model, x, [pl.save("2")])["2"], manual(model, x, 2))
    assert not torch.equal(old(manual(model, x, 1)), manual(model, x, 2))


def test_a_removed_item_of_a_module_list_is_seen() -> None:
    # Deleting from a ModuleList renumbers the later items without registering anything.
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    model = nn.Sequential()
    model.layers = layers

    def forward(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = layer(x)
        return x

    model.forward = forward  # type: ignore[method-assign]
    x = torch.randn(2, 4)
    pl.run(model, x, [pl.save("layers.1")])
    del layers[0]
    assert torch.equal(pl.run(model, x, [pl.save("layers.1")])["layers.1"], layers[1](layers[0](x)))


def test_training_mode_and_new_parameters_are_seen() -> None:
    model, x = mlp(), torch.randn(5, 3)
    pl.run(model, x, [pl.save("2")])
    with torch.no_grad():
        model[2].weight.mul_(2)
    model[2].bias = nn.Parameter(torch.ones(4))
    model.train()
    assert torch.equal(pl.run(model, x, [pl.save("2")])["2"], manual(model, x, 2))


def adding(held: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda value: value + held


def test_the_cache_holds_no_model_and_no_function() -> None:
    model, x = mlp(), torch.randn(5, 3)
    held = torch.ones(4)
    pl.run(model, x, [pl.patch("", lambda v: v), pl.patch("2", adding(held)), pl.skip("3")])
    model_ref, held_ref = weakref.ref(model), weakref.ref(held)
    del model, held
    gc.collect()
    assert model_ref() is None and held_ref() is None


def test_the_cache_is_bounded() -> None:
    model, x = mlp(), torch.randn(5, 3)
    for i in range(_plan._MAX_TEMPLATES + 20):
        pl.run(model, x, [pl.save("2", name=f"n{i}")])
    assert len(_plan._templates[id(model)][1]) == _plan._MAX_TEMPLATES


def test_threads_sharing_a_structure_get_their_own_values() -> None:
    model, x = mlp(), torch.randn(5, 3)
    base = manual(model, x, 2)
    wrong: list[int] = []

    def work(k: int) -> None:
        for _ in range(20):
            vector = torch.full((4,), float(k))
            if not torch.allclose(pl.run(model, x, [pl.add("2", vector), pl.save("2")])["2"],
                                  base + vector):  # fmt: skip
                wrong.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.sampled_from(["0", "2", "4", "-1", "*"]), min_size=1, max_size=4, unique=True),
    st.data(),
)
def test_cached_plans_equal_fresh_ones(sites: list[str], data: st.DataObject) -> None:
    model, x = mlp(), torch.randn(5, 3)
    ivs = [
        pl.save(site) if site == "*" else pl.save(site, name=f"s{i}")
        for i, site in enumerate(sites)
    ]
    first = pl.run(model, x, ivs)
    vector = torch.full((4,), data.draw(st.floats(-2, 2)))
    again = pl.run(model, x, [*ivs, pl.add("2", vector)])  # another structure
    assert pl.run(model, x, ivs).keys() == first.keys()
    for name, value in first.items():
        assert torch.equal(pl.run(model, x, ivs)[name], value)
    assert torch.allclose(again.output, model[4](model[3](manual(model, x, 2) + vector)))


def test_a_skip_at_a_second_path_that_was_deleted_is_seen() -> None:
    # Found in review: the template checked the module's first path, not the skip's.
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.r, self.b = nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.r(self.a(x)))

    model, x = Shared(), torch.ones(2, 3)
    model.add_module("alias", model.r)
    pl.run(model, x, [pl.skip("alias")])
    del model.alias
    with pytest.raises(pl.SiteError, match="alias"):
        pl.run(model, x, [pl.skip("alias")])


def test_a_structure_key_never_holds_a_method_bound_to_a_tensor() -> None:
    import gc
    import weakref

    from purelens._tree import structure

    t = torch.ones(1000)
    kept = weakref.ref(t)
    key = structure([pl.patch("h.0", t.add)])
    assert key is None
    del t
    gc.collect()
    assert kept() is None
    assert structure([pl.patch("h.0", torch.tanh)]) is not None


def test_a_forward_that_slices_a_module_list_keeps_the_plan() -> None:
    # Before: every container made anywhere counted as a change of every model's tree,
    # so such a model (and every other) re-listed its modules and re-planned each call.
    torch.manual_seed(0)
    model, x = Sliced(4), torch.randn(2, 4)
    with counted_builds() as builds:
        for _ in range(3):
            rec = pl.run(model, x, [pl.save("layers.1")])
            assert torch.equal(rec["layers.1"], model.layers[1](model.layers[0](x)))
    assert len(builds) == 1
    # A child the model itself gains is still seen: the suffix "1" is now ambiguous.
    model.extra = nn.Sequential(nn.Identity(), nn.Identity())
    with pytest.raises(pl.SiteError, match="ambiguous"):
        pl.run(model, x, [pl.save("1")])


def test_nodes_that_need_the_calls_context_never_share_a_layout_with_ones_that_do_not() -> None:
    # A zero ablation needs none of the context a function gets; a mean ablation reads
    # the batch's padding from it. One after the other, on one site, in a padded batch:
    # the mean must still count only the real tokens.
    torch.manual_seed(0)
    model = ByName(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)))
    embeds = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    inputs = {"inputs_embeds": embeds, "attention_mask": mask}

    def run(how: str) -> torch.Tensor:
        return pl.run(model, inputs, [pl.ablate("inner.0", how=how), pl.save("inner.0")])["inner.0"]

    run("zero")
    after_zero = run("mean")
    _plan._templates.clear()  # a fresh plan
    fresh = run("mean")
    assert torch.equal(after_zero, fresh)
    real = model.inner[0](embeds)[mask.bool()]
    assert torch.allclose(fresh[0, 0], real.mean(0))


class ByName(nn.Module):
    """A model called with embeddings and an attention mask, as an HF model is."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner(inputs_embeds)


class TwoPaths(nn.Module):
    """A site "a.fc" that is a path, and the suffix of another path ("x.a.fc")."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Module()
        self.a.fc = nn.Linear(4, 4)
        self.x = nn.Module()
        self.x.a = nn.Module()
        self.x.a.fc = nn.Linear(4, 4)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        fc = getattr(self.a, "fc", None)
        return self.x.a.fc(t if fc is None else fc(t))


def test_a_deleted_and_collected_module_is_seen() -> None:
    model, x = TwoPaths(), torch.randn(2, 4)
    pl.run(model, x, [pl.save("a.fc")])
    del model.a.fc  # no registration hook sees a deletion
    gc.collect()
    rec = pl.run(model, x, [pl.save("a.fc")])  # now the suffix of "x.a.fc"
    assert torch.equal(rec["a.fc"], model(x))
    del model.x.a.fc
    gc.collect()
    with pytest.raises(pl.SiteError, match="matches no module"):
        pl.run(model, x, [pl.save("a.fc")])


def test_a_model_collected_while_the_cache_is_locked_does_not_deadlock() -> None:
    # A weak reference's callback runs in whatever thread collects: one that holds the
    # cache's lock (inside Plan.cached) must not wait for it.
    def collect_under_lock() -> None:
        model = mlp()
        pl.run(model, torch.randn(5, 3), [pl.save("2")])
        cycle: list[object] = [model]
        cycle.append(cycle)  # freed only by the collector
        del model, cycle
        with _plan._cache_lock:
            gc.collect()

    thread = threading.Thread(target=collect_under_lock, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_module_classes_made_on_the_fly_are_not_kept() -> None:
    def make() -> nn.Module:
        class Probe(nn.Linear):
            pass

        return Probe(3, 3)

    model = make()
    pl.run(model, torch.randn(2, 3), [pl.save("")])
    kind = weakref.ref(type(model))
    del model
    gc.collect()
    assert kind() is None


def test_an_intervention_class_with_slots_only_works() -> None:
    import dataclasses

    from purelens._interventions import Writer

    @dataclasses.dataclass(frozen=True, slots=True, eq=False, repr=False)
    class Clamp(Writer):
        site: str
        step: object = None
        batch: object = None
        call: object = None

        def new_value(self, rows: torch.Tensor, saved: object) -> torch.Tensor:
            return rows.clamp(-0.1, 0.1)

    model, x = mlp(), torch.randn(5, 3)
    for _ in range(2):
        rec = pl.run(model, x, [Clamp("0"), pl.save("0")])  # type: ignore[abstract]
        assert torch.allclose(rec["0"], model[0](x).clamp(-0.1, 0.1))

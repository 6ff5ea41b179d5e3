"""pl.compile: the same Records as eager pl.run, compiled once per structure, never stale.

Most tests compile with dynamo's ``eager`` backend or a counting one (dynamo
traces, nothing is generated), which takes milliseconds; one test compiles
with inductor, the default.
"""

from __future__ import annotations

import gc
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import purelens as pl
from purelens._errors import PurelensWarning
from tests.helpers import Sliced


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()


class Counting:
    """A dynamo backend that counts the graphs it is given (compiles and recompiles)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs: Any) -> Callable[..., Any]:
        self.graphs += 1
        return gm.forward


def assert_same(got: pl.Record, want: pl.Record) -> None:
    torch.testing.assert_close(got.output, want.output)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


X = torch.randn(5, 8)


def every_builder() -> list[list[Any]]:
    v = torch.randn(16)
    return [
        [pl.save("0"), pl.save("2:input", name="in")],
        [pl.add("0", v), pl.save("2")],
        [pl.add("0", 0.5), pl.scale("2", 2.0), pl.save("3")],
        [pl.replace("2", torch.ones(5, 16)), pl.save("4")],
        [pl.patch("0", torch.tanh), pl.save("1")],
        [pl.save("0", name="a"), pl.patch("2", lambda v, saved: v + saved["a"])],
        [pl.ablate("2"), pl.save("3")],
        [pl.ablate("2", "mean"), pl.save("3")],
        [pl.add("0", v, batch=[0, 2]), pl.scale("2", 3.0, batch=slice(1, 3))],
        [pl.patch("2", pl.at(1, lambda v: v * 0))],
        [pl.save("0", lambda v: v.sum(-1), name="sums")],
        [pl.add("", torch.ones(4))],  # the root itself
    ]


@pytest.mark.parametrize("ivs", every_builder())
def test_every_builder_gives_what_eager_gives(ivs: list[Any]) -> None:
    model = mlp()
    cm = pl.compile(model, backend="eager")
    want = pl.run(model, X, ivs)
    for _ in range(3):  # the first call runs eagerly, the next ones compiled
        assert_same(pl.run(cm, X, ivs), want)


def test_a_sweep_of_64_vectors_compiles_once() -> None:
    model = mlp()
    backend = Counting()
    cm = pl.compile(model, backend=backend)
    vectors = torch.randn(64, 16)
    for i, v in enumerate(vectors):
        ivs = [pl.add("2", v), pl.scale("0", float(i)), pl.save("3")]
        assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))
    assert backend.graphs == 1  # no graph breaks, no recompiles


def test_inductor_gives_what_eager_gives() -> None:
    model = mlp()
    cm = pl.compile(model)
    for _ in range(3):
        v = torch.randn(16)
        ivs = [pl.add("0", v), pl.save("2"), pl.ablate("3", "mean")]
        assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))


def test_the_model_is_never_changed() -> None:
    model = mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cm = pl.compile(model, backend="eager")
    for _ in range(2):
        pl.run(cm, X, [pl.add("2", torch.randn(16)), pl.save("0")])
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    bare = torch.compile(model, backend="eager")
    torch.testing.assert_close(bare(X), model(X))  # a plain compile beside it stays right


def test_training_mode_is_seen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 4)).eval()
    cm = pl.compile(model, backend="eager")
    ivs = [pl.save("1")]
    for _ in range(2):
        assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))
    model.train()
    rec = pl.run(cm, X, ivs)
    assert (rec["1"] == 0).any()  # dropout acts: the clone follows model.train()
    model.eval()
    assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))


def test_a_replaced_submodule_is_seen() -> None:
    model = mlp()
    cm = pl.compile(model, backend="eager")
    ivs = [pl.save("2"), pl.add("3", torch.ones(16))]
    for _ in range(2):
        pl.run(cm, X, ivs)
    model[2] = nn.Linear(16, 16)
    assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))
    model[0].weight = nn.Parameter(torch.zeros(16, 8))  # parameters are the model's own
    assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))


def test_a_hook_there_at_the_first_call_does_not_keep_the_structure_eager() -> None:
    model = mlp()
    backend = Counting()
    cm = pl.compile(model, backend=backend)
    ivs = [pl.save("2")]
    handle = model[1].register_forward_hook(lambda *a: None)
    with pytest.warns(PurelensWarning, match="hooks of its own"):
        pl.run(cm, X, ivs)
    handle.remove()
    for _ in range(3):
        assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))
    assert backend.graphs == 1


def test_hooks_added_to_the_model_are_not_skipped() -> None:
    model = mlp()
    cm = pl.compile(model, backend="eager")
    ivs = [pl.save("2")]
    for _ in range(2):
        pl.run(cm, X, ivs)
    handle = model[4].register_forward_hook(lambda m, a, out: out * 0)
    try:
        with pytest.warns(PurelensWarning, match="hooks of its own"):
            rec = pl.run(cm, X, ivs)
        assert torch.equal(rec.output, torch.zeros(5, 4))
    finally:
        handle.remove()
    assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))


def test_an_edited_model_is_right() -> None:
    model = mlp()
    edited = pl.edit(model, [pl.scale("2", 2.0)])
    cm = pl.compile(edited, backend="eager")
    ivs = [pl.save("2"), pl.add("0", torch.ones(16))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PurelensWarning)
        for _ in range(3):
            assert_same(pl.run(cm, X, ivs), pl.run(edited, X, ivs))


@pytest.mark.parametrize(
    "ivs, why",
    [
        ([pl.stop("2"), pl.save("0")], "stop"),
        ([pl.skip("2"), pl.save("3")], "skip"),
        ([pl.save("2", step=0)], "step="),
        ([pl.save_grad("2")], "loss="),
    ],
)
def test_what_is_not_compiled_runs_eagerly_and_says_so_once(ivs: list[Any], why: str) -> None:
    model = mlp()
    cm = pl.compile(model, backend="eager")
    loss = (lambda out: out.sum()) if why == "loss=" else None
    want = pl.run(model, X, ivs, loss=loss)
    with pytest.warns(PurelensWarning, match=why):
        for _ in range(2):
            got = pl.run(cm, X, ivs, loss=loss)
    assert set(got) == set(want) and set(got.grads) == set(want.grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PurelensWarning)  # once per handle and reason
        pl.run(cm, X, ivs, loss=loss)


def test_errors_are_purelens_own() -> None:
    cm = pl.compile(mlp(), backend="eager")
    with pytest.raises(pl.SiteError, match="9"):
        pl.run(cm, X, [pl.save("9")])
    with pytest.raises(pl.PurelensError, match="shape"):
        pl.run(cm, X, [pl.replace("2", torch.ones(3))])


def test_fresh_functions_every_call_warn() -> None:
    model = mlp()
    cm = pl.compile(model, backend="eager")
    with pytest.warns(PurelensWarning, match="new function objects"):
        for k in range(6):
            pl.run(cm, X, [pl.patch("2", lambda v, k=k: v * k)])


def test_threads_sharing_a_structure_get_their_own_values() -> None:
    model = mlp()
    cm = pl.compile(model, backend="eager")
    vectors = torch.randn(2, 20, 16)
    wrong: list[int] = []

    def work(t: int) -> None:
        for v in vectors[t]:
            ivs = [pl.add("2", v), pl.save("3")]
            got, want = pl.run(cm, X, ivs), pl.run(model, X, ivs)
            if not torch.allclose(got["3"], want["3"]) or not torch.allclose(
                got.output, want.output
            ):
                wrong.append(t)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong


def test_gradients_flow_through_the_compiled_run() -> None:
    model = mlp()
    cm = pl.compile(model, backend="eager")
    v = torch.zeros(16)

    def f(v: torch.Tensor) -> torch.Tensor:
        return pl.run(cm, X, [pl.add("2", v)]).output.sum()

    def g(v: torch.Tensor) -> torch.Tensor:
        return pl.run(model, X, [pl.add("2", v)]).output.sum()

    for _ in range(2):
        leaf = v.clone().requires_grad_()
        f(leaf).backward()
        want = torch.func.grad(g)(v)
        assert leaf.grad is not None
        torch.testing.assert_close(leaf.grad, want)


def test_other_entry_points_take_the_handle() -> None:
    model = mlp()
    cm = pl.compile(model, backend="eager")
    assert pl.sites(cm) == pl.sites(model)
    assert pl.compile(torch.compile(model)).model is model
    with pytest.raises(pl.PurelensError, match=r"nn\.Module"):
        pl.compile("not a model")  # type: ignore[arg-type]


def test_a_module_off_the_paths_replaced_or_an_attribute_rebound_is_seen() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(8, 8)
            self.factor = 1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * self.factor

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(), nn.ReLU(), nn.Linear(8, 4))
    cm = pl.compile(model, backend="eager")
    ivs = [pl.save("0.inner")]  # the clone copies the root and "0", not "1" or "2"
    for _ in range(2):
        pl.run(cm, X, ivs)
    model[2] = nn.Linear(8, 4)  # off the path to the site
    assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))
    model[0].factor = 3.0  # an attribute of a copied module
    assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))


def test_a_model_that_keeps_changing_runs_eagerly() -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls = getattr(self, "calls", 0) + 1  # an attribute rebound every call
            return self.inner(x)

    model = nn.Sequential(Counter(), nn.ReLU())
    cm = pl.compile(model, backend="eager")
    with pytest.warns(PurelensWarning, match="keep changing"):
        for _ in range(8):
            assert_same(pl.run(cm, X, [pl.save("0.inner")]), pl.run(model, X, [pl.save("0.inner")]))


def test_a_padded_batch_gives_what_eager_gives() -> None:
    model, tokenizer = pl.models.load_default()
    cm = pl.compile(model, backend="eager")
    prompts = ["the home of leibrund is", "x y"]  # the second is padded
    ivs = [pl.ablate("h.0", "mean"), pl.save("h.1"), pl.patch("h.1", pl.at(0, torch.tanh))]
    want = pl.run(model, prompts, ivs, tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PurelensWarning)
        for _ in range(3):
            got = pl.run(cm, prompts, ivs, tokenizer=tokenizer)
            torch.testing.assert_close(got["h.1"], want["h.1"])
            torch.testing.assert_close(got.output.logits, want.output.logits)
    same = ["leibrund lives in", "bilora lives in"]  # no padding: compiled
    want = pl.run(model, same, ivs, tokenizer=tokenizer)
    for _ in range(3):
        got = pl.run(cm, same, ivs, tokenizer=tokenizer)
        torch.testing.assert_close(got["h.1"], want["h.1"])
        torch.testing.assert_close(got.output.logits, want.output.logits)


def test_a_module_used_at_two_places_is_intervened_at_both() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a
            self.c = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x)))

    model = Tied()
    cm = pl.compile(model, backend="eager")
    ivs = [pl.add("a", torch.ones(8))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PurelensWarning)
        for _ in range(3):
            assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))


def test_a_wildcard_saves_every_module_it_matches() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    cm = pl.compile(model, backend="eager")
    for _ in range(3):
        assert_same(pl.run(cm, X, [pl.save("*")]), pl.run(model, X, [pl.save("*")]))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, n_b: int = 1, inplace: bool = False) -> torch.Tensor:
        x = self.a(x)
        if inplace:
            x.mul_(2)
        for _ in range(n_b):
            x = self.b(x)
        return x


def test_a_site_that_did_not_run_or_ran_twice_is_an_error_as_in_eager() -> None:
    model = Branchy()
    cm = pl.compile(model, backend="eager")
    ivs = [pl.save("b"), pl.add("a", torch.ones(8))]
    for _ in range(2):
        pl.run(cm, X, ivs)
    for n_b, match in ((0, "never applied"), (2, "more than once")):
        with pytest.raises(pl.PurelensError, match=match):
            pl.run(model, X, ivs, n_b=n_b)
        with pytest.raises(pl.PurelensError, match=match):
            pl.run(cm, X, ivs, n_b=n_b)


def test_a_value_changed_in_place_after_its_save_is_kept_as_saved() -> None:
    model = Branchy()
    cm = pl.compile(model, backend="eager")
    ivs = [pl.save("a")]
    for _ in range(2):
        pl.run(cm, X, ivs)
    with pytest.raises(pl.PurelensError, match="in place"):
        pl.run(model, X, ivs, inplace=True)
    got = pl.run(cm, X, ivs, inplace=True)  # compiled: the value the site had
    torch.testing.assert_close(got["a"], model.a(X))


def test_what_the_forward_sets_on_its_modules_reaches_the_model() -> None:
    class Remember(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            self.last = y.detach()
            return y

    model = nn.Sequential(Remember(), nn.ReLU())
    cm = pl.compile(model, backend="eager")
    for _ in range(3):
        x = torch.randn(5, 8)
        rec = pl.run(cm, x, [pl.save("0.lin")])
        assert torch.equal(model[0].last, rec["0.lin"])


def test_the_first_call_runs_the_model_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).train()
    seen: list[int] = []

    def count(v: torch.Tensor) -> torch.Tensor:
        seen.append(1)
        return v

    cm = pl.compile(model, backend="eager")
    pl.run(cm, X, [pl.patch("0", count)])
    assert len(seen) == 1 and int(model[1].num_batches_tracked) == 1


def test_a_run_inside_a_run_of_the_same_structure_runs() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    cm = pl.compile(model, backend="eager")
    depth = [0]

    def f(v: torch.Tensor) -> torch.Tensor:
        if depth[0] == 0:
            depth[0] += 1
            try:
                pl.run(cm, X, [pl.patch("0", f)])
            finally:
                depth[0] -= 1
        return v * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PurelensWarning)
        for _ in range(3):
            assert_same(pl.run(cm, X, [pl.patch("0", f)]), pl.run(model, X, [pl.patch("0", f)]))


def test_a_failing_call_keeps_nothing() -> None:
    import gc
    import weakref

    def boom(v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] == 3:
            raise ValueError("three")
        return v

    model = mlp()
    cm = pl.compile(model, backend="eager")
    for _ in range(2):
        pl.run(cm, X, [pl.save("0"), pl.patch("2", boom)])
    steer = torch.randn(16)
    kept = weakref.ref(steer)
    with pytest.raises(ValueError, match="three"):
        pl.run(cm, torch.randn(3, 8), [pl.add("0", steer), pl.patch("2", boom)])
    with pytest.raises(ValueError, match="three"):
        pl.run(cm, torch.randn(3, 8), [pl.add("0", steer), pl.patch("2", boom)])
    del steer
    gc.collect()
    assert kept() is None


def test_errors_of_a_new_shape_are_purelens_own() -> None:
    model = mlp()
    cm = pl.compile(model, backend="eager")
    ivs = [pl.replace("0", torch.ones(5, 16))]
    for _ in range(2):
        pl.run(cm, X, ivs)
    with pytest.raises(pl.PurelensError, match="broadcast"), warnings.catch_warnings():
        warnings.simplefilter("ignore", PurelensWarning)
        pl.run(cm, torch.randn(2, 8), ivs)


def test_bad_compile_arguments_are_refused_at_once() -> None:
    for kwargs in ({"bogus": 1}, {"mode": "nope"}, {"backend": "nope"}):
        with pytest.raises(pl.PurelensError, match=r"torch\.compile refused"):
            pl.compile(mlp(), **kwargs)


def test_an_ambiguous_site_is_seen_off_the_paths() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential()
            self.a.add_module("q", nn.Linear(8, 8))
            self.b = nn.Sequential()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Two()
    cm = pl.compile(model, backend="eager")
    for _ in range(2):
        pl.run(cm, X, [pl.save("q")])
    model.b.add_module("q", nn.Linear(8, 8))
    with pytest.raises(pl.SiteError):
        pl.run(model, X, [pl.save("q")])
    with pytest.raises(pl.SiteError):
        pl.run(cm, X, [pl.save("q")])


def test_a_structure_first_compiled_inside_a_transform_still_compiles_after() -> None:
    model = mlp()
    backend = Counting()
    cm = pl.compile(model, backend=backend)

    def f(v: torch.Tensor) -> torch.Tensor:
        return pl.run(cm, X, [pl.add("2", v)]).output.sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PurelensWarning)
        for _ in range(2):
            torch.func.grad(f)(torch.zeros(16))
    for _ in range(2):
        f(torch.randn(16))
    assert backend.graphs == 1


def test_new_replace_numbers_do_not_recompile() -> None:
    model = mlp()
    backend = Counting()
    cm = pl.compile(model, backend=backend)
    for k in range(6):
        ivs = [pl.replace("2", float(k)), pl.save("3")]
        assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))
    assert backend.graphs == 1


def test_transformers_recorders_do_not_keep_a_model_eager() -> None:
    model, tokenizer = pl.models.load_default()
    ids = torch.tensor(tokenizer(["the home of leibrund is"])["input_ids"])
    model(ids, output_hidden_states=True)  # transformers adds its recorders on first use
    backend = Counting()
    cm = pl.compile(model, backend=backend)
    v = torch.randn(model.config.n_embd)
    ivs = [pl.add("h.0", v), pl.save("h.1")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PurelensWarning)
        for kwargs in ({}, {"output_hidden_states": True}, {}):
            got = pl.run(cm, ids, ivs, **kwargs)
            want = pl.run(model, ids, ivs, **kwargs)
            torch.testing.assert_close(got["h.1"], want["h.1"])
            torch.testing.assert_close(got.output.logits, want.output.logits)
            if kwargs:
                for a, b in zip(got.output.hidden_states, want.output.hidden_states, strict=True):
                    torch.testing.assert_close(a, b)
    assert backend.graphs >= 1


def test_wildcard_matches_that_never_run_are_skipped_as_in_eager() -> None:
    model = Sliced(8)
    cm = pl.compile(model, backend="eager")
    for ivs in ([pl.save("layers.*")], [pl.add("layers.*", torch.ones(8))]):
        for _ in range(3):
            assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))


def test_models_freed_while_a_forward_that_makes_modules_compiles_break_nothing() -> None:
    # A forward that slices a ModuleList registers children in a new container; dynamo
    # traced purelens's registration hook and guarded on the set of listed modules, item
    # by item, so a listed model freed before the guards were built failed the compile.
    doomed = [nn.Linear(2, 2) for _ in range(20)]
    for module in doomed:
        pl.sites(module)  # listed

    def freeing(gm: torch.fx.GraphModule, inputs: Any) -> Callable[..., Any]:
        doomed.clear()  # dynamo calls its backend between tracing and building guards
        gc.collect()
        return gm.forward

    model = Sliced(8)
    cm = pl.compile(model, backend=freeing)
    ivs = [pl.save("layers.*")]
    for _ in range(3):
        assert_same(pl.run(cm, X, ivs), pl.run(model, X, ivs))


def test_a_patch_cannot_write_into_the_saved_values() -> None:
    def sneaky(v: torch.Tensor, saved: Any) -> torch.Tensor:
        try:
            saved["extra"] = v
        except TypeError:
            pass
        return v

    model = mlp()
    backend = Counting()
    cm = pl.compile(model, backend=backend)
    ivs = [pl.save("0"), pl.patch("2", sneaky)]
    for _ in range(3):
        assert set(pl.run(cm, X, ivs)) == set(pl.run(model, X, ivs)) == {"0"}


def test_structures_rebuilt_after_eviction_are_not_new_functions() -> None:
    model = nn.Sequential(*[nn.Identity() for _ in range(70)])
    cm = pl.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PurelensWarning)
        for _ in range(2):
            for k in range(66):
                pl.run(cm, X, [pl.save(str(k))])

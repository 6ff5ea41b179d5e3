"""pl.shapes and validate=True: the plan on fake tensors, no real compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purelens as pl
from tests.helpers import TinyMLP


class Spy(nn.Module):
    """Records the type of every tensor it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(type(x).__name__)
        return x * 2


def test_shapes_of_every_site_in_run_order(mlp: TinyMLP) -> None:
    shapes = pl.shapes(mlp, torch.ones(5, 4))
    assert list(shapes) == ["layers.0", "layers.1", "layers.2", "layers", ""]
    assert shapes["layers.1"] == torch.Size([5, 8]) and shapes[""] == (5, 3)
    assert set(shapes.dtypes.values()) == {torch.float32}
    assert "layers.1" in repr(shapes) and "float32" in repr(shapes)


def test_shapes_of_chosen_sites_with_ports(mlp: TinyMLP) -> None:
    shapes = pl.shapes(mlp.double(), torch.ones(2, 4, dtype=torch.float64), ["2:input", "-1", "0"])
    assert dict(shapes) == {"2:input": (2, 8), "-1": (2, 3), "0": (2, 8)}
    assert shapes.dtypes["0"] == torch.float64
    with pytest.raises(KeyError, match="'1' is not among the sites surveyed"):
        shapes["1"]


def test_shapes_never_computes_for_real() -> None:
    spy = Spy()
    model = nn.Sequential(nn.Linear(3, 3), spy)
    assert pl.shapes(model, torch.ones(4, 3))["1"] == (4, 3)
    assert spy.seen == ["FakeTensor"]


def test_shapes_errors_name_the_site(mlp: TinyMLP) -> None:
    with pytest.raises(pl.SiteError, match=r"'layer\.9'"):
        pl.shapes(mlp, torch.ones(1, 4), ["layer.9"])
    mlp.unused = nn.Linear(1, 1)
    with pytest.raises(pl.PurelensError, match="site 'unused' did not run"):
        pl.shapes(mlp, torch.ones(1, 4), ["unused"])
    assert "unused" not in pl.shapes(mlp, torch.ones(1, 4))


def test_shapes_of_a_model_reading_values_says_why_it_cannot() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[x > 0]

    with pytest.raises(pl.PurelensError, match=r"pl\.shapes could not run the model") as info:
        pl.shapes(nn.Sequential(DataDependent()), torch.randn(3))
    # It speaks of what was called, not of run's validate=True (issue 13, item 23).
    assert "validate" not in str(info.value) and "pl.run with pl.save" in str(info.value)


def test_generate_validate_checks_every_step_before_generating() -> None:
    from tests.helpers import tiny_gpt2

    model = tiny_gpt2(n_layer=2)
    spy_calls: list[str] = []

    def narrows(v: torch.Tensor) -> torch.Tensor:
        spy_calls.append(type(v).__name__)
        return v[..., :3]

    with pytest.raises(
        pl.PurelensError,
        match=r"returned float32\[1, 4, 3\], but the value there is float32\[1, 4, 32\]",
    ):
        pl.generate(
            model,
            torch.tensor([[1, 2, 3, 4]]),
            [pl.patch("h.0", narrows, step=5)],
            max_new_tokens=6,
            validate=True,
        )
    assert spy_calls == ["FakeTensor"]
    rec = pl.generate(
        model,
        torch.tensor([[1, 2, 3, 4]]),
        [pl.save("h.0", step=2)],
        max_new_tokens=3,
        validate=True,
        pad_token_id=0,
    )
    assert rec["h.0"].shape == (1, 1, 32)


def test_survey_keys_resolve_like_sites(mlp: TinyMLP) -> None:
    shapes = pl.shapes(mlp, torch.ones(5, 4))
    assert shapes["1"] == shapes["layers.1"] == shapes["layers.-2"] == (5, 8)
    assert shapes.dtypes["-1"] == torch.float32
    with pytest.raises(KeyError, match="'1:input' is not among the sites surveyed"):
        shapes["1:input"]


def test_a_fake_pass_leaves_no_fake_tensor_cached_on_the_model() -> None:
    # A model caching what its first forward computes (longrope's long_inv_freq) kept a
    # FakeTensor after pl.shapes, validate=True or a sweep's estimate: later runs were wrong.
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
        "long_factor": [2.0] * 4, "original_max_position_embeddings": 16, "factor": 4.0,
    }  # fmt: skip
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_parameters=rope,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    reference = copy.deepcopy(model)
    x = torch.randint(0, 64, (1, 20))
    pl.shapes(model, x)
    pl.run(model, x, [pl.save("layers.0")], validate=True)
    assert torch.equal(model(x).logits, reference(x).logits)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's compile stack
def test_a_model_compiled_in_place_cannot_be_surveyed_and_says_so() -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    model.compile()
    with pytest.raises(pl.PurelensError, match=r"compiled in place \(Module\.compile\(\)\)"):
        pl.shapes(model, torch.ones(2, 3))


class Counter(nn.Module):
    """Counts its calls in a 0-dim buffer, in place (as BatchNorm's num_batches_tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.cache: dict[str, tuple[torch.Tensor, ...]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if "t" not in self.cache:  # a tensor cached in a dict on the first call
            self.cache["t"] = (torch.ones(x.shape[-1]) * 2,)
        return x * self.cache["t"][0]


def test_fake_passes_change_no_buffer_and_cache_nothing() -> None:
    model = nn.Sequential(Counter())
    x = torch.randn(2, 3)
    pl.shapes(model, x)
    pl.run(model, x, [pl.save("0")], validate=True)  # one real call
    assert int(model[0].calls) == 1
    assert type(model[0].cache["t"][0]) is torch.Tensor
    bn = nn.BatchNorm1d(3).train()
    pl.shapes(bn, x)
    assert int(bn.num_batches_tracked) == 0 and bool((bn.running_mean == 0).all())
    averaging = nn.BatchNorm1d(3, momentum=None).train()  # reads its count: no fake pass
    with pytest.raises(pl.PurelensError, match="could not run the model on fake"):
        pl.run(averaging, x, validate=True)
    assert int(averaging.num_batches_tracked) == 0


def test_a_kv_cache_given_to_a_fake_pass_is_left_alone() -> None:
    from transformers import DynamicCache

    from tests.helpers import tiny_gpt2

    model = tiny_gpt2(n_layer=2)
    x, more = torch.randint(1, 97, (1, 5)), torch.randint(1, 97, (1, 1))
    cache, reference = DynamicCache(config=model.config), DynamicCache(config=model.config)
    model(x, past_key_values=cache, use_cache=True)
    model(x, past_key_values=reference, use_cache=True)
    pl.shapes(model, more, past_key_values=cache, use_cache=True)
    rec = pl.run(model, more, past_key_values=cache, use_cache=True, validate=True)
    want = model(more, past_key_values=reference, use_cache=True).logits
    assert type(rec.output.logits) is torch.Tensor and torch.equal(rec.output.logits, want)
    assert cache.get_seq_length() == reference.get_seq_length() == 6

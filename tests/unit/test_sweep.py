"""pl.sweep: one experiment per cell, batched, equal to the loop over cells."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purelens as pl
from tests.helpers import TinyMLP, hooks_on, tiny_gpt2, word_tokenizer


def loop(model: nn.Module, x: Any, cells: list[Any], base: Any = (), **kw: Any) -> list[pl.Record]:
    return [pl.run(model, x, [base, cell], **kw) for cell in cells]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return tiny_gpt2(n_layer=2)


@pytest.mark.parametrize("method", ["fold", "vmap"])
def test_a_steering_sweep_equals_the_loop(gpt2: nn.Module, method: str) -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 97, (3, 6))
    vectors = torch.randn(7, 32)
    cells = [pl.add("h.1", v) for v in vectors]
    base = [pl.save("h.0"), pl.save("h.1", name="steered")]
    rec = pl.sweep(gpt2, x, cells, base=base, method=method, use_cache=False)  # type: ignore[arg-type]
    expected = loop(gpt2, x, cells, base, use_cache=False)
    assert rec.output.logits.shape == (7, 3, 6, 97)
    for k, want in enumerate(expected):
        assert close(rec.output.logits[k], want.output.logits)
        assert close(rec["steered"][k], want["steered"])
        assert close(rec["h.0"][k], want["h.0"])
    # the vectors changed something, differently per cell
    assert not close(rec.output.logits[0], rec.output.logits[1])


def test_a_patching_sweep_over_layers_and_positions(gpt2: nn.Module) -> None:
    torch.manual_seed(1)
    clean, corrupt = torch.randint(0, 97, (2, 1, 5))
    layers = ["h.0", "h.1"]
    clean_rec = pl.run(gpt2, clean, [pl.save(s) for s in layers])
    cells = [
        pl.patch(site, pl.at(p, lambda v, c=clean_rec[site][:, p]: c))
        for site, p in itertools.product(layers, range(5))
    ]

    def last_logits(out: Any) -> torch.Tensor:
        return out.logits[:, -1]

    rec = pl.sweep(gpt2, corrupt, cells, output=last_logits, chunk=3)
    assert rec.output.shape == (10, 1, 97)
    for k, want in enumerate(loop(gpt2, corrupt, cells)):
        assert close(rec.output[k], want.output.logits[:, -1])
    # patching the last block at the last position restores the clean prediction
    assert close(rec.output[-1], clean_rec.output.logits[:, -1])


def test_chunks_and_memory_budget_do_not_change_the_result(gpt2: nn.Module) -> None:
    x = torch.randint(0, 97, (2, 4))
    cells = [pl.scale("h.0.mlp", float(f)) for f in torch.linspace(0, 2, 9)]
    whole = pl.sweep(gpt2, x, cells, chunk=9, output=lambda out: out.logits)
    for kw in ({"chunk": 1}, {"chunk": 4}, {"max_memory": 1}, {}):
        rec = pl.sweep(gpt2, x, cells, output=lambda out: out.logits, progress=False, **kw)
        assert close(rec.output, whole.output), kw


def test_each_cell_acts_on_its_rows_only_and_batch_counts_within_the_cell() -> None:
    model = nn.Sequential(nn.Identity())
    x = torch.zeros(3, 2)
    cells = [
        pl.replace("0", torch.ones(2), batch=0),
        pl.replace("0", torch.full((2,), 2.0), batch=[-1]),
        [pl.add("0", torch.ones(2), batch=slice(1, 3)), pl.ablate("0", "mean")],
        pl.transplant("0", src=0, dst=[2, -2]),
    ]
    rec = pl.sweep(model, x, cells, base=[pl.add("0", torch.arange(3.0)[:, None])])
    for k, want in enumerate(loop(model, x, cells, [pl.add("0", torch.arange(3.0)[:, None])])):
        assert torch.equal(rec.output[k], want.output), k


def test_patch_functions_see_their_own_cells_saves_and_their_rows_of_the_base() -> None:
    model = TinyMLP()
    x = torch.randn(2, 4)
    cells = [
        [pl.save("layers.0", name="a"), pl.patch("layers.1", lambda v, s, c=c: s["a"] * c)]
        for c in (0.5, 1.0, 2.0)
    ]
    base = [pl.save("layers.0", name="b")]
    cells.append([pl.save("layers.0", name="a"), pl.patch("layers.1", lambda v, s: s["b"] - v)])
    rec = pl.sweep(model, x, cells, base=base)
    for k, want in enumerate(loop(model, x, cells, base)):
        assert close(rec.output[k], want.output)
        assert close(rec["a"][k], want["a"])


def test_text_inputs_with_left_padding(gpt2: nn.Module) -> None:
    tok = word_tokenizer(padding_side="left")
    texts = ["the cat sat", "a big red dog ran far"]
    cells = [pl.add("h.0", v) for v in torch.randn(3, 32)]
    rec = pl.sweep(gpt2, texts, cells, tokenizer=tok, output=lambda o: o.logits[:, -1])
    for k, want in enumerate(loop(gpt2, texts, cells, tokenizer=tok)):
        assert close(rec.output[k], want.output.logits[:, -1])


def test_the_model_is_left_as_it_was(gpt2: nn.Module) -> None:
    state = {k: v.clone() for k, v in gpt2.state_dict().items()}
    pl.sweep(gpt2, torch.zeros(1, 3, dtype=torch.long), [pl.ablate("h.0")] * 4, chunk=2)
    with pytest.raises(pl.PurelensError):
        pl.sweep(gpt2, torch.zeros(1, 3, dtype=torch.long), [pl.patch("h.0", lambda v: v[0])] * 2)
    assert hooks_on(gpt2) == 0
    assert all(torch.equal(v, state[k]) for k, v in gpt2.state_dict().items())


def test_clear_errors() -> None:
    model = TinyMLP()
    x = torch.randn(2, 4)
    with pytest.raises(pl.PurelensError, match="base="):
        pl.sweep(model, x, [pl.stop("layers.0"), pl.ablate("layers.0")], method="fold")
    with pytest.raises(pl.PurelensError, match="same names"):
        pl.sweep(model, x, [pl.save("layers.0"), pl.save("layers.1")])
    with pytest.raises(pl.PurelensError, match="non-empty"):
        pl.sweep(model, x, [])
    with pytest.raises(pl.PurelensError, match="differ only in their tensors"):
        pl.sweep(model, x, [pl.add("layers.0", 1.0), pl.scale("layers.1", 2.0)], method="vmap")
    with pytest.raises(pl.PurelensError, match="chunk"):
        pl.sweep(model, x, [pl.ablate("layers.0")], chunk=0)


def test_base_interventions_see_one_cells_rows() -> None:
    model = TinyMLP()
    x = torch.randn(3, 4)
    index = torch.tensor([0, 1, 0])
    base = [pl.add("layers.0", torch.randn(3, 8)), pl.save("layers.1", pl.at(index), name="at")]
    base.append(pl.save("layers.1", lambda v: v.sum(), name="total"))
    cells = [pl.scale("layers.0", f) for f in (0.0, 1.0, 3.0)]
    rec = pl.sweep(model, x, cells, base=base, chunk=2)
    assert rec["total"].shape == (3,) and rec["at"].shape == (3, 3)
    for k, want in enumerate(loop(model, x, cells, base)):
        assert close(rec["total"][k], want["total"]) and close(rec["at"][k], want["at"])


def test_auto_uses_vmap_when_cells_cannot_fold_but_differ_only_in_tensors() -> None:
    model = TinyMLP()
    x = torch.randn(2, 4)
    cells = [[pl.add("layers.0", v), pl.stop("layers.1")] for v in torch.randn(3, 8)]
    rec = pl.sweep(model, x, cells, base=[pl.save("layers.1")])
    for k, want in enumerate(loop(model, x, cells, [pl.save("layers.1")])):
        assert close(rec["layers.1"][k], want["layers.1"])
    assert rec.output is None


writers = st.sampled_from(["add", "scale", "ablate", "replace"])


@settings(max_examples=25, deadline=None)
@given(
    kinds=st.lists(st.tuples(writers, st.sampled_from(["layers.0", "layers.1"])), min_size=1),
    rows=st.integers(2, 3),  # a mean over one row is refused (it would change nothing)
    chunk=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_sweep_equals_the_loop_for_any_cells(
    kinds: list[tuple[str, str]], rows: int, chunk: int, seed: int
) -> None:
    torch.manual_seed(seed)
    model = TinyMLP()
    x = torch.randn(rows, 4)
    make = {
        "add": lambda s: pl.add(s, torch.randn(8)),
        "scale": lambda s: pl.scale(s, torch.randn(())),
        "ablate": lambda s: pl.ablate(s, "mean"),
        "replace": lambda s: pl.replace(s, torch.randn(rows, 8)),
    }
    cells = [make[kind](site) for kind, site in kinds]
    rec = pl.sweep(model, x, cells, chunk=chunk, base=[pl.save("layers.2")])
    for k, want in enumerate(loop(model, x, cells, [pl.save("layers.2")])):
        assert close(rec.output[k], want.output)
        assert close(rec["layers.2"][k], want["layers.2"])


def test_a_progress_bar_when_the_sweep_takes_several_passes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = TinyMLP()
    cells = [pl.scale("layers.0", float(f)) for f in range(6)]
    pl.sweep(model, torch.randn(2, 4), cells, chunk=2)
    assert "sweep" in capsys.readouterr().err
    pl.sweep(model, torch.randn(2, 4), cells, chunk=2, progress=False)
    pl.sweep(model, torch.randn(2, 4), cells)  # one pass: no bar
    assert "sweep" not in capsys.readouterr().err


class WritesInPlace(nn.Module):
    """A layer vmap cannot batch: it writes its input into a fresh (unbatched) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape)
        out[:] = x
        return out * 2


def test_auto_folds_when_the_model_cannot_run_under_vmap() -> None:
    model = nn.Sequential(nn.Linear(4, 4), WritesInPlace(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    cells = [pl.add("0", v) for v in torch.randn(5, 4)]
    with pytest.raises(RuntimeError):
        pl.sweep(model, x, cells, method="vmap")
    rec = pl.sweep(model, x, cells)
    for k, want in enumerate(loop(model, x, cells)):
        assert close(rec.output[k], want.output)


def test_an_output_reduced_over_the_batch_is_never_split_wrongly(gpt2: nn.Module) -> None:
    # Issue 13, item 4: with folding, an HF loss (labels=) is one number for all cells'
    # rows together, and every cell got that same wrong value.
    x = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    cells = [pl.ablate("h.0.mlp"), pl.scale("h.1", 0.5), pl.ablate("h.1.attn")]  # folded
    with pytest.raises(pl.PurelensError, match=r"output\['loss'\] has shape \[\]"):
        pl.sweep(gpt2, {"input_ids": x, "labels": x}, cells, method="fold")
    with pytest.raises(pl.PurelensError, match="cannot be split into the cells"):
        pl.sweep(gpt2, {"input_ids": x, "labels": x}, cells, output=lambda out: out.loss * 2)
    rec = pl.sweep(gpt2, {"input_ids": x, "labels": x}, cells, output=lambda out: out.logits)
    for k, cell in enumerate(cells):  # per-row outputs are split rightly
        alone = pl.run(gpt2, {"input_ids": x, "labels": x}, [cell]).output
        assert torch.allclose(rec.output[k], alone.logits, atol=1e-5)
    steer = [pl.add("h.1", v) for v in torch.randn(3, 32)]  # vmap: each cell's own loss
    rec = pl.sweep(gpt2, {"input_ids": x, "labels": x}, steer, output=lambda out: out.loss)
    for k, cell in enumerate(steer):
        alone = pl.run(gpt2, {"input_ids": x, "labels": x}, [cell]).output.loss
        assert torch.allclose(rec.output[k], alone, atol=1e-5)


def test_a_model_mixing_its_rows_cannot_be_folded_silently() -> None:
    # Folding repeats the inputs along dim 0; a sequence-first GRU takes that for time.
    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.rnn, self.out = nn.Linear(4, 4), nn.GRU(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(self.inp(x))[0])

    torch.manual_seed(0)
    model, x = SequenceFirst().eval(), torch.randn(5, 2, 4)
    cells = [pl.scale("inp", 2.0), pl.add("out", 1.0), pl.scale("inp", 0.5)]
    with pytest.raises(pl.PurelensError, match="mixes the rows of its batch"):
        pl.sweep(model, x, cells, method="fold")
    rec = pl.sweep(model, x, cells, chunk=1)
    for k, want in enumerate(loop(model, x, cells)):
        assert close(rec.output[k], want.output)

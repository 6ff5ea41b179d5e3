"""Attention ports (q, k, v, scores, pattern, z), pl.head and op sites on real HF models."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purelens as pl
from tests.helpers import tiny_gpt2

PORTS = ("q", "k", "v", "scores", "pattern", "z")


def tiny_llama(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        hidden_size=32,
        intermediate_size=64,
        vocab_size=97,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=97,
        attn_implementation=attn,
    )
    return BertModel(config).eval()


MODELS = {
    "gpt2": (lambda attn: tiny_gpt2(n_layer=2, attn=attn), "h.0.attn", "h.1.attn"),
    "llama": (tiny_llama, "layers.0.self_attn", "layers.1.self_attn"),
    "bert": (tiny_bert, "layer.0.attention.self", "layer.1.attention.self"),
}


def batch(padding: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(1, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    if padding == "left":
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def main_tensor(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pattern_equals_eager_output_attentions(kind: str, attn: str, padding: str) -> None:
    make, first, second = MODELS[kind]
    model, eager = make(attn), make("eager")
    inputs = batch(padding)
    reference = eager(**inputs, output_attentions=True)
    before = model.config._attn_implementation
    rec = pl.run(model, inputs, [pl.save(f"{site}:{p}") for site in (first, second) for p in PORTS])
    assert model.config._attn_implementation == before
    for layer, site in enumerate((first, second)):
        assert torch.equal(rec[f"{site}:pattern"], reference.attentions[layer])
        assert torch.equal(rec[f"{site}:pattern"], torch.softmax(rec[f"{site}:scores"], -1))
    heads, kv_heads = (4, 2) if kind == "llama" else (4, 4)
    assert rec[f"{first}:q"].shape == (2, 7, heads, 8)
    assert rec[f"{first}:k"].shape == rec[f"{first}:v"].shape == (2, 7, kv_heads, 8)
    assert rec[f"{first}:z"].shape == (2, 7, heads, 8)
    # every layer tapped runs eager math: the output is the eager model's
    assert torch.equal(main_tensor(rec.output), main_tensor(reference))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_run_without_taps_on_a_layer_is_bitwise_the_model(kind: str) -> None:
    make, first, _ = MODELS[kind]
    model = make("sdpa")
    inputs = batch("left")
    plain = main_tensor(model(**inputs))
    for port in ("q", "z"):  # ports that need no eager math keep the model's attention
        rec = pl.run(model, inputs, [pl.save(f"{first}:{port}")])
        assert torch.equal(main_tensor(rec.output), plain)


def test_z_is_the_per_head_input_of_the_output_projection() -> None:
    model = tiny_gpt2(n_layer=2)
    inputs = batch("left")
    rec = pl.run(model, inputs, [pl.save("h.1.attn:z"), pl.save("h.1.attn.c_proj:input")])
    z = rec["h.1.attn:z"]
    assert torch.equal(z.reshape(2, 7, 32), rec["h.1.attn.c_proj:input"])


def test_replacing_one_heads_pattern_equals_a_hand_written_patch_of_z() -> None:
    model = tiny_gpt2(n_layer=2)
    inputs = batch("left")
    one_hot = torch.zeros(2, 7, 7)
    one_hot[..., 0] = 1.0  # head 1 attends to the first token only
    ported = pl.run(model, inputs, [pl.patch("h.0.attn:pattern", pl.head(1, lambda p: one_hot))])
    v = pl.run(model, inputs, [pl.save("h.0.attn:v")])["h.0.attn:v"]

    def by_hand(x: torch.Tensor) -> torch.Tensor:
        heads = x.view(2, 7, 4, 8).clone()
        heads[:, :, 1] = v[:, :1, 1].expand(2, 7, 8)
        return heads.view(2, 7, 32)

    manual = pl.run(model, inputs, [pl.patch("h.0.attn.c_proj:input", by_hand)])
    real = inputs["attention_mask"].bool()  # sdpa's values at padded queries are its own
    assert torch.allclose(ported.output.logits[real], manual.output.logits[real], atol=1e-6)


def test_head_selects_by_the_ports_layout() -> None:
    model = tiny_llama()
    inputs = batch("left")
    site = "layers.0.self_attn"
    rec = pl.run(
        model,
        inputs,
        [
            pl.save(f"{site}:pattern", name="pattern"),
            pl.save(f"{site}:pattern", pl.head(2), name="one"),
            pl.save(f"{site}:k", pl.head([1, 0]), name="kv"),
            pl.save(f"{site}:k", name="k"),
        ],
    )
    assert torch.equal(rec["one"], rec["pattern"][:, 2])
    assert torch.equal(rec["kv"], rec["k"][:, :, [1, 0]])
    zeroed = pl.run(model, inputs, [pl.patch(f"{site}:z", pl.head(3, torch.zeros_like))])
    by_hand = pl.run(
        model, inputs, [pl.patch(f"{site}:z", lambda z: z * torch.tensor([1.0, 1, 1, 0])[:, None])]
    )
    assert torch.equal(zeroed.output.logits, by_hand.output.logits)
    with pytest.raises(pl.PurelensError, match="2 heads"):
        pl.run(model, inputs, [pl.save(f"{site}:k", pl.head(2))])  # 2 key/value heads
    with pytest.raises(pl.PurelensError, match="no heads dimension"):
        pl.run(model, inputs, [pl.save("layers.0", pl.head(0))])
    with pytest.raises(pl.PurelensError, match="distinct heads"):
        pl.head([0, 0])
    assert pl.loads(pl.dumps(pl.save(f"{site}:k", pl.head([1, 0])))) == pl.save(
        f"{site}:k", pl.head([1, 0])
    )


def test_at_and_mean_ablation_follow_the_port() -> None:
    model = tiny_gpt2(n_layer=2)
    inputs = batch("left")
    site = "h.0.attn"
    rec = pl.run(
        model,
        inputs,
        [pl.save(f"{site}:pattern", name="p"), pl.save(f"{site}:pattern", pl.at(-1), name="last")],
    )
    assert torch.equal(rec["last"], rec["p"][:, :, -1])  # the query position
    with pytest.raises(pl.PurelensError, match="padding"):
        pl.run(model, inputs, [pl.save(f"{site}:z", pl.at(0))])  # row 1 is padded on the left
    z = pl.run(model, inputs, [pl.save(f"{site}:z")])[f"{site}:z"]
    ablated = pl.run(model, inputs, [pl.ablate(f"{site}:z", "mean"), pl.save(f"{site}:z")])
    real = inputs["attention_mask"].bool()
    mean = z[real].mean(0)  # over batch and real positions, per head
    assert torch.allclose(ablated[f"{site}:z"], mean.expand(2, 7, 4, 8), atol=1e-6)
    assert not torch.allclose(mean[0], mean[1])  # never averaged across heads


def test_generate_with_the_kv_cache() -> None:
    model = tiny_llama()
    inputs = batch("left")
    plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    site = "layers.0.self_attn"
    rec = pl.generate(
        model,
        inputs,
        [pl.save(f"{site}:pattern"), pl.save(f"{site}:k")],
        max_new_tokens=3,
        do_sample=False,
    )
    assert torch.equal(rec.output, plain)
    assert [p.shape for p in rec[f"{site}:pattern"]] == [(2, 4, 7, 7), (2, 4, 1, 8), (2, 4, 1, 9)]
    assert [k.shape[1] for k in rec[f"{site}:k"]] == [7, 8, 9]  # every position so far
    assert float(rec[f"{site}:pattern"][2][1, :, :, :3].abs().max()) == 0.0  # no weight on pads


def test_shapes_validate_vmap_and_grad() -> None:
    model = tiny_gpt2(n_layer=2)
    inputs = batch("left")
    site = "h.1.attn"
    shapes = pl.shapes(model, inputs, sites=[f"{site}:pattern", f"{site}:q"])
    assert shapes[f"{site}:pattern"] == (2, 4, 7, 7) and shapes[f"{site}:q"] == (2, 7, 4, 8)
    with pytest.raises(pl.PurelensError, match=r"float32\[2, 4, 7, 2\]"):
        pl.run(model, inputs, [pl.patch(f"{site}:pattern", lambda p: p[..., :2])], validate=True)

    def logit(a: torch.Tensor) -> torch.Tensor:
        out = pl.run(model, inputs, [pl.scale(f"{site}:pattern", a)]).output
        return out.logits[0, -1, 5]

    a = torch.tensor(0.7, requires_grad=True)
    logit(a).backward()
    assert torch.equal(torch.func.grad(logit)(torch.tensor(0.7)), a.grad)
    factors = torch.tensor([0.5, 1.0, 2.0])
    batched = torch.func.vmap(logit)(factors)
    looped = torch.stack([logit(f) for f in factors])
    assert torch.allclose(batched, looped, atol=1e-6)


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: calls F.scaled_dot_product_attention itself."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class NanoBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = CausalSelfAttention()
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.attn(x))


def test_modules_calling_sdpa_themselves() -> None:
    torch.manual_seed(0)
    model, x = NanoBlock(), torch.randn(2, 6, 16)
    rec = pl.run(model, x, [pl.save(f"attn:{p}") for p in PORTS])
    assert torch.allclose(rec.output, model(x), atol=1e-6)
    q, k = rec["attn:q"].transpose(1, 2), rec["attn:k"].transpose(1, 2)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~causal, float("-inf"))
    assert torch.allclose(rec["attn:pattern"], torch.softmax(scores, -1), atol=1e-6)
    assert torch.equal(rec["attn:z"].reshape(2, 6, 16), rec["attn:z"].flatten(2))
    assert "attn:pattern" in pl.sites(model) and "head:pattern" not in pl.sites(model)
    zero = pl.run(model, x, [pl.patch("attn:z", torch.zeros_like)]).output
    assert torch.allclose(zero, model.head(x + model.attn.c_proj.bias), atol=1e-6)
    with pytest.raises(pl.PurelensError, match="never applied"):
        pl.run(model, x, [pl.save("head:pattern")])  # no attention call there


def test_other_threads_plain_runs_stay_bitwise_the_model() -> None:
    model = tiny_gpt2(n_layer=2)
    inputs = batch("left")
    plain = model(**inputs).logits
    stop = threading.Event()
    wrong: list[str] = []

    def tapping() -> None:
        while not stop.is_set():
            pl.run(model, inputs, [pl.save("h.*.attn:pattern"), pl.scale("h.0.attn:scores", 2.0)])

    worker = threading.Thread(target=tapping)
    worker.start()
    try:
        for _ in range(40):
            if not torch.equal(model(**inputs).logits, plain):
                wrong.append("plain call")
            if not torch.equal(pl.run(model, inputs, [pl.save("h.0")]).output.logits, plain):
                wrong.append("untapped run")
    finally:
        stop.set()
        worker.join()
    assert not wrong
    assert model.config._attn_implementation == "sdpa"


def test_configs_are_restored_when_a_run_raises() -> None:
    model = tiny_llama()

    def boom(value: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pl.run(model, batch("left"), [pl.patch("layers.1.self_attn:pattern", boom)])
    assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation_internal == "sdpa"


def test_implementations_without_reproducible_math_are_refused() -> None:
    model = tiny_gpt2(n_layer=2)
    model.config._attn_implementation_internal = "flex_attention"
    try:
        with pytest.raises(pl.PurelensError, match="'eager' or 'sdpa'"):
            pl.run(model, batch("left"), [pl.save("h.0.attn:pattern")])
        assert model.config._attn_implementation_internal == "flex_attention"
    finally:
        model.config._attn_implementation_internal = "sdpa"


@settings(max_examples=12, deadline=None)
@given(
    port=st.sampled_from(PORTS), layer=st.integers(0, 1), attn=st.sampled_from(["sdpa", "eager"])
)
def test_an_identity_patch_on_any_port_changes_nothing(port: str, layer: int, attn: str) -> None:
    model = _MODELS[attn]
    inputs = batch("left")
    reference = pl.run(model, inputs, [pl.save(f"h.{layer}.attn:{port}")]).output.logits
    patched = pl.run(model, inputs, [pl.patch(f"h.{layer}.attn:{port}", lambda v: v)])
    assert torch.equal(patched.output.logits, reference)


_MODELS = {"sdpa": tiny_gpt2(n_layer=2), "eager": tiny_gpt2(n_layer=2, attn="eager")}


def test_op_sites_on_eager_gpt2() -> None:
    model = tiny_gpt2(n_layer=2, attn="eager")
    inputs = batch("left")
    reference = model(**inputs, output_attentions=True)
    rec = pl.run(model, inputs, [pl.save("h.*.attn#softmax.0")])
    assert torch.equal(rec["h.0.attn#softmax.0"], reference.attentions[0])
    assert torch.equal(rec["h.1.attn#softmax.0"], reference.attentions[1])
    listed = pl.sites(model, inputs, ops=True)
    assert "transformer.h.0.attn#softmax.0" in listed
    assert "transformer.h.0.attn#addmm.0" not in listed  # c_attn's op: a child's, not attn's
    assert "transformer.h.0.attn.c_attn#addmm.0" in listed
    with pytest.raises(pl.PurelensError, match="did not run"):
        pl.run(model, inputs, [pl.save("h.0.attn#softmax.1")])
    with pytest.raises(pl.SiteError, match="op"):
        pl.save("h.0.attn#softmax")


def test_sites_list_ports_and_leave_out_modules_that_never_run() -> None:
    listed = pl.sites(tiny_gpt2(n_layer=2))
    assert "transformer.h.1.attn:pattern" in listed and "transformer.h.1.attn:z" in listed
    assert "transformer.h.0.attn.attn_dropout" not in listed  # never called in transformers 5
    assert "transformer.h.0.attn.c_proj" in listed
    assert "transformer.h.0.mlp:pattern" not in listed


def test_remote_ports(remote: Any, local: tuple[nn.Module, Any]) -> None:
    model, tokenizer = local
    ivs = [pl.save("h.1.attn:pattern", pl.head(0)), pl.ablate("h.0.attn:z", call=0)]
    there = pl.run(remote, "bilora lives in", ivs)
    here = pl.run(model, "bilora lives in", ivs, tokenizer=tokenizer)
    assert torch.equal(there["h.1.attn:pattern"], here["h.1.attn:pattern"])
    assert "transformer.h.1.attn:pattern" in pl.sites(remote)


def test_the_bundled_induction_head_is_found_through_its_pattern() -> None:
    """Head (1, 0) looks back into the first copy, at a fixed distance after the current
    word's first occurrence (this model matches on a word a few places back, which its
    first block carries forward), with most of its attention; the other heads do not."""
    from purelens.models.tasks import Tasks

    model, tokenizer = pl.models.load_default()
    tasks, rng = Tasks.make(), random.Random(0)
    mass = {(h, after): [] for h in range(4) for after in (1, 2, 3)}  # type: ignore[var-annotated]
    for _ in range(8):
        words, predictable = tasks.copy_example(rng)
        n = len(predictable) + 1  # the repeated sequence's length
        rec = pl.run(model, " ".join(words), [pl.save("h.*.attn:pattern")], tokenizer=tokenizer)
        pattern = rec["h.1.attn:pattern"][0].detach()
        for i in predictable:  # word i is predicted at the word before it, position i with <bos>
            first = i - n  # that word's first occurrence (with <bos>)
            for h, after in mass:
                mass[(h, after)].append(pattern[h, i, first + after].item())
    share = {key: sum(v) / len(v) for key, v in mass.items()}
    best = max(share, key=share.__getitem__)
    assert best[0] == 0 and share[best] > 0.5
    assert all(share[(h, best[1])] < 0.25 for h in (1, 2, 3))


def test_every_builder_on_ports() -> None:
    model = tiny_gpt2(n_layer=2)
    inputs = batch("left")
    zero_one = pl.patch("h.0.attn:z", pl.head(1, torch.zeros_like))
    edited = pl.edit(model, [zero_one])
    assert torch.equal(edited(**inputs).logits, pl.run(model, inputs, [zero_one]).output.logits)
    stopped = pl.run(model, inputs, [pl.save("h.0.attn:q"), pl.stop("h.0.attn:pattern")])
    assert stopped.output is None and list(stopped) == ["h.0.attn:q"]
    moved = pl.run(
        model, inputs, [pl.transplant("h.0.attn:z", src=0, dst=1), pl.save("h.0.attn:z")]
    )
    assert torch.equal(moved["h.0.attn:z"][0], moved["h.0.attn:z"][1])
    rows = pl.run(model, inputs, [pl.save("h.1.attn:pattern", batch=1)])
    assert rows["h.1.attn:pattern"].shape == (1, 4, 7, 7)

    def loss(out: Any) -> torch.Tensor:
        return out.logits[0, -1, 3]

    grads = pl.run(model, inputs, [pl.save_grad("h.1.attn:pattern")], loss=loss).grads
    assert grads["h.1.attn:pattern"].shape == (2, 4, 7, 7)
    assert float(grads["h.1.attn:pattern"].abs().sum()) > 0
    cut = pl.run(
        model,
        inputs,
        [pl.patch_grad("h.1.attn:z", torch.zeros_like), pl.save_grad("h.1.attn:v")],
        loss=loss,
    )
    assert float(cut.grads["h.1.attn:v"].abs().sum()) == 0.0  # v reaches the loss through z only
    with pytest.raises(pl.PurelensError, match="without a port"):
        pl.skip("h.0.attn:z")


def test_sweeps_over_ports() -> None:
    model = tiny_gpt2(n_layer=2)
    inputs = batch("left")
    vectors = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(0))
    rec = pl.sweep(
        model,
        inputs,
        [pl.add("h.0.attn:z", v) for v in vectors],
        output=lambda out: out.logits[:, -1],
        progress=False,
    )
    looped = [
        pl.run(model, inputs, [pl.add("h.0.attn:z", v)]).output.logits[:, -1] for v in vectors
    ]
    assert torch.allclose(rec.output, torch.stack(looped), atol=1e-6)


def test_output_attentions_is_what_the_model_gives_without_taps() -> None:
    model = tiny_gpt2(n_layer=2)  # sdpa: no attention weights
    inputs = {**batch("left"), "output_attentions": True}
    plain = model(**inputs).attentions
    tapped = pl.run(model, inputs, [pl.save("h.1.attn:pattern")]).output.attentions
    assert len(tapped) == len(plain)  # not (layer 1's weights,), read as layer 0's

"""HF GPT-2 (random weights from a small config): saves equal hand-written hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, jacrev, vmap

import purelens as pl
from tests.helpers import hooks_on, raw_saves, tiny_gpt2


def primary(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]


def test_every_save_equals_a_hand_written_hook(gpt2: nn.Module, tokens: torch.Tensor) -> None:
    with raw_saves(gpt2, [n for n in pl.sites(gpt2) if n and ":" not in n]) as raw:
        expected = gpt2(tokens).logits
    names = list(raw)  # every module that runs (a ModuleList does not)
    assert len(names) > 30
    rec = pl.run(gpt2, tokens, [pl.save(n) for n in names])
    assert torch.equal(rec.output.logits, expected)
    for name in names:
        assert torch.equal(rec[name], primary(raw[name])), name


def test_suffix_and_negative_sites_on_gpt2(gpt2: nn.Module, tokens: torch.Tensor) -> None:
    with raw_saves(gpt2, ["transformer.h.2", "transformer.h.0.attn"]) as raw:
        gpt2(tokens)
    rec = pl.run(gpt2, tokens, [pl.save("h.-1"), pl.save("h.0.attn"), pl.save("h.2:input")])
    assert torch.equal(rec["h.-1"], raw["transformer.h.2"])
    assert torch.equal(rec["h.0.attn"], raw["transformer.h.0.attn"][0])
    assert rec["h.2:input"].shape == (2, 6, 32)


def test_patching_attention_patches_its_first_tensor_only(
    gpt2: nn.Module, tokens: torch.Tensor
) -> None:
    ref = pl.run(gpt2, tokens, [pl.save("h.1:input")])
    rec = pl.run(gpt2, tokens, [pl.ablate("h.1.attn"), pl.save("h.1.attn"), pl.save("h.1")])
    assert torch.equal(rec["h.1.attn"], torch.zeros(2, 6, 32))
    # The block unpacked (attn_output, weights) and added a zero attention output.
    h_in, block = ref["h.1:input"], gpt2.transformer.h[1]
    assert torch.allclose(rec["h.1"], h_in + block.mlp(block.ln_2(h_in)), atol=1e-6)


def test_patching_the_root_output_rebuilds_the_model_output(
    gpt2: nn.Module, tokens: torch.Tensor
) -> None:
    rec = pl.run(gpt2, tokens, [pl.scale("", 2.0)])
    assert type(rec.output).__name__ == "CausalLMOutputWithCrossAttentions"
    assert torch.allclose(rec.output.logits, gpt2(tokens).logits * 2)
    assert rec.output.past_key_values is not None


def test_model_kwargs_and_dict_inputs(gpt2: nn.Module, tokens: torch.Tensor) -> None:
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    rec = pl.run(
        gpt2, {"input_ids": tokens, "attention_mask": mask}, [pl.save("h.0")], use_cache=False
    )
    assert torch.equal(rec.output.logits, gpt2(input_ids=tokens, attention_mask=mask).logits)
    assert rec.output.past_key_values is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_torch_func_composes_on_gpt2(attn: str, tokens: torch.Tensor) -> None:
    model = tiny_gpt2(n_layer=2, attn=attn)
    vs = torch.randn(4, 32)

    def logit(v: torch.Tensor) -> torch.Tensor:
        return pl.run(model, tokens, [pl.add("h.0", v)]).output.logits[0, -1, 5]

    batched = vmap(lambda v: pl.run(model, tokens, [pl.add("h.0", v)]).output.logits[:, -1])(vs)
    for k in range(4):
        one = pl.run(model, tokens, [pl.add("h.0", vs[k])]).output.logits[:, -1]
        assert torch.allclose(batched[k], one, atol=1e-5)

    g = grad(logit)(torch.zeros(32))
    eps = 1e-2
    e = torch.zeros(32)
    e[3] = eps
    assert torch.allclose(g[3], (logit(e) - logit(-e)) / (2 * eps), rtol=1e-2, atol=1e-3)
    assert jacrev(lambda v: pl.run(model, tokens, [pl.add("h.0", v)]).output.logits[0, -1, :3])(
        vs[0]
    ).shape == (3, 32)
    vg = vmap(grad(logit))(vs)
    assert torch.allclose(vg[1], grad(logit)(vs[1]), atol=1e-5)
    assert hooks_on(model) == 0


def test_records_come_back_through_vmap(gpt2: nn.Module, tokens: torch.Tensor) -> None:
    vs = torch.randn(5, 32)
    recs = vmap(lambda v: pl.run(gpt2, tokens, [pl.add("h.0", v), pl.save("h.2")]))(vs)
    assert recs["h.2"].shape == (5, 2, 6, 32)
    assert recs.output.logits.shape == (5, 2, 6, 97)
    one = pl.run(gpt2, tokens, [pl.add("h.0", vs[2]), pl.save("h.2")])
    assert torch.allclose(recs["h.2"][2], one["h.2"], atol=1e-5)


def test_vmap_over_token_batches(gpt2: nn.Module) -> None:
    xs = torch.randint(0, 97, (3, 2, 5))
    saved = vmap(lambda x: pl.run(gpt2, x, [pl.save("h.1")])["h.1"])(xs)
    for k in range(3):
        assert torch.allclose(saved[k], pl.run(gpt2, xs[k], [pl.save("h.1")])["h.1"], atol=1e-5)


def test_grad_with_respect_to_gpt2_params(gpt2: nn.Module, tokens: torch.Tensor) -> None:
    params = {k: v.detach() for k, v in gpt2.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (
            pl.run(gpt2, tokens, [pl.ablate("h.1.mlp")], params=p)
            .output.logits.logsumexp(-1)
            .mean()
        )

    g = grad(loss)(params)
    gpt2.zero_grad()
    pl.run(gpt2, tokens, [pl.ablate("h.1.mlp")]).output.logits.logsumexp(-1).mean().backward()
    for name in (
        "transformer.h.0.attn.c_attn.weight",
        "transformer.wte.weight",
        "transformer.h.1.mlp.c_fc.weight",
    ):
        p = gpt2.get_parameter(name)
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(g[name], expected, atol=1e-6), name
    gpt2.zero_grad(set_to_none=True)


def test_save_grad_on_gpt2_equals_hand_written_hooks(gpt2: nn.Module, tokens: torch.Tensor) -> None:
    names = ["transformer.h.0", "transformer.h.2.attn", "transformer.ln_f"]
    values: list[torch.Tensor] = []
    handles = [
        gpt2.get_submodule(n).register_forward_hook(lambda m, a, o: values.append(primary(o)))
        for n in names
    ]
    try:
        loss = gpt2(tokens).logits[:, -1, 3].sum()
        expected = torch.autograd.grad(loss, values)
    finally:
        for h in handles:
            h.remove()
    rec = pl.run(
        gpt2,
        tokens,
        [pl.save_grad("h.0"), pl.save_grad("h.-1.attn"), pl.save_grad("ln_f")],
        loss=lambda out: out.logits[:, -1, 3].sum(),
        use_cache=False,
    )
    for site, g in zip(["h.0", "h.-1.attn", "ln_f"], expected, strict=True):
        assert torch.allclose(rec.grads[site], g, atol=1e-6), site
    assert all(p.grad is None for p in gpt2.parameters())


def test_hidden_states_show_the_run_whenever_transformers_added_its_recorders(
    tokens: torch.Tensor,
) -> None:
    # transformers records output_hidden_states with hooks it adds on first use: they ran
    # after the run's hook on the first call and before it on the next, which then saw the
    # block's output without the steering.
    from tests.helpers import tiny_gpt2

    model = tiny_gpt2(n_layer=2)
    v = torch.randn(model.config.n_embd)
    for _ in range(3):
        rec = pl.run(model, tokens, [pl.add("h.0", v), pl.save("h.0")], output_hidden_states=True)
        assert torch.equal(rec.output.hidden_states[1], rec["h.0"])

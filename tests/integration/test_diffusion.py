"""pl.generate on diffusers pipelines: tiny Stable Diffusion (DDIM, Euler) and Wan 2.2,
built from configs (random weights) by `purelens.models.pipelines`."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import purelens as pl

pytest.importorskip("diffusers")
from purelens.models.pipelines import tiny_stable_diffusion, tiny_wan

SD = {"num_inference_steps": 3, "output_type": "pt"}
WAN = {"num_inference_steps": 4, "height": 16, "width": 16, "num_frames": 5, "output_type": "pt"}


@pytest.fixture(scope="module", params=["ddim", "euler"])
def sd(request: pytest.FixtureRequest) -> object:
    return tiny_stable_diffusion(request.param)


@pytest.fixture(scope="module")
def ddim() -> object:
    return tiny_stable_diffusion("ddim")


@pytest.fixture(scope="module")
def wan() -> object:
    return tiny_wan()


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_without_interventions_the_images_are_bitwise_the_pipelines(sd: object) -> None:
    want = sd("a cat", generator=generators(0), **SD).images
    got = pl.generate(sd, "a cat", [], seed=0, **SD).output.images
    assert torch.equal(got, want)


def test_wan_without_interventions_is_bitwise_the_pipelines(wan: object) -> None:
    want = wan("a cat", generator=generators(0), **WAN).frames
    assert torch.equal(pl.generate(wan, "a cat", [], seed=0, **WAN).output.frames, want)


def test_a_denoiser_save_is_one_value_per_step_and_outside_sites_count_calls(ddim: object) -> None:
    ivs = [
        pl.save("unet.mid_block"),
        pl.save("unet.mid_block", name="last", step=2),
        pl.save("down_blocks.1.attentions.0", step=0),  # a unique suffix is a site too
        pl.save("text_encoder.encoder.layers.1", call=slice(None)),
        pl.save("vae.decoder"),
    ]
    rec = pl.generate(ddim, "a cat", ivs, seed=0, **SD)
    steps = rec["unet.mid_block"]
    assert isinstance(steps, tuple) and len(steps) == 3
    assert all(v.shape == (2, 16, 8, 8) for v in steps)  # uncond and cond rows
    assert torch.equal(rec["last"], steps[2])
    assert rec["down_blocks.1.attentions.0"].shape == (2, 16, 8, 8)
    prompt, negative = rec["text_encoder.encoder.layers.1"]
    ids = ddim.tokenizer("a cat", padding="max_length", return_tensors="pt").input_ids
    alone = pl.run(ddim.text_encoder, ids, [pl.save("encoder.layers.1")])
    assert torch.equal(prompt, alone["encoder.layers.1"])
    assert not torch.equal(prompt, negative)
    assert rec["vae.decoder"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_an_ablation_at_step_k_changes_exactly_the_steps_from_k_on(ddim: object, k: int) -> None:
    watch = [pl.save("unet.conv_out:input", name="x")]
    clean = pl.generate(ddim, "a cat", watch, seed=0, **SD)
    rec = pl.generate(ddim, "a cat", [pl.ablate("unet.mid_block", step=k), *watch], seed=0, **SD)
    same = [torch.equal(a, b) for a, b in zip(rec["x"], clean["x"], strict=True)]
    assert same == [s < k for s in range(3)]
    assert not torch.equal(rec.output.images, clean.output.images)


def test_seeds_make_each_image_depend_on_its_own_seed_only(ddim: object) -> None:
    one = pl.generate(ddim, "a cat", [], seed=5, **SD).output.images
    again = pl.generate(ddim, "a cat", [], seed=5, **SD).output.images
    other = pl.generate(ddim, "a cat", [], seed=6, **SD).output.images
    assert torch.equal(one, again) and not torch.equal(one, other)
    batch = pl.generate(ddim, ["a dog", "a cat"], [], seed=4, **SD).output.images
    # image 1 of seed 4 is image 0 of seed 5 (up to float error: the batches differ)
    assert torch.allclose(batch[1], one[0], atol=1e-5)
    assert not torch.allclose(batch[0], one[0], atol=1e-2)


def test_three_images_per_prompt_all_differ_as_pil_images(ddim: object) -> None:
    # nnsight's diffusion test: three images per prompt, all different, PIL images.
    rec = pl.generate(ddim, "a cat", [], seed=0, num_inference_steps=2, num_images_per_prompt=3)
    images = rec.output.images
    assert len(images) == 3 and all(type(i).__module__.startswith("PIL") for i in images)
    pixels = [torch.tensor(list(i.getdata()), dtype=torch.float32) for i in images]
    assert all(not torch.equal(pixels[a], pixels[b]) for a, b in [(0, 1), (0, 2), (1, 2)])


def test_rows_select_one_image_under_guidance(ddim: object) -> None:
    kw = {**SD, "num_images_per_prompt": 2}
    clean = pl.generate(ddim, ["a cat", "a dog"], [], seed=0, **kw).output.images
    rows = pl.diffusion.rows(2, 2, prompt=1, image=1, cond=True)
    assert rows == [7]
    ablate = [pl.ablate("unet.mid_block", batch=rows)]
    rec = pl.generate(ddim, ["a cat", "a dog"], ablate, seed=0, **kw)
    changed = [not torch.equal(a, b) for a, b in zip(rec.output.images, clean, strict=True)]
    assert changed == [False, False, False, True]


@given(st.integers(1, 4), st.integers(1, 4), st.booleans())
def test_the_row_layout_covers_the_batch_once(prompts: int, per: int, guidance: bool) -> None:
    layout = pl.diffusion.layout(prompts, per, guidance=guidance)
    assert [r.index for r in layout] == list(range(prompts * per * (2 if guidance else 1)))
    conds = pl.diffusion.rows(prompts, per, guidance=guidance, cond=True)
    assert conds == list(range(len(layout) - prompts * per, len(layout)))
    by_prompt = [
        pl.diffusion.rows(prompts, per, guidance=guidance, prompt=p) for p in range(prompts)
    ]
    assert sorted(i for r in by_prompt for i in r) == list(range(len(layout)))


def test_the_diffusion_lens_last_layer_gives_the_clean_image(ddim: object) -> None:
    clean = pl.generate(ddim, "a cat", [], seed=0, **SD).output.images
    images = []
    for layer in range(3):
        lens = [
            pl.save(f"text_encoder.encoder.layers.{layer}", name="h", call=0),
            pl.patch("text_encoder.final_layer_norm:input", lambda v, s: s["h"], call=0),
        ]
        images.append(pl.generate(ddim, "a cat", lens, seed=0, **SD).output.images)
    assert torch.equal(images[2], clean)
    assert not torch.equal(images[0], clean) and not torch.equal(images[1], clean)


def test_wan_steps_are_the_loop_index_and_records_align_to_steps(wan: object) -> None:
    ivs = [
        pl.save("transformer.blocks.0", name="high", call=slice(None)),
        pl.save("transformer_2.blocks.0", name="low", call=slice(None)),
    ]
    rec = pl.generate(wan, "a cat", ivs, seed=0, **WAN)
    # Wan calls each transformer twice a step (prompt, negative prompt); transformer_2
    # takes over below the boundary: the last step here.
    assert [None if v is None else len(v) for v in rec["high"]] == [2, 2, 2, None]
    assert [None if v is None else len(v) for v in rec["low"]] == [None, None, None, 2]
    clean = rec.output.frames
    late = [pl.ablate("transformer_2.blocks.0", step=3)]
    ablated = pl.generate(wan, "a cat", late, seed=0, **WAN)
    assert not torch.equal(ablated.output.frames, clean)
    with pytest.raises(pl.PurelensError, match="not at the selected step=3"):
        pl.generate(wan, "a cat", [pl.ablate("transformer.blocks.0", step=3)], seed=0, **WAN)


def test_what_a_pipeline_call_cannot_do_is_a_clear_error(ddim: object) -> None:
    cases = [
        ([pl.save("text_encoder.encoder.layers.1", step=0)], {}, "outside the denoising loop"),
        ([pl.save_grad("unet.mid_block")], {}, "no gradients"),
        ([pl.stop("unet.mid_block")], {}, "no meaning in pl.generate"),
        ([], {"max_new_tokens": 3}, "num_inference_steps"),
        ([], {"generator": generators(0)}, "both given"),
        ([], {"prompt": "a dog"}, "second argument"),
    ]
    for ivs, extra, match in cases:
        kw = {"seed": 0, **SD, **extra}
        with pytest.raises(pl.PurelensError, match=match):
            pl.generate(ddim, "a cat", ivs, **kw)
    hint = r"calls its methods, e\.g\. vae\.decode.*'vae\.decoder'"
    with pytest.raises(pl.PurelensError, match=hint):
        pl.generate(ddim, "a cat", [pl.save("vae")], seed=0, **SD)
    for name in ("run", "sweep", "shapes", "edit", "compile"):
        args = {"edit": ([],), "compile": (), "sweep": ("a cat", [[]])}.get(name, ("a cat",))
        with pytest.raises(pl.PurelensError, match=rf"pl\.{name}\(pipe\.unet, \.\.\.\)"):
            getattr(pl, name)(ddim, *args)
    with pytest.raises(pl.PurelensError, match="call=0 for the first"):
        pl.generate(ddim, "a cat", [pl.save("text_encoder.encoder.layers.1")], seed=0, **SD)


def test_prompts_as_a_tuple_or_as_embeddings_are_the_pipelines(ddim: object) -> None:
    ivs = [pl.save("unet.mid_block", step=0)]
    listed = pl.generate(ddim, ["a cat", "a dog"], ivs, seed=0, **SD)
    paired = pl.generate(ddim, ("a cat", "a dog"), ivs, seed=0, **SD)
    assert torch.equal(paired.output.images, listed.output.images)
    emb, neg = ddim.encode_prompt(["a cat", "a dog"], "cpu", 1, True)
    embedded = {"prompt_embeds": emb, "negative_prompt_embeds": neg}
    got = pl.generate(ddim, None, ivs, seed=0, **embedded, **SD)
    fresh = tiny_stable_diffusion("ddim")  # the same weights; its call sets state on it
    want = fresh(**embedded, generator=generators(0, 1), **SD).images
    assert torch.equal(got.output.images, want)
    torch.testing.assert_close(got["unet.mid_block"], listed["unet.mid_block"])


def test_a_wildcard_over_components_lays_each_match_out_as_its_own_site(ddim: object) -> None:
    # Matches share one position: a denoiser among them filed the text encoder's and the
    # VAE's values under denoising step 0 as well.
    rec = pl.generate(ddim, "a cat", [pl.save("*", call=0)], seed=0, **SD)
    alone = pl.generate(ddim, "a cat", [pl.save("text_encoder", call=0)], seed=0, **SD)
    assert isinstance(rec["text_encoder"], torch.Tensor)
    assert torch.equal(rec["text_encoder"], alone["text_encoder"])
    assert isinstance(rec["unet"], tuple) and len(rec["unet"]) == 3


def ltx_like() -> Any:
    """A pipeline shaped like LTX2: diffusers models that are no denoisers run before the
    loop (its text connectors) and after it (its vocoder), one waveform per generator."""
    import diffusers
    from diffusers.configuration_utils import register_to_config

    class Lin(diffusers.ModelMixin, diffusers.ConfigMixin):
        @register_to_config
        def __init__(self, d: int = 32) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    class LTXLike(diffusers.DiffusionPipeline):
        def __init__(self, unet: Any, scheduler: Any, connectors: Any, vocoder: Any) -> None:
            super().__init__()
            self.register_modules(
                unet=unet, scheduler=scheduler, connectors=connectors, vocoder=vocoder
            )

        @torch.no_grad()
        def __call__(  # type: ignore[no-untyped-def]
            self,
            prompt,
            num_inference_steps=3,
            num_waveforms_per_prompt=1,
            generator=None,
            callback_on_step_end=None,
            callback_on_step_end_tensor_inputs=("latents",),
        ):
            n = num_waveforms_per_prompt
            assert isinstance(generator, list) and len(generator) == n, "one per waveform"
            emb = self.connectors(torch.ones(n, 16, 32))
            x = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in generator])
            self.scheduler.set_timesteps(num_inference_steps)
            for i, t in enumerate(self.scheduler.timesteps):
                eps = self.unet(x, t, encoder_hidden_states=emb).sample
                x = self.scheduler.step(eps, t, x).prev_sample
                if callback_on_step_end is not None:
                    callback_on_step_end(self, i, t, {"latents": x})
            return self.vocoder(x.flatten(1)[:, :32])

    sd = tiny_stable_diffusion("ddim")
    return LTXLike(sd.unet, sd.scheduler, Lin(), Lin())


def test_diffusers_models_that_are_no_denoisers_run_outside_the_loop() -> None:
    # Every diffusers model but an autoencoder counted as a denoiser: the connectors' value
    # was filed as step 0, and any intervention on the vocoder was an error.
    pipe = ltx_like()
    ivs = [pl.save("connectors.proj"), pl.save("vocoder.proj"), pl.save("unet.mid_block")]
    rec = pl.generate(pipe, "x", ivs, seed=0, num_waveforms_per_prompt=2)
    assert rec["connectors.proj"].shape == (2, 16, 32)
    assert rec["vocoder.proj"].shape == (2, 32)
    assert len(rec["unet.mid_block"]) == 3
    ablated = pl.generate(pipe, "x", [pl.ablate("vocoder")], seed=0, num_waveforms_per_prompt=2)
    assert torch.equal(ablated.output, torch.zeros(2, 32))
    with pytest.raises(pl.PurelensError, match="outside the denoising loop"):
        pl.generate(pipe, "x", [pl.ablate("connectors", step=0)], seed=0)


def test_a_compiled_denoiser_still_counts_steps() -> None:
    pipe = tiny_stable_diffusion("ddim")
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    rec = pl.generate(pipe, "a cat", [pl.save("unet._orig_mod.mid_block", step=1)], seed=0, **SD)
    assert rec["unet._orig_mod.mid_block"].shape == (2, 16, 8, 8)


def test_a_numpy_seed_is_a_seed(ddim: object) -> None:
    np = pytest.importorskip("numpy")
    got = pl.generate(ddim, "a cat", [], seed=np.int64(3), **SD).output.images
    assert torch.equal(got, pl.generate(ddim, "a cat", [], seed=3, **SD).output.images)


def test_a_step_past_the_last_one_ends_with_the_record(ddim: object) -> None:
    with pytest.raises(pl.PurelensError, match="3 iterations of the denoising loop") as caught:
        pl.generate(ddim, "a cat", [pl.save("unet.mid_block", step=5)], seed=0, **SD)
    assert caught.value.record.output.images.shape == (1, 3, 32, 32)


def test_sites_are_named_by_component(ddim: object) -> None:
    sites = pl.sites(ddim)
    assert "unet.mid_block" in sites and "text_encoder.encoder.layers.1" in sites
    assert "vae.decoder" in sites and "" not in sites


@pytest.mark.parametrize("make", [lambda: tiny_stable_diffusion("ddim"), tiny_wan])
def test_every_attention_port_listed_runs(make: Any) -> None:
    # diffusers' attention modules call sdpa in their processor: their ports were not listed.
    pipe = make()
    listed = [s for s in pl.sites(pipe) if s.endswith(":pattern")]
    listed = [s for s in listed if not s.startswith("vae.encoder.")]  # image-to-image only
    components = {s.split(".")[0] for s in listed}
    assert components >= (
        {"unet", "vae", "text_encoder"}
        if hasattr(pipe, "unet")
        else {"transformer", "transformer_2"}
    )
    rec = pl.generate(
        pipe,
        "a cat",
        [pl.save(s, call=0) for s in listed],
        seed=0,
        **(SD if hasattr(pipe, "unet") else WAN),
    )
    for site in listed:
        values = [v for v in torch.utils._pytree.tree_leaves(rec[site]) if v is not None]
        assert values, site
        for pattern in values:  # (batch, heads, q_pos, k_pos), each row a distribution
            assert pattern.ndim == 4, site
            torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))


def test_calls_in_threads_do_not_share_the_scheduler_and_leave_the_pipeline_as_it_was(
    ddim: object,
) -> None:
    want = {s: pl.generate(ddim, "a cat", [], seed=s, **SD).output.images for s in range(4)}
    timesteps = ddim.scheduler.timesteps.clone()
    got: dict[int, torch.Tensor] = {}

    def work(s: int) -> None:
        got[s] = pl.generate(ddim, "a cat", [pl.save("unet.mid_block")], seed=s, **SD).output.images

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[s], want[s]) for s in range(4))
    assert torch.equal(ddim.scheduler.timesteps, timesteps)
    assert not hasattr(ddim, "_guidance_scale")
    assert not ddim.unet.mid_block._forward_hooks


def test_a_users_callback_still_runs(ddim: object) -> None:
    seen: list[int] = []

    def callback(pipe: object, i: int, t: object, kwargs: dict) -> dict:
        seen.append(i)
        return {}

    rec = pl.generate(ddim, "a cat", [pl.save("unet.mid_block", step=1)], seed=0,
                      callback_on_step_end=callback, **SD)  # fmt: skip
    assert seen == [0, 1, 2] and rec["unet.mid_block"].shape == (2, 16, 8, 8)


def test_a_pipeline_without_a_step_callback_refuses_step_and_counts_calls(ddim: object) -> None:
    from diffusers import DiffusionPipeline

    class Plain(DiffusionPipeline):
        def __init__(self, unet: torch.nn.Module) -> None:
            super().__init__()
            self.register_modules(unet=unet)

        def __call__(self, prompt: str, generator: object = None) -> torch.Tensor:
            x = torch.zeros(1, 4, 16, 16)
            emb = torch.zeros(1, 16, 32)
            for t in (10, 5):
                x = self.unet(x, t, encoder_hidden_states=emb).sample
            return x

    plain = Plain(ddim.unet)
    with pytest.raises(pl.PurelensError, match="no callback_on_step_end"):
        pl.generate(plain, "x", [pl.save("unet.mid_block", step=0)])
    rec = pl.generate(plain, "x", [pl.save("unet.mid_block", call=slice(None))])
    assert len(rec["unet.mid_block"]) == 2


def test_a_module_replaced_inside_the_unet_still_counts_steps() -> None:
    import copy

    pipe = tiny_stable_diffusion()
    pl.generate(pipe, "a cat", [pl.save("unet.mid_block")], seed=0, **SD)
    pipe.unet.mid_block = copy.deepcopy(pipe.unet.mid_block)
    rec = pl.generate(pipe, "a cat", [pl.save("unet.mid_block", call=slice(None))], seed=0, **SD)
    assert len(rec["unet.mid_block"]) == 3 and all(len(v) == 1 for v in rec["unet.mid_block"])
    assert pl.generate(pipe, "a cat", [pl.save("unet.mid_block", step=1)], seed=0, **SD)


def test_denoiser_calls_no_step_callback_ends_are_an_error(ddim: object) -> None:
    from diffusers import DiffusionPipeline

    class Ignores(DiffusionPipeline):  # takes the callback, never calls it
        def __init__(self, unet: torch.nn.Module) -> None:
            super().__init__()
            self.register_modules(unet=unet)

        def __call__(self, prompt: str, callback_on_step_end: object = None) -> torch.Tensor:
            x, emb = torch.zeros(1, 4, 16, 16), torch.zeros(1, 16, 32)
            for t in (10, 5, 1):
                x = self.unet(x, t, encoder_hidden_states=emb).sample
            return x

    with pytest.raises(pl.PurelensError, match="cannot tell which denoising step"):
        pl.generate(Ignores(ddim.unet), "x", [pl.patch("unet.mid_block", lambda v: v, step=0)])


def test_a_diffusers_callback_object_gets_its_own_tensor_inputs(ddim: object) -> None:
    from diffusers.callbacks import SDCFGCutoffCallback

    kw = {**SD, "callback_on_step_end_tensor_inputs": ["latents"]}
    want = ddim("a cat", generator=generators(0), callback_on_step_end=SDCFGCutoffCallback(
        cutoff_step_ratio=0.5), **kw).images  # fmt: skip
    got = pl.generate(
        ddim,
        "a cat",
        [pl.save("unet.mid_block")],
        seed=0,
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5),
        **kw,
    )
    assert torch.equal(got.output.images, want)
    assert [v.shape[0] for v in got["unet.mid_block"]] == [2, 2, 1]  # guidance cut off


def test_a_pipeline_that_runs_other_pipelines_is_refused(ddim: object) -> None:
    from diffusers import DiffusionPipeline

    class Combined(DiffusionPipeline):
        def __init__(self, inner: object) -> None:
            super().__init__()
            self.inner_pipe = inner

        def __call__(self, prompt: str, callback_on_step_end: object = None) -> object:
            return self.inner_pipe(prompt, callback_on_step_end=callback_on_step_end, **SD)

    with pytest.raises(pl.PurelensError, match=r"runs other pipelines \(inner_pipe\)"):
        pl.generate(Combined(ddim), "a cat", [])

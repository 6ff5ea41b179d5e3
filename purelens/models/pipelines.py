"""Tiny diffusers pipelines built offline from configs (random weights), in well under a
second: for tests, tutorials and trying purelens on diffusion without a download.

They produce images of noise, not pictures, but they run the real pipeline code:
the denoising loop, classifier-free guidance, the schedulers, the VAE.

Examples:
    >>> import purelens as pl
    >>> pipe = pl.models.pipelines.tiny_stable_diffusion()
    >>> rec = pl.generate(pipe, "a cat", [pl.save("unet.mid_block")], seed=0,
    ...                   num_inference_steps=2, output_type="pt")
    >>> rec.output.images.shape, len(rec["unet.mid_block"])
    (torch.Size([1, 3, 32, 32]), 2)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_clip_tokenizer", "tiny_stable_diffusion", "tiny_wan"]

_WORDS = ["a", "cat", "dog", "photo", "of", "the", "red", "blue", "house", "tree", "on", "sky"]


def _diffusers() -> Any:
    """diffusers, imported without the warnings transformers prints as diffusers loads
    (image processors that would use torchvision)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        import diffusers

        diffusers.StableDiffusionPipeline, diffusers.WanPipeline  # noqa: B018 (lazy: load now)
    except ImportError as error:  # pragma: no cover - the extra is installed in CI
        from .._errors import PurelensError

        raise PurelensError(
            "these pipelines need diffusers: pip install 'purelens[diffusion]'"
        ) from error
    finally:
        logging.set_verbosity(verbosity)
    return diffusers


def tiny_clip_tokenizer(max_length: int = 16) -> Any:
    """A CLIP tokenizer made without files: the 256 byte characters (each also with the
    end-of-word mark) and merges that spell a dozen words."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        if len(word) == 1:
            continue
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    # (transformers types `merges` as strings; the tokenizers library takes these pairs)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)  # type: ignore[arg-type]


def tiny_stable_diffusion(scheduler: str = "ddim", *, seed: int = 0) -> Any:
    """A `StableDiffusionPipeline` of 32 x 32 images: a UNet with two blocks (8 and 16
    channels), a 2-block VAE, a 3-layer CLIP text encoder; `scheduler` "ddim" or "euler"."""
    diffusers = _diffusers()
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=4,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4,
        sample_size=32,
    )  # fmt: skip
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    kinds = {
        "ddim": lambda: diffusers.DDIMScheduler(clip_sample=False, steps_offset=1),
        "euler": lambda: diffusers.EulerDiscreteScheduler(steps_offset=1),
    }
    if scheduler not in kinds:
        from .._errors import PurelensError

        raise PurelensError(f"scheduler must be one of {sorted(kinds)}, got {scheduler!r}.")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=kinds[scheduler](), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan(*, seed: int = 0) -> Any:
    """A Wan 2.2 text-to-video pipeline of 2 frames of 16 x 16: a 2-layer UMT5 encoder,
    a tiny `AutoencoderKLWan` and two one-block transformers (high noise, then low noise
    below the boundary ratio 0.5). Wan calls its transformer once for the prompt and once
    for the negative prompt at each step (no doubled batch)."""
    diffusers = _diffusers()
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_clip_tokenizer(max_length=16)
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip

    def transformer() -> Any:
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1,
            rope_max_seq_len=32,
        ).eval()  # fmt: skip

    pipe = diffusers.WanPipeline(
        tokenizer=tokenizer, text_encoder=encoder.eval(), vae=vae.eval(),
        scheduler=diffusers.UniPCMultistepScheduler(flow_shift=3.0), transformer=transformer(),
        transformer_2=transformer(), boundary_ratio=0.5,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""The cost of `pl.generate` on diffusers pipelines against calling the pipeline itself.

Tiny pipelines built from configs (`purelens.models.pipelines`): Stable Diffusion
with DDIM and with Euler (32 x 32 images, guidance 7.5) and Wan 2.2 (5 frames of
16 x 16, two transformers). Cases, interleaved in every repeat: the pipeline's
own call with fresh generators; `pl.generate` with no interventions (checked
bitwise equal to it first); `pl.generate` with a per-step save at the denoiser,
a save of a text-encoder layer and an ablation at step 1. Prints one table.

    python benchmarks/diffusion.py            # 4 steps, 41 repeats
    python benchmarks/diffusion.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from _common import machine, start, timings

import purelens as pl
from purelens.models.pipelines import tiny_stable_diffusion, tiny_wan


def cases(pipe: Any, kwargs: dict[str, Any], denoiser: str, encoder: str) -> dict[str, Any]:
    def bare() -> Any:
        return pipe("a red house", generator=[torch.Generator().manual_seed(0)], **kwargs)

    work = [
        pl.save(denoiser, call=slice(None)),
        pl.save(encoder, call=0),
        pl.ablate(denoiser, step=1),
    ]
    plain = bare()
    got = pl.generate(pipe, "a red house", [], seed=0, **kwargs)
    field = "images" if hasattr(plain, "images") else "frames"
    same = torch.equal(getattr(plain, field), getattr(got.output, field))
    return {
        "the pipeline's own call": bare,
        "pl.generate, no interventions" + ("" if same else " (DIFFERS)"): lambda: pl.generate(
            pipe, "a red house", [], seed=0, **kwargs
        ),
        "pl.generate, 2 saves + an ablation": lambda: pl.generate(
            pipe, "a red house", work, seed=0, **kwargs
        ),
    }


def main(argv: list[str] | None = None) -> str:
    quick = start(__doc__, argv)
    steps, repeats = (2, 3) if quick else (4, 41)
    pipelines = {
        "Stable Diffusion, DDIM": (
            tiny_stable_diffusion("ddim"),
            {"num_inference_steps": steps, "output_type": "pt"},
            "unet.mid_block",
            "text_encoder.encoder.layers.1",
        ),
        "Stable Diffusion, Euler": (
            tiny_stable_diffusion("euler"),
            {"num_inference_steps": steps, "output_type": "pt"},
            "unet.mid_block",
            "text_encoder.encoder.layers.1",
        ),
        "Wan 2.2 (two transformers)": (
            tiny_wan(),
            {"num_inference_steps": steps, "height": 16, "width": 16, "num_frames": 5,
             "output_type": "pt"},
            "transformer.blocks.0",
            "text_encoder.encoder.block.1",
        ),
    }  # fmt: skip
    lines = [
        machine(),
        "",
        f"### Tiny diffusers pipelines, {steps} steps, one prompt (median of {repeats} "
        "interleaved repeats)",
        "",
        "| pipeline | case | median (ms) | spread (ms) | ratio to the pipeline | difference (ms) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, (pipe, kwargs, denoiser, encoder) in pipelines.items():
        got = timings(cases(pipe, kwargs, denoiser, encoder), repeats)
        base = statistics.median(next(iter(got.values())))
        for case, times in got.items():
            median = statistics.median(times)
            spread = (max(times) - min(times)) * 1e3
            lines.append(
                f"| {name} | {case} | {median * 1e3:.2f} | {spread:.2f} | "
                f"{median / base:.3f} | {(median - base) * 1e3:+.2f} |"
            )
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()

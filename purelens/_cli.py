"""The `purelens` command line: demo, sites, patch, lens, serve.

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
from ._extras import need

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, unless the help says it already or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "(default" in text or default is None or default is False or default == []:
            return text
        return super()._get_help_string(action)


def _console() -> Any:
    return need("rich.console", "the purelens command's output").Console()


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
    from . import models
    from ._listing import sites
    from ._shapes import shapes

    model, tokenizer = models.load(args.model)
    found = shapes(model, args.prompt, tokenizer=tokenizer)
    ports = [site for site in sites(model) if ":" in site]  # attention ports
    inside = shapes(model, args.prompt, ports, tokenizer=tokenizer) if ports else {}
    table = need("rich.table", "purelens sites").Table(
        title=f"sites of {type(model).__name__} for {args.prompt!r}"
    )
    for column in ("site", "dtype", "shape"):
        table.add_column(column)
    for survey in (found, inside):
        for site, shape in survey.items():
            dtype = str(survey.dtypes[site]).removeprefix("torch.")  # type: ignore[attr-defined]
            table.add_row(site or '""', dtype, str(list(shape)))
    _console().print(table)


def _lens(args: argparse.Namespace) -> None:
    from . import models
    from .experiments import logit_lens

    model, tokenizer = models.load(args.model)
    _console().print(logit_lens(model, tokenizer, args.prompt).table())


def _serve(args: argparse.Namespace) -> None:
    import importlib

    from ._server import Limits, read_tokens, serve

    for module in args.imports:  # modules that register functions (pl.functions.register)
        importlib.import_module(module)
    tokens = read_tokens(args.tokens_file)
    limits = Limits(
        input_tokens=args.max_input_tokens,
        new_tokens=args.max_new_tokens,
        saved_bytes=int(args.max_saved_mb * 2**20),
        seconds=args.max_seconds,
        request_bytes=int(args.max_request_mb * 2**20),
    )
    serve(
        args.model,
        host=args.host,
        port=args.port,
        tokens=tokens,
        limits=limits,
        concurrency=args.concurrency,
        ray=args.ray,
        replicas=args.replicas,
        engine=args.engine,
        engine_args=dict(_engine_arg(a) for a in args.engine_args),
    )


def _engine_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from --engine-arg; the value as JSON when it reads as JSON."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--engine-arg takes KEY=VALUE (e.g. dtype=float32), got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except ValueError:
        return key.replace("-", "_"), value


def _quiet_transformers() -> None:
    """No loading bars or advice from transformers: the command's own output only."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="purelens", description="Look inside neural networks, purely.")
    parser.add_argument("--version", action="version", version=f"purelens {__version__}")
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

    defaults = _limits()
    serve = commands.add_parser("serve", help="serve a model over HTTP (pl.remote)")
    serve.add_argument("--model", type=Path, default=None, help=model_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--tokens-file",
        type=Path,
        default=None,
        help="accepted bearer tokens, one a line (also: PURELENS_TOKENS, comma-separated)",
    )
    serve.add_argument(
        "--ray",
        action="store_true",
        help='deploy on Ray Serve with replicas (pip install "purelens[ray]")',
    )
    serve.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas")
    serve.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="run requests on a transformers model, or batch them on a vLLM engine "
        '(pip install "purelens[vllm]"; see the README)',
    )
    serve.add_argument(
        "--engine-arg",
        dest="engine_args",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a vLLM engine argument, e.g. dtype=float32 or max_model_len=64; repeatable",
    )
    serve.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="requests running the model at once, per process (default: 1; 64 on vLLM, "
        "which batches them)",
    )
    serve.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (to register functions); repeatable",
    )
    serve.add_argument(
        "--max-input-tokens",
        type=int,
        default=defaults.input_tokens,
        help="token positions per request (inputs and keyword arguments; x beams)",
    )
    serve.add_argument(
        "--max-new-tokens", type=int, default=defaults.new_tokens, help="per generation"
    )
    serve.add_argument(
        "--max-saved-mb",
        type=float,
        default=defaults.saved_bytes / 2**20,
        help="tensors in the returned record, per request",
    )
    serve.add_argument(
        "--max-seconds",
        type=float,
        default=defaults.seconds,
        help="wall time per request (reading it and running the model)",
    )
    serve.add_argument(
        "--max-request-mb",
        type=float,
        default=defaults.request_bytes / 2**20,
        help="size of a request body",
    )
    serve.set_defaults(run=_serve)
    return parser


def _limits() -> Any:
    from ._server import Limits

    return Limits()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    try:
        args.run(args)
    except (PurelensError, OSError, ValueError, ImportError) as error:
        message = str(error) or type(error).__name__
        if not isinstance(error, PurelensError):  # (purelens's own say the fix on line two)
            message = message.splitlines()[0]
        print(f"purelens {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0

"""What purelens costs a tool that depends on it: the installed size of its dependencies and
the time `import purelens` takes.

    python benchmarks/footprint.py [--quick]

Sizes are of the packages as installed in this environment (their files, from each
distribution's RECORD), for the dependency closure of each requirement: `purelens` alone
(what `pip install purelens` brings), with the `serve` and `plot` extras, and with both,
which is what every install pulled before those moved to extras. torch (with what it
requires) is in every closure and dominates it, so what comes beyond it is beside each.
Import times are medians of fresh interpreters (`python -c "import purelens"`), beside
`import torch` alone.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from importlib import metadata

from _common import machine
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REQUIREMENTS = ["purelens", "purelens[serve]", "purelens[plot]", "purelens[serve,plot]"]


def closure(requirement: str) -> set[str]:
    """The distributions `requirement` installs, itself included (as installed here)."""
    seen: set[str] = set()
    todo = [Requirement(requirement)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            child = Requirement(text)
            wanted = req.extras or {""}
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(child)
    return {key.partition("[")[0] for key in seen}


def size_mb(names: set[str]) -> float:
    total = 0
    for name in names:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            continue
        for file in files:
            try:
                total += file.locate().stat().st_size  # type: ignore[attr-defined]
            except OSError:
                pass
    return total / 2**20


def import_seconds(statement: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one import of each")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 7
    lines = [
        f"{machine()}, Python {sys.version.split()[0]}.\n",
        "| install | distributions | size (MiB) | beyond torch's own (MiB) |",
        "|---|---:|---:|---:|",
    ]
    torch = closure("torch")
    for requirement in REQUIREMENTS:
        names = closure(requirement)
        without = names - torch
        lines.append(
            f'| `pip install "{requirement}"` | {len(names)} | {size_mb(names):.0f} '
            f"| {size_mb(without):.0f} |"
        )
    lines += ["", "| import | seconds (median of fresh interpreters) |", "|---|---:|"]
    for statement in ("import torch", "import purelens", "import purelens.experiments"):
        lines.append(f"| `{statement}` | {import_seconds(statement, repeats):.2f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()

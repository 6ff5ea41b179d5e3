"""The documentation site's own pages: their Python examples run as written, and every
README section they include exists (the site's strict build, in .ci/run, checks links)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_a_pages_python_examples_run(page: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    namespace = {"__name__": "docs"}  # one namespace per page: it reads top to bottom
    for block in blocks:
        exec(compile(_dedented(block), str(page), "exec"), namespace)


def test_every_included_readme_section_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in PAGES:
        for name in re.findall(r'--8<-- "README.md:([\w-]+)"', page.read_text()):
            assert f"[start:{name}]" in readme and f"[end:{name}]" in readme, (page, name)


def _dedented(block: str) -> str:
    lines = block.splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "\n".join(line[indent:] for line in lines)

"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no Python example"
    namespace = {"__name__": "readme"}  # one namespace: the README reads top to bottom
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)

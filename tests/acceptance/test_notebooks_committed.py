"""The notebooks are committed as they ran: every code cell executed, in order, with no
error, so that they read like results on a code host and on the documentation site
(which shows each one, as docs/tutorials links them). The suite runs them again (nbmake)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_notebook_is_committed_with_its_outputs(path: Path) -> None:
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: run it top to bottom"
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert outputs, f"{path.name}: committed without outputs"
    assert not [o for o in outputs if o["output_type"] == "error"]
    printed = "".join("".join(o.get("text", "")) for o in outputs if o["output_type"] == "stream")
    assert "Warning" not in printed and "Loading weights" not in printed, path.name
    assert (ROOT / "docs" / "tutorials" / path.name).resolve() == path.resolve()


def test_each_notebook_ends_by_saying_what_it_found() -> None:
    for path in NOTEBOOKS:
        last = json.loads(path.read_text())["cells"][-1]
        assert last["cell_type"] == "markdown" and "What it means" in "".join(last["source"])

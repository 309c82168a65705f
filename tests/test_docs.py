"""The code in the docs runs: every ```python block of docs/custom-recurrence.md and docs/training.md, in order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("page", ["custom-recurrence.md", "training.md"])
def test_doc_code_runs(page):
    blocks = _python_blocks(DOCS / page)
    assert len(blocks) >= 2, f"{page}: expected its code blocks"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page}[block {i}]", "exec"), namespace)  # noqa: S102 - our own docs

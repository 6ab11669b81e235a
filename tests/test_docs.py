"""Run every ```python block of the user-facing docs, so examples cannot rot."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for name in ("api.md",):
        text = (DOCS / name).read_text()
        for i, m in enumerate(_BLOCK.finditer(text)):
            yield pytest.param(m.group(1), id=f"{name}-{i}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_example_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})


def test_docs_have_examples():
    assert len(list(_blocks())) >= 5

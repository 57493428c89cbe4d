"""examples/langchain_rag.py runs offline, on passages and on whole documents."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "langchain_rag.py"
NOTES = "# Foxes\nThe quick brown fox jumps over the lazy dog.\n\n# Retrieval\nCosine similarity ranks documents.\n"


@pytest.mark.parametrize("whole_documents", [False, True], ids=["passages", "whole-documents"])
def test_rag_example_prints_retrieved_passages(model_dir, tmp_path, monkeypatch, capsys, whole_documents):
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES, encoding="utf-8")
    argv = [str(EXAMPLE), "--model", str(model_dir), "--corpus", str(notes), "what is a fox?"]
    monkeypatch.setattr(sys, "argv", argv + (["--whole-documents"] if whole_documents else []))
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "UNTRAINED" not in out and "untrained" not in out
    assert "indexed 1 files" in out if whole_documents else "indexed 2 passages" in out
    assert "Q: what is a fox?" in out and "  1. [" in out

"""examples/llamaindex_vector_index.py runs offline."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "llamaindex_vector_index.py"
NOTES = "# Foxes\nThe quick brown fox jumps over the lazy dog.\n\n# Retrieval\nCosine similarity ranks documents.\n"


def test_vector_index_example_prints_retrieved_nodes(model_dir, tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES, encoding="utf-8")
    argv = [str(EXAMPLE), "--model", str(model_dir), "--corpus", str(notes), "what is a fox?"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "untrained" not in out
    assert "indexed 1 nodes from 1 files" in out
    assert "Q: what is a fox?" in out
    assert "[notes.md] # Foxes The quick brown fox" in out

"""Relevance judgments (qrels): query id -> document id -> grade.

Two layouts are read, told apart line by line by their number of columns:

- BEIR ``qrels/<split>.tsv``: ``query-id <TAB> corpus-id <TAB> score``, with a header line;
- TREC qrels: ``query-id iteration doc-id grade``, whitespace-separated, no header.

Grades are integers and may be graded (TREC DL: 0-3). Which grade counts as relevant for binary
measures is decided when measuring (see ``metrics.py``), not here.
"""

from __future__ import annotations

from pathlib import Path

from st_mamba.evaluation.files import DataFileError, numbered_lines, require_file

Qrels = dict[str, dict[str, int]]
"""query id -> {document id: grade}."""

_BEIR_HEADER = ("query-id", "corpus-id", "score")


def read_qrels(path: str | Path) -> Qrels:
    """Read a BEIR TSV or TREC qrels file.

    Raises:
        FileNotFoundError: the file does not exist.
        DataFileError: a line has the wrong number of columns, a grade is not an integer, a
            (query, document) pair is judged twice with different grades, or the file is empty.
    """
    path = require_file(path, "qrels file")
    qrels: Qrels = {}
    for number, line in numbered_lines(path):
        fields = line.split("\t") if "\t" in line else line.split()
        if number == 1 and tuple(field.strip().lower() for field in fields) == _BEIR_HEADER:
            continue
        if len(fields) == 3:
            query_id, doc_id, grade_text = fields
        elif len(fields) == 4:
            query_id, _, doc_id, grade_text = fields
        else:
            raise DataFileError(
                f"{path}:{number}: expected 3 columns (query-id, corpus-id, score) or 4 (TREC: query-id, "
                f"iteration, doc-id, grade), found {len(fields)}: {line[:80]!r}"
            )
        try:
            grade = int(grade_text)
        except ValueError:
            raise DataFileError(f"{path}:{number}: grade {grade_text!r} is not an integer") from None
        query_id, doc_id = query_id.strip(), doc_id.strip()
        judged = qrels.setdefault(query_id, {})
        if judged.get(doc_id, grade) != grade:
            raise DataFileError(
                f"{path}:{number}: ({query_id}, {doc_id}) is judged again with grade {grade}, "
                f"earlier with {judged[doc_id]}"
            )
        judged[doc_id] = grade
    if not qrels:
        raise DataFileError(f"{path}: no judgments in the file")
    return qrels


def is_graded(qrels: Qrels) -> bool:
    """Whether any grade is above 1 (then "relevant" needs a threshold for binary measures)."""
    return any(grade > 1 for judged in qrels.values() for grade in judged.values())

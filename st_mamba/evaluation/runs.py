"""Run files: ranked results in the TREC format, ``query-id Q0 doc-id rank score tag``.

A run is held as query id -> {document id: score}. As in trec_eval, the order that counts is
by score; the rank column is read and checked but only breaks ties when taking a top-k.
"""

from __future__ import annotations

from pathlib import Path

from st_mamba.evaluation.files import DataFileError, numbered_lines, require_file

Run = dict[str, dict[str, float]]
"""query id -> {document id: score}; higher scores rank first."""


def read_run(path: str | Path) -> Run:
    """Read a TREC run file; each query's documents are kept in the order of their rank column.

    Raises:
        FileNotFoundError: the file does not exist.
        DataFileError: a line does not have six columns, its rank or score is not a number, a
            document appears twice for one query, or the file is empty.
    """
    path = require_file(path, "run file")
    rows: dict[str, list[tuple[int, str, float]]] = {}
    seen: dict[tuple[str, str], int] = {}
    for number, line in numbered_lines(path):
        fields = line.split()
        if len(fields) != 6:
            raise DataFileError(
                f"{path}:{number}: expected 6 columns (query-id Q0 doc-id rank score tag), found {len(fields)}: "
                f"{line[:80]!r}"
            )
        query_id, _, doc_id, rank_text, score_text, _ = fields
        try:
            rank, score = int(rank_text), float(score_text)
        except ValueError:
            raise DataFileError(
                f"{path}:{number}: rank {rank_text!r} or score {score_text!r} is not a number"
            ) from None
        if (query_id, doc_id) in seen:
            raise DataFileError(
                f"{path}:{number}: document {doc_id} appears twice for query {query_id} "
                f"(first on line {seen[query_id, doc_id]})"
            )
        seen[query_id, doc_id] = number
        rows.setdefault(query_id, []).append((rank, doc_id, score))
    if not rows:
        raise DataFileError(f"{path}: no results in the file")
    return {query_id: {doc_id: score for _, doc_id, score in sorted(hits)} for query_id, hits in rows.items()}


def top_k(run: Run, k: int) -> Run:
    """Each query's ``k`` highest-scoring documents (ties keep the run's order)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return {query_id: dict(sorted(hits.items(), key=lambda hit: -hit[1])[:k]) for query_id, hits in run.items()}


def write_run(run: Run, path: str | Path, tag: str) -> Path:
    """Write ``run`` as a TREC run file, each query's documents by descending score, ranks from 1."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for query_id, hits in run.items():
            ranked = sorted(hits.items(), key=lambda hit: -hit[1])
            for rank, (doc_id, score) in enumerate(ranked, start=1):
                out.write(f"{query_id} Q0 {doc_id} {rank} {float(score)!r} {tag}\n")
    return path

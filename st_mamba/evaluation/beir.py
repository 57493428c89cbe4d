"""A local BEIR folder: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

Each file may also be gzipped (``corpus.jsonl.gz``, as the BEIR downloads are). Corpus lines are
``{"_id", "title", "text"}`` (title optional), query lines ``{"_id", "text"}``. A document is
presented to a model as ``title + " " + text``, stripped, as BEIR and MTEB do.

Only judged queries are evaluated: queries with no judgments in the split are counted and left
out, and judgments for queries missing from ``queries.jsonl`` are counted and dropped.
Judged documents missing from the corpus are kept (a pooled corpus such as TREC DL's leaves
some out on purpose, and recall must still count them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from st_mamba.evaluation.files import DataFileError, find_file, json_lines
from st_mamba.evaluation.qrels import Qrels, read_qrels

logger = logging.getLogger(__name__)


# Ways a user may type the same query (``BeirDataset.recased``): a retriever should not care.
QUERY_CASES: dict[str, Callable[[str], str]] = {
    "as-given": lambda text: text,
    "upper": str.upper,
    "lower": str.lower,
    "title": str.title,
}


@dataclass(frozen=True)
class Document:
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """What the model reads: title and text joined by a space."""
        return f"{self.title} {self.text}".strip()


@dataclass
class BeirDataset:
    """A retrieval data set restricted to one split's judged queries.

    Attributes:
        corpus: document id -> Document, in file order.
        queries: query id -> text, only the queries judged in ``qrels``.
        qrels: query id -> {document id: grade}, only for queries in ``queries``.
        name: a label for reports (the folder name).
        split: the qrels split that was loaded.
        unjudged_queries: how many queries of ``queries.jsonl`` have no judgments in this split.
    """

    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: Qrels
    name: str = ""
    split: str = "test"
    unjudged_queries: int = 0

    def recased(self, case: str) -> BeirDataset:
        """The same data set with every query re-typed: ``case`` is a key of ``QUERY_CASES``."""
        if case not in QUERY_CASES:
            raise ValueError(f"unknown query case {case!r}; known: {', '.join(QUERY_CASES)}")
        return replace(self, queries={query_id: QUERY_CASES[case](text) for query_id, text in self.queries.items()})

    def document_texts(self, doc_ids: list[str] | None = None) -> list[str]:
        ids = list(self.corpus) if doc_ids is None else doc_ids
        return [self.corpus[doc_id].full_text for doc_id in ids]


def _identifier(row: dict, path: Path, number: int) -> str:
    if "_id" not in row:
        raise DataFileError(f'{path}:{number}: missing "_id"')
    identifier = row["_id"]
    if not isinstance(identifier, (str, int)) or isinstance(identifier, bool) or str(identifier).strip() == "":
        raise DataFileError(f'{path}:{number}: "_id" must be a non-empty string or integer, got {identifier!r}')
    return str(identifier)


def _string_field(row: dict, key: str, path: Path, number: int, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DataFileError(f'{path}:{number}: missing "{key}"')
        return ""
    if not isinstance(value, str):
        raise DataFileError(f'{path}:{number}: "{key}" must be a string, got {type(value).__name__}')
    return value


def read_corpus(path: Path) -> dict[str, Document]:
    """document id -> Document from a BEIR ``corpus.jsonl``; raises DataFileError on bad or duplicate lines."""
    corpus: dict[str, Document] = {}
    first_line: dict[str, int] = {}
    for number, row in json_lines(path):
        doc_id = _identifier(row, path, number)
        if doc_id in corpus:
            raise DataFileError(
                f"{path}:{number}: duplicate document id {doc_id!r} (first on line {first_line[doc_id]})"
            )
        title = _string_field(row, "title", path, number, required=False)
        text = _string_field(row, "text", path, number, required=True)
        corpus[doc_id] = Document(title, text)
        first_line[doc_id] = number
    if not corpus:
        raise DataFileError(f"{path}: the corpus is empty")
    return corpus


def read_queries(path: Path) -> dict[str, str]:
    """query id -> text from a BEIR ``queries.jsonl``; raises DataFileError on bad or duplicate lines."""
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, row in json_lines(path):
        query_id = _identifier(row, path, number)
        if query_id in queries:
            raise DataFileError(
                f"{path}:{number}: duplicate query id {query_id!r} (first on line {first_line[query_id]})"
            )
        queries[query_id] = _string_field(row, "text", path, number, required=True)
        first_line[query_id] = number
    if not queries:
        raise DataFileError(f"{path}: no queries in the file")
    return queries


def load_beir(folder: str | Path, split: str = "test") -> BeirDataset:
    """Load a BEIR folder, keeping the queries judged in ``qrels/<split>.tsv``.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (the message names it).
        DataFileError: a malformed line (file and line number given), an empty corpus or query
            file, or no query left that is both in ``queries.jsonl`` and judged.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BEIR folder not found: {folder}")
    corpus = read_corpus(find_file(folder, "corpus.jsonl", "corpus"))
    queries_path = find_file(folder, "queries.jsonl", "queries")
    all_queries = read_queries(queries_path)
    qrels_path = find_file(folder / "qrels", f"{split}.tsv", f"qrels for split {split!r}")
    all_qrels = read_qrels(qrels_path)

    orphans = [query_id for query_id in all_qrels if query_id not in all_queries]
    if orphans:
        logger.warning(
            "%s judges %d queries that are not in %s (e.g. %s); their judgments are dropped",
            qrels_path, len(orphans), queries_path, ", ".join(orphans[:3]),
        )  # fmt: skip
    qrels = {query_id: judged for query_id, judged in all_qrels.items() if query_id in all_queries}
    if not qrels:
        raise DataFileError(f"{qrels_path}: none of its queries is in {queries_path}; nothing to evaluate")
    queries = {query_id: text for query_id, text in all_queries.items() if query_id in qrels}
    unjudged = len(all_queries) - len(queries)
    if unjudged:
        logger.info("%d of %d queries have no judgments in split %r and are skipped", unjudged, len(all_queries), split)
    missing_docs = sum(doc_id not in corpus for judged in qrels.values() for doc_id in judged)
    if missing_docs:
        logger.info("%d judged documents are not in the corpus (they still count for recall)", missing_docs)
    return BeirDataset(corpus, queries, qrels, name=folder.name, split=split, unjudged_queries=unjudged)

"""Dense retrieval over a BEIR data set: full-corpus exact search, or re-ranking a first-stage run."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sentence_transformers import SentenceTransformer

from st_mamba.evaluation.beir import BeirDataset
from st_mamba.evaluation.encoding import DocumentEncoding, encode_documents, encode_queries
from st_mamba.evaluation.runs import Run
from st_mamba.evaluation.search import Backend, check_dimensions, exact_search

logger = logging.getLogger(__name__)


def dense_search(
    model: SentenceTransformer,
    dataset: BeirDataset,
    k: int = 1000,
    encoding: DocumentEncoding | None = None,
    batch_size: int = 32,
    backend: Backend = "auto",
    show_progress: bool = True,
) -> Run:
    """Embed the whole corpus and every judged query; each query's ``k`` nearest documents.

    ``encoding`` says how documents are read (default: as the model is configured).
    """
    return dense_search_recased(model, dataset, ["as-given"], k, encoding, batch_size, backend, show_progress)[
        "as-given"
    ]


def dense_search_recased(
    model: SentenceTransformer,
    dataset: BeirDataset,
    cases: Sequence[str],
    k: int = 1000,
    encoding: DocumentEncoding | None = None,
    batch_size: int = 32,
    backend: Backend = "auto",
    show_progress: bool = True,
) -> dict[str, Run]:
    """``dense_search`` once for each of ``cases`` (keys of ``beir.QUERY_CASES``), the queries re-typed that way.

    The corpus is embedded once. Raises ValueError for an unknown case.
    """
    recased = {case: dataset.recased(case) for case in cases}
    encoding = encoding or DocumentEncoding()
    doc_ids = list(dataset.corpus)
    query_ids = list(dataset.queries)
    documents = encode_documents(model, dataset.document_texts(doc_ids), encoding, batch_size, show_progress)
    runs = {}
    for case in cases:
        texts = [recased[case].queries[query_id] for query_id in query_ids]
        queries = encode_queries(model, texts, batch_size, show_progress)
        scores, indices = exact_search(queries, documents, k, backend=backend)
        runs[case] = {
            query_id: {doc_ids[index]: float(score) for score, index in zip(row_scores, row_indices, strict=True)}
            for query_id, row_scores, row_indices in zip(query_ids, scores, indices, strict=True)
        }
    return runs


def dense_rerank(
    model: SentenceTransformer,
    dataset: BeirDataset,
    candidates: Run,
    encoding: DocumentEncoding | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> Run:
    """Re-score each judged query's candidate documents with the model (only those documents are embedded).

    Raises:
        ValueError: a candidate document is not in the corpus.
    """
    encoding = encoding or DocumentEncoding()
    candidates = {query_id: hits for query_id, hits in candidates.items() if query_id in dataset.queries}
    unjudged = len(dataset.queries) - len(candidates)
    if unjudged:
        logger.warning("%d judged queries have no candidates in the run; they score 0", unjudged)
    doc_ids = list(dict.fromkeys(doc_id for hits in candidates.values() for doc_id in hits))
    missing = [doc_id for doc_id in doc_ids if doc_id not in dataset.corpus]
    if missing:
        raise ValueError(
            f"{len(missing)} candidate documents of the run are not in the corpus (e.g. {', '.join(missing[:3])}); "
            "was the run made on this corpus?"
        )
    if not candidates:
        return {}
    position = {doc_id: index for index, doc_id in enumerate(doc_ids)}
    query_ids = list(candidates)
    documents = encode_documents(model, dataset.document_texts(doc_ids), encoding, batch_size, show_progress)
    queries = encode_queries(model, [dataset.queries[query_id] for query_id in query_ids], batch_size, show_progress)
    check_dimensions(queries, documents)
    run: Run = {}
    for query_id, query_vector in zip(query_ids, queries, strict=True):
        hits = list(candidates[query_id])
        scores = documents.scores(query_vector[None, :], np.array([position[doc_id] for doc_id in hits]))[0]
        run[query_id] = {doc_id: float(score) for doc_id, score in zip(hits, scores, strict=True)}
    return run

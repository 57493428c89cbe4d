"""Exact maximum-inner-product search over document embeddings.

A document may own several rows (the chunks of a long document); its score is then the largest
of its rows' scores. Rows of one document are contiguous, and ``offsets`` marks where each
document's rows start: document ``i`` owns rows ``offsets[i]:offsets[i + 1]``.

Two backends give the same ranking (up to ties):

- FAISS ``knn`` (exact inner product, multi-threaded), used when faiss is installed and each
  document has one row;
- torch matmul + top-k, over blocks of queries and of documents so that the score matrix held
  at once is at most ``query_block x row_block``; used otherwise (and for chunked documents).

Both read the document vectors ``row_block`` rows at a time and convert only that block to
float32, so float16 or memory-mapped vectors (st_mamba.scale's shards) are never copied whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

try:
    import faiss
except ImportError:
    faiss = None

Backend = Literal["auto", "faiss", "torch"]
_announced: set[str] = set()


@dataclass
class DocumentEmbeddings:
    """Row vectors for a list of documents.

    Attributes:
        vectors: (R, D) float32 or float16, R >= number of documents.
        offsets: (N + 1,) int64, document ``i`` owns rows ``offsets[i]:offsets[i + 1]`` (at least one).
    """

    vectors: np.ndarray
    offsets: np.ndarray

    @classmethod
    def one_per_document(cls, vectors: np.ndarray) -> DocumentEmbeddings:
        return cls(vectors, np.arange(len(vectors) + 1, dtype=np.int64))

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"document vectors must be (rows, dim), got shape {self.vectors.shape}")
        counts = np.diff(self.offsets)
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.vectors) or (counts < 1).any():
            raise ValueError("offsets must start at 0, end at the number of rows and give every document a row")

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def one_row_each(self) -> bool:
        return len(self.vectors) == self.n_documents

    def scores(self, queries: np.ndarray, doc_indices: np.ndarray | None = None) -> np.ndarray:
        """(Q, n) scores of the documents ``doc_indices`` (all when None): the max over each one's rows."""
        doc_indices = np.arange(self.n_documents) if doc_indices is None else np.asarray(doc_indices)
        starts, ends = self.offsets[doc_indices], self.offsets[doc_indices + 1]
        rows = (
            np.concatenate([np.arange(start, end) for start, end in zip(starts, ends, strict=True)])
            if len(doc_indices)
            else []
        )
        row_scores = queries @ self.vectors[rows].T  # (Q, rows)
        if self.one_row_each or not len(doc_indices):
            return row_scores
        segment_starts = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])
        return np.maximum.reduceat(row_scores, segment_starts, axis=1)


def check_dimensions(queries: np.ndarray, documents: DocumentEmbeddings) -> None:
    if queries.ndim != 2 or queries.shape[1] != documents.vectors.shape[1]:
        raise ValueError(
            f"query embeddings have shape {tuple(queries.shape)} but document embeddings have "
            f"{documents.vectors.shape[1]} dimensions; were both made by the same model?"
        )


def _announce(backend: str, reason: str) -> None:
    if backend not in _announced:
        logger.info("exact search with %s (%s)", backend, reason)
        _announced.add(backend)


def exact_search(
    queries: np.ndarray,
    documents: DocumentEmbeddings,
    k: int,
    backend: Backend = "auto",
    query_block: int = 1024,
    row_block: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` documents of highest inner product for each query.

    Args:
        queries: (Q, D) float32.
        documents: the documents' row vectors (D columns).
        k: results per query; more than the number of documents returns them all.
        backend: "faiss", "torch", or "auto" (faiss when installed and each document has one row).
        query_block, row_block: block sizes; the torch backend holds about ``4 * query_block * row_block`` bytes of
            scores, both hold ``4 * D * row_block`` bytes of float32 document vectors at a time.

    Returns:
        scores (Q, k) float32 in descending order, and the documents' indices (Q, k) int64.
    """
    check_dimensions(queries, documents)
    k = min(k, documents.n_documents)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if backend == "faiss" and faiss is None:
        raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu")
    if backend == "faiss" and not documents.one_row_each:
        raise ValueError("the faiss backend takes one row per document; use backend='torch' for chunked documents")
    if backend == "faiss" or (backend == "auto" and faiss is not None and documents.one_row_each):
        _announce("faiss", "exact inner product")
        return _faiss_search(queries, documents.vectors, k, row_block)
    _announce("torch", "faiss not installed" if faiss is None else "chunked documents or backend='torch'")
    return _torch_search(queries, documents, k, query_block, row_block)


def _faiss_search(queries: np.ndarray, vectors: np.ndarray, k: int, row_block: int) -> tuple[np.ndarray, np.ndarray]:
    """``faiss.knn`` over blocks of ``row_block`` float32 rows, merged into the running top ``k``."""
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    best_rows = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), row_block):
        block = np.ascontiguousarray(vectors[start : start + row_block], dtype=np.float32)
        scores, rows = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_rows = np.concatenate([best_rows, rows.astype(np.int64) + start], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_rows = np.take_along_axis(merged_rows, order, axis=1)
    return best_scores, best_rows


def _document_blocks(offsets: np.ndarray, row_block: int) -> list[tuple[int, int]]:
    """Split documents into [first, last) ranges whose rows number about ``row_block`` (whole documents only)."""
    blocks, first = [], 0
    n_documents = len(offsets) - 1
    while first < n_documents:
        last = int(np.searchsorted(offsets, offsets[first] + row_block, side="right")) - 1
        last = min(max(last, first + 1), n_documents)
        blocks.append((first, last))
        first = last
    return blocks


@torch.inference_mode()
def _torch_search(
    queries: np.ndarray, documents: DocumentEmbeddings, k: int, query_block: int, row_block: int
) -> tuple[np.ndarray, np.ndarray]:
    blocks = _document_blocks(documents.offsets, row_block)
    all_scores, all_indices = [], []
    for start in range(0, len(queries), query_block):
        query_vectors = torch.from_numpy(queries[start : start + query_block])
        best_scores = torch.empty(len(query_vectors), 0)
        best_indices = torch.empty(len(query_vectors), 0, dtype=torch.long)
        for first, last in blocks:
            rows = documents.vectors[documents.offsets[first] : documents.offsets[last]]
            rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))  # a view if already float32
            scores = query_vectors @ rows.T  # (Qb, rows)
            if not documents.one_row_each:
                segment_starts = documents.offsets[first:last] - documents.offsets[first]
                scores = torch.from_numpy(np.maximum.reduceat(scores.numpy(), segment_starts, axis=1))  # (Qb, docs)
            block_scores, block_indices = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, block_scores], dim=1)
            merged_indices = torch.cat([best_indices, block_indices + first], dim=1)
            best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_indices = merged_indices.gather(1, order)
        all_scores.append(best_scores.numpy())
        all_indices.append(best_indices.numpy())
    return np.concatenate(all_scores), np.concatenate(all_indices)

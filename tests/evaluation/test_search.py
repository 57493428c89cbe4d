"""Exact search: FAISS and torch (in small blocks) against brute force, with and without chunks."""

from __future__ import annotations

import numpy as np
import pytest

from st_mamba.evaluation import DocumentEmbeddings, exact_search
from st_mamba.evaluation import search as search_module


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _brute_force(queries, documents, k):
    scores = documents.scores(queries)  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


BACKENDS = [
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(search_module.faiss is None, reason="faiss not installed")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row_per_document_matches_brute_force(backend):
    queries, documents = _random((7, 16), 0), DocumentEmbeddings.one_per_document(_random((50, 16), 1))
    scores, indices = exact_search(queries, documents, k=10, backend=backend, query_block=3, row_block=8)
    expected_scores, expected_indices = _brute_force(queries, documents, 10)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5, err_msg="scores")
    np.testing.assert_array_equal(indices, expected_indices, err_msg="indices")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_vectors_are_read_a_block_at_a_time(backend, monkeypatch):
    """float16 (as shards store them) gives the float32 ranking; no block converts more than row_block rows."""
    vectors = _random((50, 16), 5).astype(np.float16)
    queries = _random((4, 16), 6)
    converted = []
    real = np.ascontiguousarray

    def watch(array, dtype=None):
        if dtype is np.float32 and getattr(array, "dtype", None) == np.float16:
            converted.append(len(array))
        return real(array, dtype=dtype)

    monkeypatch.setattr(search_module.np, "ascontiguousarray", watch)
    scores, indices = exact_search(
        queries, DocumentEmbeddings.one_per_document(vectors), k=5, backend=backend, row_block=16
    )
    monkeypatch.undo()
    expected_scores, expected_indices = _brute_force(
        queries, DocumentEmbeddings.one_per_document(vectors.astype(np.float32)), 5
    )
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(indices, expected_indices)
    assert converted and max(converted) <= 16


def test_chunked_documents_score_their_best_chunk():
    rng = np.random.default_rng(2)
    chunks_per_document = rng.integers(1, 5, size=30)
    offsets = np.concatenate([[0], np.cumsum(chunks_per_document)])
    documents = DocumentEmbeddings(_random((int(offsets[-1]), 8), 3), offsets)
    queries = _random((5, 8), 4)
    row_scores = queries @ documents.vectors.T
    best = np.stack([row_scores[:, offsets[i] : offsets[i + 1]].max(axis=1) for i in range(30)], axis=1)
    np.testing.assert_allclose(documents.scores(queries), best, rtol=1e-6, err_msg="DocumentEmbeddings.scores")
    scores, indices = exact_search(queries, documents, k=6, query_block=2, row_block=7)  # auto picks torch
    order = np.argsort(-best, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(indices, order, err_msg="indices")
    np.testing.assert_allclose(scores, np.take_along_axis(best, order, axis=1), rtol=1e-5, err_msg="scores")


def test_scores_of_a_subset_of_documents():
    documents = DocumentEmbeddings(_random((6, 4), 5), np.array([0, 2, 3, 6]))
    queries = _random((2, 4), 6)
    np.testing.assert_allclose(
        documents.scores(queries, np.array([2, 0])), documents.scores(queries)[:, [2, 0]], rtol=1e-6
    )


def test_k_larger_than_the_corpus_returns_every_document():
    scores, indices = exact_search(_random((2, 4), 7), DocumentEmbeddings.one_per_document(_random((3, 4), 8)), k=100)
    assert scores.shape == indices.shape == (2, 3)


def test_dimension_mismatch_is_reported():
    with pytest.raises(
        ValueError, match=r"query embeddings have shape \(2, 4\) but document embeddings have 5 dimensions"
    ):
        exact_search(_random((2, 4), 9), DocumentEmbeddings.one_per_document(_random((3, 5), 10)), k=1)


def test_faiss_refuses_chunked_documents():
    documents = DocumentEmbeddings(_random((3, 4), 11), np.array([0, 2, 3]))
    if search_module.faiss is None:
        pytest.skip("faiss not installed")
    with pytest.raises(ValueError, match="one row per document"):
        exact_search(_random((1, 4), 12), documents, k=1, backend="faiss")


def test_offsets_must_give_every_document_a_row():
    with pytest.raises(ValueError, match="every document a row"):
        DocumentEmbeddings(_random((3, 4), 13), np.array([0, 2, 2, 3]))

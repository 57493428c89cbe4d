"""Dense full-corpus search and re-ranking of a run with the tiny random st-mamba model."""

from __future__ import annotations

import numpy as np
import pytest

from st_mamba.evaluation import (
    DocumentEncoding,
    dense_rerank,
    dense_search,
    encode_documents,
    encode_queries,
    load_beir,
    read_run,
)


def test_full_corpus_search_matches_brute_force(tiny_model, tiny_beir):
    dataset = load_beir(tiny_beir)
    run = dense_search(tiny_model, dataset, k=4, show_progress=False)
    assert list(run) == ["q1", "q2", "q3"] and all(len(hits) == 4 for hits in run.values())
    documents = encode_documents(tiny_model, dataset.document_texts(), show_progress=False).vectors
    queries = encode_queries(tiny_model, list(dataset.queries.values()), show_progress=False)
    doc_ids = list(dataset.corpus)
    for query_id, scores in zip(dataset.queries, queries @ documents.T, strict=True):
        expected = [doc_ids[i] for i in np.argsort(-scores)[:4]]
        assert list(run[query_id]) == expected, query_id
        np.testing.assert_allclose(list(run[query_id].values()), np.sort(scores)[::-1][:4], rtol=1e-5)


def test_chunked_search_returns_whole_documents(tiny_model, tiny_beir):
    run = dense_search(
        tiny_model, load_beir(tiny_beir), k=10, encoding=DocumentEncoding("chunk", 8), show_progress=False
    )
    assert all(sorted(hits) == sorted(load_beir(tiny_beir).corpus) for hits in run.values())


def test_rerank_scores_only_the_candidates(tiny_model, tiny_beir):
    dataset = load_beir(tiny_beir)
    candidates = read_run(tiny_beir / "runs" / "first-stage.trec")
    run = dense_rerank(tiny_model, dataset, candidates, show_progress=False)
    assert list(run) == ["q1", "q2", "q3"]  # q4 is not judged
    for query_id, hits in run.items():
        assert set(hits) == set(candidates[query_id])
        query = encode_queries(tiny_model, [dataset.queries[query_id]], show_progress=False)
        documents = encode_documents(tiny_model, dataset.document_texts(list(hits)), show_progress=False).vectors
        np.testing.assert_allclose(list(hits.values()), (query @ documents.T)[0], rtol=1e-4, atol=1e-5)


def test_rerank_refuses_candidates_outside_the_corpus(tiny_model, tiny_beir):
    with pytest.raises(ValueError, match="1 candidate documents of the run are not in the corpus"):
        dense_rerank(tiny_model, load_beir(tiny_beir), {"q1": {"mamba": 1.0, "stranger": 0.5}}, show_progress=False)

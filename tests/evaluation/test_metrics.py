"""Measures on a hand-made qrels/run whose values are worked out in the comments."""

from __future__ import annotations

import logging
import math

import pytest

from st_mamba.evaluation import evaluate, parse_measures

# q1: one relevant document, ranked second.  q2: graded; c (grade 1) first, b (grade 2) third.
QRELS = {"q1": {"a": 1, "x": 0}, "q2": {"b": 2, "c": 1}}
RUN = {"q1": {"x": 3.0, "a": 2.0, "y": 1.0}, "q2": {"c": 3.0, "z": 2.0, "b": 1.0}, "unjudged": {"a": 1.0}}

# nDCG uses the grade as the gain (trec_eval): q1 = (1/log2 3) / 1; q2 = (1 + 2/log2 4) / (2 + 1/log2 3).
NDCG_Q1 = 1 / math.log2(3)
NDCG_Q2 = (1 + 2 / 2) / (2 + 1 / math.log2(3))


def test_known_values_binary_at_grade_1():
    scores = evaluate(QRELS, RUN, ["nDCG@10", "RR@10", "R@2", "AP", "P@1"]).scores
    assert scores["nDCG@10"] == pytest.approx((NDCG_Q1 + NDCG_Q2) / 2)
    assert scores["RR@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert scores["R@2"] == pytest.approx((1 + 1 / 2) / 2)  # q2 finds c but not b in its top 2
    assert scores["AP"] == pytest.approx((1 / 2 + (1 + 2 / 3) / 2) / 2)
    assert scores["P@1"] == pytest.approx((0 + 1) / 2)


def test_min_relevance_applies_to_binary_measures_only():
    scores = evaluate(QRELS, RUN, ["nDCG@10", "RR@10", "R(rel=3)@2"], min_relevance=2).scores
    assert list(scores) == ["nDCG@10", "RR(rel=2)@10", "R(rel=3)@2"]  # an explicit rel is kept
    assert scores["nDCG@10"] == pytest.approx((NDCG_Q1 + NDCG_Q2) / 2)
    # q1 has no document of grade 2 (RR 0); q2's grade-2 document is third.
    assert scores["RR(rel=2)@10"] == pytest.approx((0 + 1 / 3) / 2)


def test_judged_query_missing_from_run_scores_zero(caplog):
    qrels = {**QRELS, "q3": {"d": 1}}
    with caplog.at_level(logging.WARNING, logger="st_mamba"):
        evaluation = evaluate(qrels, RUN, ["RR@10"])
    assert evaluation.queries == 3 and evaluation.missing_from_run == 1
    assert evaluation.scores["RR@10"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert "1 of 3 judged queries have no results in the run" in caplog.text


def test_empty_run_scores_zero():
    assert evaluate(QRELS, {}, ["nDCG@10"]).scores == {"nDCG@10": 0.0}


def test_graded_qrels_at_grade_1_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="st_mamba"):
        evaluate(QRELS, RUN, ["RR@10"])
    assert "TREC DL counts grade >= 2" in caplog.text


@pytest.mark.parametrize("name", ["Foo@10", "nDCG@ten", "RR(rel=)@10"])
def test_unknown_measure_is_named(name):
    with pytest.raises(ValueError, match=f"unknown measure {name!r}".replace("(", r"\(").replace(")", r"\)")):
        parse_measures([name])

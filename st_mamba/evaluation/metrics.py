"""Retrieval measures, computed by ir-measures (which runs trec_eval through pytrec_eval).

Measures are named in ir-measures' syntax: ``nDCG@10``, ``RR@10``, ``R@100``, ``AP``,
``P(rel=2)@5``... The defaults are BEIR's and MS MARCO's headline numbers plus MAP.

Graded judgments: nDCG uses the grades as gains. Binary measures (RR, R, AP, P) count a document
as relevant when its grade is at least ``min_relevance``; TREC DL uses 2 (trec_eval ``-l 2``).
A judged query that is missing from a run scores 0 on every measure (ir-measures' convention).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from st_mamba.evaluation.qrels import Qrels, is_graded
from st_mamba.evaluation.runs import Run

logger = logging.getLogger(__name__)

DEFAULT_MEASURES = ("nDCG@10", "RR@10", "R@100", "R@1000", "AP")


def _ir_measures():
    try:
        import ir_measures
    except ImportError:
        raise ImportError("computing measures needs ir-measures: pip install 'st-mamba[eval]'") from None
    return ir_measures


def parse_measures(names: Sequence[str] = DEFAULT_MEASURES, min_relevance: int = 1) -> list:
    """ir-measures Measure objects for ``names``, with ``rel=min_relevance`` on the binary ones.

    A measure that already names its own ``rel`` (``R(rel=3)@100``) keeps it.

    Raises:
        ValueError: a name is not a measure ir-measures knows, or is written wrongly.
    """
    ir_measures = _ir_measures()
    measures = []
    for name in names:
        try:
            measure = ir_measures.parse_measure(name)
        except (ValueError, NameError, SyntaxError) as exc:
            raise ValueError(f"unknown measure {name!r} ({exc}); write e.g. nDCG@10, RR(rel=2)@10, R@100, AP") from None
        if min_relevance != 1 and "rel" in measure.SUPPORTED_PARAMS and "rel" not in measure.params:
            measure = measure(rel=min_relevance)
        measures.append(measure)
    if not measures:
        raise ValueError("no measures asked for")
    return measures


@dataclass
class Evaluation:
    """Mean scores over the judged queries.

    Attributes:
        scores: measure name (as ir-measures prints it) -> mean over ``queries`` queries.
        queries: how many judged queries were averaged.
        missing_from_run: how many of them had no result in the run (each scored 0).
    """

    scores: dict[str, float]
    queries: int
    missing_from_run: int


def evaluate(qrels: Qrels, run: Run, measures: Sequence[str] = DEFAULT_MEASURES, min_relevance: int = 1) -> Evaluation:
    """Score ``run`` against ``qrels`` (every judged query counts; results for unjudged queries are ignored)."""
    parsed = parse_measures(measures, min_relevance)
    if (
        is_graded(qrels)
        and min_relevance == 1
        and any("rel" in m.SUPPORTED_PARAMS and "rel" not in m.params for m in parsed)
    ):
        logger.warning(
            "the judgments are graded (up to %d) and binary measures count grade >= 1 as relevant; "
            "TREC DL counts grade >= 2 (min_relevance=2)",
            max(grade for judged in qrels.values() for grade in judged.values()),
        )
    missing = sum(1 for query_id in qrels if not run.get(query_id))
    if missing:
        logger.warning("%d of %d judged queries have no results in the run; they score 0", missing, len(qrels))
    judged_run = {query_id: hits for query_id, hits in run.items() if query_id in qrels and hits}
    aggregate = _ir_measures().calc_aggregate(parsed, qrels, judged_run)
    scores = {str(measure): float(aggregate.get(measure, 0.0)) for measure in parsed}
    return Evaluation(scores, queries=len(qrels), missing_from_run=missing)

"""training/make_qmsum_train_folder.py: a train folder of the chosen meetings, and never a test meeting."""

from __future__ import annotations

import json

import pytest

from st_mamba.evaluation import load_beir
from tests.training.conftest import load_recipe

SPLITS = {"m-train-1": "train", "m-train-2": "train", "m-val": "val", "m-test": "test"}


@pytest.fixture()
def qmsum(tmp_path):
    """A miniature of ../shared/data/qmsum: four meetings, a summary and a question for each."""
    source = tmp_path / "qmsum"
    (source / "qrels").mkdir(parents=True)
    rows = [{"_id": meeting, "title": "", "text": f"A: transcript of {meeting}"} for meeting in SPLITS]
    queries = [
        {"_id": f"{kind}-{meeting}-0", "text": f"{kind} of {meeting}"} for meeting in SPLITS for kind in ("sum", "spec")
    ]
    (source / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (source / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    (source / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q['_id']}\t{q['_id'].split('-', 1)[1][:-2]}\t1\n" for q in queries)
    )
    (source / "meeting_splits.tsv").write_text(
        "meeting-id\tqmsum-split\n" + "".join(f"{m}\t{s}\n" for m, s in SPLITS.items())
    )
    return source


def test_train_meetings_and_their_summaries_only(qmsum, tmp_path):
    make = load_recipe("make_qmsum_train_folder").make_folder
    counts = make(qmsum, tmp_path / "out", {"train"}, ["summary"])
    assert counts == {"meetings": 2, "queries": 2, "judgments": 2}
    dataset = load_beir(tmp_path / "out", "train")
    assert set(dataset.corpus) == {"m-train-1", "m-train-2"}
    assert dataset.qrels == {"sum-m-train-1-0": {"m-train-1": 1}, "sum-m-train-2-0": {"m-train-2": 1}}


def test_val_and_questions_on_request_and_the_test_split_refused(qmsum, tmp_path):
    make = load_recipe("make_qmsum_train_folder").make_folder
    counts = make(qmsum, tmp_path / "out", {"train", "val"}, ["summary", "specific"])
    assert counts == {"meetings": 3, "queries": 6, "judgments": 6}
    text = "".join(path.read_text() for path in (tmp_path / "out").rglob("*.*") if path.is_file())
    assert "m-test" not in text
    with pytest.raises(ValueError, match="test meetings"):
        make(qmsum, tmp_path / "again", {"train", "test"}, ["summary"])

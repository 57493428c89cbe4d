"""A BEIR folder for training on QMSum's train meetings: summary (and optionally question) -> meeting.

QMSum (../shared/data/qmsum) is published as one BEIR folder: 232 meetings, every query judged in
``qrels/test.tsv``, and ``meeting_splits.tsv`` giving each meeting's original split (162 train, 35 val,
35 test). ``train_long_documents.py --data`` needs ``qrels/train.tsv``: this writes a folder holding the
meetings of ``--splits`` (default: train), their queries and ``qrels/train.tsv``. No test meeting and
no query of one is ever written, so the test meetings stay unseen for evaluation.

    python training/make_qmsum_train_folder.py --output .qmsum-train
    python training/train_long_documents.py --model models/st-mamba-distilled --data .qmsum-train ...
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

QUERY_SETS = {"summary": "sum-", "specific": "spec-"}  # query id prefixes in QMSum's queries.jsonl


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def make_folder(source: Path, output: Path, splits: set[str], query_sets: list[str]) -> dict[str, int]:
    """Write corpus.jsonl, queries.jsonl and qrels/train.tsv of the meetings in ``splits``; return counts."""
    if "test" in splits:
        raise ValueError("the test meetings are QMSum's evaluation set; train on train and/or val")
    with open(source / "meeting_splits.tsv", encoding="utf-8") as rows:
        split_of = {row["meeting-id"]: row["qmsum-split"] for row in csv.DictReader(rows, delimiter="\t")}
    meetings = [row for row in read_jsonl(source / "corpus.jsonl") if split_of.get(row["_id"]) in splits]
    kept = {row["_id"] for row in meetings}
    prefixes = tuple(QUERY_SETS[name] for name in query_sets)
    with open(source / "qrels" / "test.tsv", encoding="utf-8") as rows:
        judgments = [row for row in csv.DictReader(rows, delimiter="\t") if row["corpus-id"] in kept]
    judgments = [row for row in judgments if row["query-id"].startswith(prefixes)]
    judged = {row["query-id"] for row in judgments}
    queries = [row for row in read_jsonl(source / "queries.jsonl") if row["_id"] in judged]

    (output / "qrels").mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus.jsonl", meetings), ("queries.jsonl", queries)):
        with open(output / name, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(output / "qrels" / "train.tsv", "w", encoding="utf-8") as out:
        out.write("query-id\tcorpus-id\tscore\n")
        out.writelines(f"{row['query-id']}\t{row['corpus-id']}\t{row['score']}\n" for row in judgments)
    return {"meetings": len(meetings), "queries": len(queries), "judgments": len(judgments)}


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=repo.parent / "shared" / "data" / "qmsum")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--splits", nargs="+", default=["train"], choices=["train", "val"])
    parser.add_argument("--queries", nargs="+", default=["summary"], choices=sorted(QUERY_SETS))
    args = parser.parse_args()
    counts = make_folder(args.source, args.output, set(args.splits), args.queries)
    print(f"{args.output}: {counts['meetings']} meetings, {counts['queries']} queries, {counts['judgments']} judgments")


if __name__ == "__main__":
    main()

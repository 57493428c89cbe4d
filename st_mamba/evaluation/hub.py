"""Benchmarks that live on the Hugging Face Hub: BEIR data sets (MS MARCO dev among them), LoCoV1, MTEB.

The BEIR and LoCoV1 loaders download once and write a local BEIR folder, so that every
evaluation then runs through the same code on local files (and can be repeated offline).
MTEB tasks are run by the ``mteb`` package itself (an optional install).

Without network (or with ``HF_HUB_OFFLINE=1``) each raises HubUnavailableError, saying what it
tried to fetch and how to run on a local copy instead.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer

BEIR_ORGANISATION = "BeIR"
LOCO_DOCUMENTS = "hazyresearch/LoCoV1-Documents"
LOCO_QUERIES = "hazyresearch/LoCoV1-Queries"


class HubUnavailableError(RuntimeError):
    """A download from the Hugging Face Hub failed (no network, offline mode, or no such repository)."""


def _unavailable(what: str, exc: Exception) -> HubUnavailableError:
    return HubUnavailableError(
        f"could not download {what} from the Hugging Face Hub ({type(exc).__name__}: {exc}). Without network "
        "(or with HF_HUB_OFFLINE=1) copy the data set from a machine that has it and pass its folder with --data"
    )


def _hub_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset"))
    except Exception as exc:  # offline mode, no network, missing repository or file: all end here
        raise _unavailable(f"{repo_id}/{filename}", exc) from exc


def download_beir(name: str, destination: str | Path, splits: Sequence[str] = ("test",)) -> Path:
    """Download the BEIR data set ``name`` (e.g. ``scifact``, ``msmarco``) into a local BEIR folder.

    Files come from the Hub repositories ``BeIR/<name>`` (``corpus.jsonl.gz``, ``queries.jsonl.gz``)
    and ``BeIR/<name>-qrels`` (``<split>.tsv``). The gzipped files are kept as they are; the loader
    reads them.
    """
    destination = Path(destination)
    (destination / "qrels").mkdir(parents=True, exist_ok=True)
    for filename in ("corpus.jsonl.gz", "queries.jsonl.gz"):
        shutil.copyfile(_hub_file(f"{BEIR_ORGANISATION}/{name}", filename), destination / filename)
    for split in splits:
        shutil.copyfile(
            _hub_file(f"{BEIR_ORGANISATION}/{name}-qrels", f"{split}.tsv"), destination / "qrels" / f"{split}.tsv"
        )
    return destination


def download_msmarco_dev(destination: str | Path) -> Path:
    """MS MARCO passage, dev split (6,980 queries, 8.8M passages): BEIR's copy."""
    return download_beir("msmarco", destination, splits=("dev",))


def _load_hub_dataset(repo_id: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"loading {repo_id} needs the datasets package: pip install datasets") from None
    try:
        return datasets.load_dataset(repo_id, split="test")
    except Exception as exc:  # offline mode, no network, missing repository: all end here
        raise _unavailable(repo_id, exc) from exc


def download_loco(task: str, destination: str | Path) -> Path:
    """Write LoCoV1 task ``task`` (e.g. ``qmsum``, ``summ_screen_fd``) as a BEIR folder, split ``test``.

    LoCoV1 documents have ``pid``, ``passage`` and ``dataset`` (the task); queries have ``qid``,
    ``query``, ``answer_pids`` and ``dataset``. Each answer pid is a relevant document (grade 1).
    """
    documents = _load_hub_dataset(LOCO_DOCUMENTS)
    queries = _load_hub_dataset(LOCO_QUERIES)
    task_documents = [row for row in documents if row["dataset"] == task]
    if not task_documents:
        tasks = sorted({row["dataset"] for row in documents})
        raise ValueError(f"LoCoV1 has no task {task!r}; its tasks are: {', '.join(tasks)}")
    task_queries = [row for row in queries if row["dataset"] == task]
    destination = Path(destination)
    (destination / "qrels").mkdir(parents=True, exist_ok=True)
    with open(destination / "corpus.jsonl", "w", encoding="utf-8") as out:
        for row in task_documents:
            out.write(json.dumps({"_id": str(row["pid"]), "title": "", "text": row["passage"]}) + "\n")
    with open(destination / "queries.jsonl", "w", encoding="utf-8") as out:
        for row in task_queries:
            out.write(json.dumps({"_id": str(row["qid"]), "text": row["query"]}) + "\n")
    with open(destination / "qrels" / "test.tsv", "w", encoding="utf-8") as out:
        out.write("query-id\tcorpus-id\tscore\n")
        for row in task_queries:
            for pid in row["answer_pids"]:
                out.write(f"{row['qid']}\t{pid}\t1\n")
    return destination


def run_mteb(model: SentenceTransformer, task_names: Sequence[str]) -> list[dict[str, Any]]:
    """Run MTEB tasks (e.g. ``SciFact``, ``NFCorpus``) with the ``mteb`` package (version 2 or later).

    Returns:
        one entry per task and split: ``task``, ``split``, ``main_score`` (nDCG@10 for retrieval)
        and ``scores`` (every number MTEB reports for that split, first subset).
    """
    try:
        import mteb
    except ImportError:
        raise ImportError("MTEB tasks need the mteb package: pip install 'mteb>=2'") from None
    if not hasattr(mteb, "evaluate"):
        raise ImportError(f"mteb {getattr(mteb, '__version__', '?')} is too old: pip install -U 'mteb>=2'")
    tasks = mteb.get_tasks(tasks=list(task_names))
    try:
        results = mteb.evaluate(model, tasks=tasks)
    except (ConnectionError, OSError) as exc:
        raise _unavailable(f"the MTEB data of {', '.join(task_names)}", exc) from exc
    rows = []
    for task_result in results.task_results:
        for split, subsets in task_result.scores.items():
            scores = subsets[0]
            rows.append(
                {"task": task_result.task_name, "split": split, "main_score": scores["main_score"], "scores": scores}
            )
    return rows

"""Evaluation runs on SciFact, TREC DL 2019 and QMSum, encoding speed, scoring (ir-measures), BM25, the plot."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from st_mamba.evaluation.beir import BeirDataset, load_beir
from st_mamba.evaluation.encoding import DocumentEncoding, encode_documents
from st_mamba.evaluation.metrics import evaluate as evaluate_run
from st_mamba.evaluation.retrieval import dense_search
from training.distill import settings
from training.distill.data import teacher_targets
from training.distill.train import _synchronize

logger = logging.getLogger("distill")


def qmsum_test(folder: Path, split: str) -> BeirDataset:
    return load_beir(folder, split)


def evaluate_all(models: dict[str, SentenceTransformer], data_dir: Path, deadline: float) -> dict:
    """Runs (top 100) on SciFact test (also with its queries re-cased: ``RECASED``), TREC DL 2019 pooled,
    QMSum test meetings; scored later by ``score``."""
    runs: dict[str, dict] = {}
    scifact = load_beir(data_dir / "scifact", "test")
    sets = {"scifact": scifact, "trec-dl-2019": load_beir(data_dir / "trec-dl-2019", "test")}
    sets.update({f"scifact-{case}": scifact.recased(case) for case in settings.RECASED})
    for name, dataset in sets.items():
        for label, model in models.items():
            if time.time() > deadline:
                return runs
            started = time.perf_counter()
            runs[f"{name}/{label}"] = dense_search(
                model, dataset, k=100, batch_size=settings.EVAL_BATCH[label.split(":")[0]], show_progress=False
            )
            logger.info("%s/%s: %.1f s", name, label, time.perf_counter() - started)
    readings = {"teacher": ["model", "chunk:254:mean"], "mamba": ["one-pass"], "transformer": ["model"]}
    for split in ("summary", "specific"):
        dataset = qmsum_test(data_dir / "qmsum-test", split)
        for label, model in models.items():
            for reading in readings[label]:
                if time.time() > deadline:
                    return runs
                batch = 4 if reading == "one-pass" else settings.EVAL_BATCH[label]
                runs[f"qmsum-{split}/{label}:{reading}"] = dense_search(
                    model,
                    dataset,
                    k=100,
                    encoding=DocumentEncoding.parse(reading),
                    batch_size=batch,
                    show_progress=False,
                )
    return runs


def fixed_length_texts(tokenizer, source: list[str], tokens: int, count: int) -> list[str]:
    """``count`` texts of exactly ``tokens`` GPT-NeoX tokens, cut from the concatenated ``source`` texts."""
    ids = tokenizer("\n\n".join(source), add_special_tokens=False)["input_ids"]
    while len(ids) < tokens * count:
        ids = ids + ids
    return [tokenizer.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(count)]


def encoding_speed(
    models: dict[str, SentenceTransformer], texts_by_length: dict[int, list[str]], device: str
) -> list[dict]:
    """Texts per second and GPT-NeoX tokens per second; the teacher reads in 256-token windows (chunk-mean)."""
    rows = []
    for length, texts in texts_by_length.items():
        for label, model in models.items():
            if label == "transformer" and length > settings.TRANSFORMER["max_position_embeddings"]:
                continue
            if label == "teacher":
                encoding, batch = DocumentEncoding.parse("chunk:254:mean"), 256
            else:
                encoding, batch = DocumentEncoding("one-pass" if label == "mamba" else "model"), max(1, 32768 // length)
            # warm-up on the same texts: the same batch shapes, so no kernel compile or CUDA graph capture is timed
            encode_documents(model, texts, encoding, batch, show_progress=False)
            _synchronize(device)
            started = time.perf_counter()
            encode_documents(model, texts, encoding, batch, show_progress=False)
            _synchronize(device)
            seconds = time.perf_counter() - started
            where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
            rows.append({"device": where, "tokens": length, "model": label, "texts": len(texts),
                         "texts_per_second": round(len(texts) / seconds, 2),
                         "tokens_per_second": round(len(texts) * length / seconds)})  # fmt: skip
            logger.info("%s", rows[-1])
    return rows


def score(results: dict, data_dir: Path) -> dict[str, dict]:
    """nDCG@10 and recall of every run in ``results``, with the st_mamba.evaluation harness (ir-measures)."""
    from st_mamba.evaluation.metrics import evaluate

    qrels = {
        "scifact": load_beir(data_dir / "scifact", "test").qrels,
        "trec-dl-2019": load_beir(data_dir / "trec-dl-2019", "test").qrels,
        "qmsum-summary": load_beir(data_dir / "qmsum-test", "summary").qrels,
        "qmsum-specific": load_beir(data_dir / "qmsum-test", "specific").qrels,
    }
    qrels.update({f"scifact-{case}": qrels["scifact"] for case in settings.RECASED})
    scores = {}
    for name, run in results.get("runs", {}).items():
        dataset = name.split("/")[0]
        min_relevance = 2 if dataset == "trec-dl-2019" else 1
        measures = ("nDCG@10", "R@100") if dataset != "qmsum-summary" else ("nDCG@10", "RR@10", "R@10")
        scores[name] = evaluate(qrels[dataset], run, measures, min_relevance=min_relevance).scores
    return scores


# (label, run of the collection, reading of the Mamba student, of the teacher, of BM25, of the Transformer
# control) for ``plot_scores``
PLOTTED = [("SciFact", "scifact", "mamba", "teacher", "bm25", "transformer"),
           ("SciFact, queries\nin capitals", "scifact-upper", "mamba", "teacher", None, "transformer"),
           ("TREC DL 2019", "trec-dl-2019", "mamba", "teacher", "bm25-run", "transformer"),
           ("QMSum\nsummary -> meeting", "qmsum-summary", "mamba:one-pass", "teacher:chunk:254:mean", None,
            "transformer:model"),
           ("QMSum\nquestion -> meeting", "qmsum-specific", "mamba:one-pass", "teacher:chunk:254:mean", None,
            "transformer:model")]  # fmt: skip


def plot_scores(scores: dict[str, dict], path: Path) -> list[str]:
    """Bars of nDCG@10 per collection: the Mamba student, the Transformer control where the run trained one,
    the teacher (QMSum: mean over its windows), BM25. Returns the names of the series drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(name: str | None) -> float:
        return scores.get(name, {}).get("nDCG@10", float("nan")) if name else float("nan")

    labels = [label for label, *_ in PLOTTED]
    bars = {"st-mamba student": [value(f"{run}/{mamba}") for _, run, mamba, *_ in PLOTTED],
            "Transformer student (control)": [value(f"{run}/{control}") for _, run, *_, control in PLOTTED],
            "teacher all-MiniLM-L6-v2": [value(f"{run}/{teacher}") for _, run, _, teacher, *_ in PLOTTED],
            "BM25": [value(bm25 and f"{run}/{bm25}") for _, run, _, _, bm25, _ in PLOTTED]}  # fmt: skip
    bars = {name: heights for name, heights in bars.items() if any(h == h for h in heights)}  # NaN != NaN
    figure, axes = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(bars)
    for offset, (name, heights) in enumerate(bars.items()):
        positions = [index + (offset - (len(bars) - 1) / 2) * width for index in range(len(labels))]
        drawn = axes.bar(positions, heights, width, label=name)
        axes.bar_label(drawn, fmt="%.3f", fontsize=7)
    axes.set_xticks(range(len(labels)), labels, fontsize=8)
    axes.set_ylabel("nDCG@10 (zero-shot)")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return list(bars)


def bm25_run_scores(data_dir: Path, run_file: Path) -> dict[str, dict]:
    """The published BM25 run of TREC DL 2019 (ranked over the whole MS MARCO collection) on its judgments."""
    from st_mamba.evaluation.metrics import evaluate
    from st_mamba.evaluation.runs import read_run

    qrels = load_beir(data_dir / "trec-dl-2019", "test").qrels
    return {"trec-dl-2019/bm25-run": evaluate(qrels, read_run(run_file), ("nDCG@10", "R@100"), min_relevance=2).scores}


def bm25_scores(data_dir: Path) -> dict[str, dict]:
    from st_mamba.evaluation.bm25 import bm25_search
    from st_mamba.evaluation.metrics import evaluate

    out = {}
    for name, split, min_relevance in (("scifact", "test", 1), ("trec-dl-2019", "test", 2)):
        dataset = load_beir(data_dir / name, split)
        out[f"{name}/bm25"] = evaluate(dataset.qrels, bm25_search(dataset, k=100, show_progress=False), ("nDCG@10", "R@100"),
                                       min_relevance=min_relevance).scores  # fmt: skip
    return out


def teacher_on_qmsum(teacher: SentenceTransformer, data_dir: Path) -> dict[str, dict]:
    """The teacher on the QMSum test meetings, truncated to its 256-token window and as the mean over windows."""
    from st_mamba.evaluation.metrics import evaluate

    out = {}
    for split in ("summary", "specific"):
        dataset = load_beir(data_dir / "qmsum-test", split)
        measures = ("nDCG@10", "RR@10", "R@10") if split == "summary" else ("nDCG@10", "R@100")
        for reading in ("model", "chunk:254:mean"):
            run = dense_search(
                teacher, dataset, k=100, encoding=DocumentEncoding.parse(reading), batch_size=32, show_progress=False
            )
            out[f"qmsum-{split}/teacher:{reading}"] = evaluate(dataset.qrels, run, measures).scores
    return out


def teacher_agreement(
    student: SentenceTransformer, teacher: SentenceTransformer, data_dir: Path, documents: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Mean cosine between the student's embedding and its training target (the teacher's, over windows)
    on the evaluation collections' test queries and a seeded sample of ``documents`` of each corpus.

    Set beside the held-out cosine on training texts, it tells how far the distillation carries to text
    the student never read: a gap is a matter of the training texts, no gap one of the student.
    """
    out: dict[str, dict[str, float]] = {}
    for name in ("scifact", "trec-dl-2019"):
        dataset = load_beir(data_dir / name, "test")
        ids = sorted(dataset.corpus)
        random.Random(seed).shuffle(ids)
        texts = {"queries": list(dataset.queries.values()), "documents": dataset.document_texts(ids[:documents])}
        out[name] = {}
        for kind, items in texts.items():
            targets = teacher_targets(teacher, items, batch_size=64)
            embedded = student.encode(items, batch_size=32, convert_to_tensor=True, normalize_embeddings=True)
            out[name][kind] = round(float((embedded.float().cpu() * targets).sum(-1).mean()), 4)
            logger.info("%s %s (%d texts): cosine %.4f", name, kind, len(items), out[name][kind])
    return out


def crossed_sides(
    student: SentenceTransformer, teacher: SentenceTransformer, data_dir: Path, k: int = 100
) -> dict[str, dict[str, float]]:
    """nDCG@10 on SciFact and TREC DL 2019 with the queries embedded by one model and the documents by the
    other, for all four pairings (the student is trained into the teacher's space, so the pairs are comparable).

    Where the student's documents cost more than its queries, text like the documents is what its training
    lacks, and the other way round.
    """
    out: dict[str, dict[str, float]] = {}
    models = {"student": student, "teacher": teacher}
    for name in ("scifact", "trec-dl-2019"):
        dataset = load_beir(data_dir / name, "test")
        doc_ids, query_ids = list(dataset.corpus), list(dataset.queries)
        vectors = {label: (model.encode([dataset.queries[q] for q in query_ids], batch_size=32, convert_to_tensor=True,
                                        normalize_embeddings=True).float().cpu(),
                           model.encode(dataset.document_texts(doc_ids), batch_size=32, convert_to_tensor=True,
                                        normalize_embeddings=True).float().cpu())
                   for label, model in models.items()}  # fmt: skip
        out[name] = {}
        for query_side in models:
            for document_side in models:
                top = (vectors[query_side][0] @ vectors[document_side][1].T).topk(min(k, len(doc_ids)), dim=1)
                run = {query_id: {doc_ids[j]: float(v) for v, j in zip(values.tolist(), indices.tolist(), strict=True)}
                       for query_id, values, indices in zip(query_ids, top.values, top.indices, strict=True)}  # fmt: skip
                score = evaluate_run(dataset.qrels, run, ["nDCG@10"]).scores["nDCG@10"]
                out[name][f"{query_side} queries, {document_side} documents"] = round(score, 4)
                logger.info("%s: %s queries, %s documents: nDCG@10 %.4f", name, query_side, document_side, score)
    return out


# Ways the Mamba student may read a text (``MambaEncoder``'s normalize_whitespace, add_prefix_space).
READINGS = {
    "as given": {"normalize_whitespace": False, "add_prefix_space": False},
    "whitespace normalised": {"normalize_whitespace": True, "add_prefix_space": False},
    "a space before": {"normalize_whitespace": False, "add_prefix_space": True},
    "both": {"normalize_whitespace": True, "add_prefix_space": True},
}


def reading_agreement(
    student: SentenceTransformer, teacher: SentenceTransformer, texts: list[str], kinds: list[str]
) -> dict[str, dict[str, float]]:
    """Mean cosine between the student's embedding and the teacher's target, per kind of text and over all, for
    each of ``READINGS``, with the texts as they are and with every space doubled (a careless input)."""
    targets = teacher_targets(teacher, texts, batch_size=64)
    encoder, saved = student[0], {key: getattr(student[0], key) for key in READINGS["both"]}
    out: dict[str, dict[str, float]] = {}
    try:
        for label, reading in READINGS.items():
            for name, given in ((label, texts), (f"{label}, spaces doubled", [t.replace(" ", "  ") for t in texts])):
                for key, value in reading.items():
                    setattr(encoder, key, value)
                embedded = student.encode(given, batch_size=32, convert_to_tensor=True, normalize_embeddings=True)
                cosines = (embedded.float().cpu() * targets).sum(-1)
                out[name] = {
                    kind: round(float(cosines[[k == kind for k in kinds]].mean()), 4) for kind in sorted(set(kinds))
                }
                out[name]["all"] = round(float(cosines.mean()), 4)
                logger.info("%s: %s", name, out[name])
    finally:
        for key, value in saved.items():
            setattr(encoder, key, value)
    return out

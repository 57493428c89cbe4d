"""Train a Mamba Retriever on long documents: LoCoV1 from the Hub, or a local BEIR folder with a train split.

Mamba reads a text in linear time, so documents of 2K, 8K or 32K tokens fit one embedding
(``--max-seq-length``); the paper fine-tunes on long documents to extend the model beyond its
pre-training length. Long texts make large batches expensive, so the loss is the cached InfoNCE
(``CachedMultipleNegativesRankingLoss``, GradCache): the batch's in-batch negatives are all used, but
only ``--mini-batch-size`` texts go through the model at a time; with gradient checkpointing, memory then
grows with one mini-batch, not with the batch.

Data:
- ``--dataset locov1`` (default): hazyresearch/LoCoV1-Queries and -Documents (12 tasks, `--tasks` picks
  some). LoCoV1 is published as one split only, so the recipe holds out ``--eval-fraction`` of each
  task's queries (a seeded, query-disjoint split) for evaluation and trains on the rest. Scores on
  those held-out queries are therefore *not* LoCoV1 benchmark scores of an unseen-task model.
- ``--data FOLDER``: any BEIR folder with ``qrels/train.tsv`` (evaluated on dev.tsv or test.tsv).

Evaluation: nDCG@10 of the held-out queries, each task against its own documents (as in LoCo).

    python training/train_long_documents.py --backbone state-spaces/mamba-130m-hf --max-seq-length 2048 \\
        --output mamba-retriever-130m-2k
    python training/train_long_documents.py --model mamba-retriever-130m --max-seq-length 8192 \\
        --mini-batch-size 2 --output mamba-retriever-130m-8k
    torchrun --nproc_per_node 8 training/train_long_documents.py --max-seq-length 32768 --mini-batch-size 1 ...
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import _common
from datasets import Dataset, load_dataset
from sentence_transformers import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.evaluation import SequentialEvaluator

logger = logging.getLogger(__name__)

BACKBONE = "state-spaces/mamba-130m-hf"  # pretrained on 2K-token texts; or a retriever from train_msmarco.py (--model)
LOCO_QUERIES = "hazyresearch/LoCoV1-Queries"  # qid, query, answer_pids, dataset (= task)
LOCO_DOCUMENTS = "hazyresearch/LoCoV1-Documents"  # pid, passage, dataset
MAX_SEQ_LENGTH = 2048  # tokens per text, EOS included; 8192 and 32768 for the longer settings
EPOCHS = 1
LEARNING_RATE = 1e-5  # peak, after a linear warm-up over 10% of the steps, then linear decay
BATCH_SIZE = 32  # queries per process and step: each query's positive is a negative for the 31 others
MINI_BATCH_SIZE = 4  # texts per forward pass of the cached loss (0: plain MultipleNegativesRankingLoss)
EVAL_FRACTION = 0.1  # LoCoV1: share of each task's queries held out for evaluation
EVAL_STEPS = 200
SAVE_STEPS = 200
SEED = 12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_model_arguments(parser, backbone=BACKBONE)
    parser.add_argument("--max-seq-length", type=int, default=MAX_SEQ_LENGTH, help="tokens per text")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--dataset", choices=["locov1"], default="locov1", help="LoCoV1 from the Hub")
    data.add_argument("--data", type=Path, default=None, help="local BEIR folder with qrels/train.tsv instead")
    parser.add_argument("--tasks", nargs="+", default=None, help="LoCoV1 tasks to use (default: all 12)")
    parser.add_argument("--eval-fraction", type=float, default=EVAL_FRACTION)
    parser.add_argument(
        "--eval-split", default=None, help="--data: qrels split to evaluate on (default: dev, else test)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=8)
    _common.add_training_arguments(
        parser, epochs=EPOCHS, batch_size=BATCH_SIZE, mini_batch_size=MINI_BATCH_SIZE, lr=LEARNING_RATE,
        eval_steps=EVAL_STEPS, save_steps=SAVE_STEPS, logging_steps=10, seed=SEED,
    )  # fmt: skip
    return parser.parse_args(argv)


def load_locov1(
    tasks: list[str] | None, eval_fraction: float, seed: int
) -> tuple[list[tuple[str, str]], dict[str, _common.Retrieval]]:
    """Training pairs of LoCoV1, and for each task the held-out queries with that task's documents."""
    task_queries, task_corpus = {}, {}
    for row in load_dataset(LOCO_QUERIES, split="test"):
        task_queries.setdefault(row["dataset"], []).append(row)
    for row in load_dataset(LOCO_DOCUMENTS, split="test"):
        task_corpus.setdefault(row["dataset"], {})[row["pid"]] = row["passage"]
    pairs, held_out = [], {}
    for task in sorted(task_queries) if tasks is None else tasks:
        if task not in task_queries or task not in task_corpus:
            raise ValueError(f"LoCoV1 has no task {task!r}; it has {sorted(task_queries)}")
        rows, corpus = sorted(task_queries[task], key=lambda row: row["qid"]), task_corpus[task]
        random.Random(seed).shuffle(rows)
        n_eval = round(len(rows) * eval_fraction)
        for row in rows[n_eval:]:
            pairs.extend((row["query"], corpus[pid]) for pid in row["answer_pids"] if pid in corpus)
        eval_rows = [row for row in rows[:n_eval] if any(pid in corpus for pid in row["answer_pids"])]
        if eval_rows:
            held_out[task] = (
                corpus,
                {row["qid"]: row["query"] for row in eval_rows},
                {row["qid"]: {pid for pid in row["answer_pids"] if pid in corpus} for row in eval_rows},
            )
    return pairs, held_out


def main(argv: list[str] | None = None) -> SentenceTransformerTrainer:
    args = parse_args(argv)

    # 1. Load the model, reading up to --max-seq-length tokens per text
    model = _common.load_retriever(args, MAX_SEQ_LENGTH)
    model.model_card_data.model_name = (
        f"{args.output.name}: Mamba Retriever for documents of up to {args.max_seq_length} tokens"
    )

    # 2. Load the data: (query, long document) pairs, and held-out queries for evaluation
    if args.data is not None:
        pairs = _common.relevant_pairs(_common.read_beir(args.data, "train"))
        eval_split = _common.evaluation_split(args.data, args.eval_split)
        held_out = {args.data.name: _common.read_beir(args.data, eval_split)} if eval_split else {}
    else:
        pairs, held_out = load_locov1(args.tasks, args.eval_fraction, args.seed)
    train_dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "document": [d for _, d in pairs]})
    logger.info("Training on %d pairs; evaluating on %s", len(train_dataset), sorted(held_out))

    # 3. Define the loss: cached InfoNCE, so that a large batch of long documents fits in memory
    loss = _common.infonce_loss(model, args.mini_batch_size)

    # 4. Define the evaluator: each task's held-out queries against that task's documents
    evaluator = None
    if held_out:
        evaluators = [
            _common.retrieval_evaluator(name, retrieval, args.eval_batch_size)
            for name, retrieval in sorted(held_out.items())
        ]
        evaluator = SequentialEvaluator(evaluators, main_score_function=lambda scores: sum(scores) / len(scores))

    # 5. Train: no duplicate texts in a batch (they would be false negatives), resumable checkpoints; then
    #    evaluate the trained model and save it with its model card
    return _common.train(args, model, train_dataset, loss, evaluator)


if __name__ == "__main__":
    _common.configure_logging()
    main()

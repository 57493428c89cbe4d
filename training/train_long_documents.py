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
import csv
import json
import logging
import os
import random
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator, SequentialEvaluator
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.training_args import BatchSamplers

import st_mamba

logger = logging.getLogger(__name__)

BACKBONE = "state-spaces/mamba-130m-hf"  # pretrained on 2K-token texts; or a retriever from train_msmarco.py (--model)
LOCO_QUERIES = "hazyresearch/LoCoV1-Queries"  # qid, query, answer_pids, dataset (= task)
LOCO_DOCUMENTS = "hazyresearch/LoCoV1-Documents"  # pid, passage, dataset
PROMPTS = {"query": "query: ", "document": "passage: "}
MAX_SEQ_LENGTH = 2048  # tokens per text, EOS included; 8192 and 32768 for the longer settings
EPOCHS = 1
LEARNING_RATE = 1e-5  # peak, after a linear warm-up, then linear decay
WARMUP_RATIO = 0.1
BATCH_SIZE = 32  # queries per process and step: each query's positive is a negative for the 31 others
MINI_BATCH_SIZE = 4  # texts per forward pass of the cached loss (0: plain MultipleNegativesRankingLoss)
SCALE = 20.0  # InfoNCE inverse temperature: logits are 20 * cosine
EVAL_FRACTION = 0.1  # LoCoV1: share of each task's queries held out for evaluation
EVAL_STEPS = 200
SAVE_STEPS = 200
SEED = 12

Retrieval = tuple[dict[str, str], dict[str, str], dict[str, set[str]]]  # corpus, queries, relevant doc ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--backbone", default=BACKBONE, help="Mamba LM (Hub id or folder) to make into a retriever")
    base.add_argument("--model", default=None, help="existing Sentence-Transformers model to train further instead")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--dataset", choices=["locov1"], default="locov1", help="LoCoV1 from the Hub")
    data.add_argument("--data", type=Path, default=None, help="local BEIR folder with qrels/train.tsv instead")
    parser.add_argument("--tasks", nargs="+", default=None, help="LoCoV1 tasks to use (default: all 12)")
    parser.add_argument("--eval-fraction", type=float, default=EVAL_FRACTION)
    parser.add_argument(
        "--eval-split", default=None, help="--data: qrels split to evaluate on (default: dev, else test)"
    )
    parser.add_argument("--output", type=Path, required=True, help="folder of the trained model")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="default: <output>-checkpoints")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="resume from the last checkpoint in --checkpoint-dir, or from the one given",
    )
    parser.add_argument("--max-seq-length", type=int, default=MAX_SEQ_LENGTH)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="read texts longer than this in chunks carrying the state (constant-memory inference)",
    )
    parser.add_argument("--query-prompt", default=PROMPTS["query"])
    parser.add_argument("--document-prompt", default=PROMPTS["document"])
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--mini-batch-size", type=int, default=MINI_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--eval-steps", type=int, default=EVAL_STEPS, help="0: evaluate only at the end")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=SAVE_STEPS)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on where a CUDA GPU supports it)",
    )
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--report-to", default="none", help="e.g. wandb, tensorboard")
    parser.add_argument("--seed", type=int, default=SEED)
    return parser.parse_args(argv)


def load_locov1(tasks: list[str] | None, eval_fraction: float, seed: int) -> tuple[list[tuple[str, str]], dict]:
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


def read_beir(folder: Path, split: str) -> Retrieval:
    """The corpus (id -> "title text"), the queries (id -> text) and one split's relevant documents (score > 0)."""
    corpus, queries, relevant = {}, {}, {}
    with open(folder / "corpus.jsonl", encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)
            corpus[str(doc["_id"])] = f"{doc.get('title') or ''} {doc['text']}".strip()
    with open(folder / "queries.jsonl", encoding="utf-8") as lines:
        for line in lines:
            query = json.loads(line)
            queries[str(query["_id"])] = query["text"]
    with open(folder / "qrels" / f"{split}.tsv", encoding="utf-8", newline="") as rows:
        for row in csv.DictReader(rows, delimiter="\t"):
            if int(float(row["score"])) > 0:
                relevant.setdefault(row["query-id"], set()).add(row["corpus-id"])
    return corpus, queries, relevant


def main(argv: list[str] | None = None) -> SentenceTransformerTrainer:
    args = parse_args(argv)
    checkpoint_dir = args.checkpoint_dir or args.output.with_name(args.output.name + "-checkpoints")
    bf16 = args.bf16 if args.bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    # 1. Load the model, reading up to --max-seq-length tokens per text
    if args.model is not None:
        model = SentenceTransformer(args.model, trust_remote_code=True)
        model.max_seq_length = args.max_seq_length
    else:
        prompts = {"query": args.query_prompt, "document": args.document_prompt}
        model = st_mamba.from_backbone(args.backbone, max_seq_length=args.max_seq_length, prompts=prompts)
    if args.chunk_size is not None:
        model[0].chunk_size = args.chunk_size
    if args.gradient_checkpointing:
        # Enabled here rather than with TrainingArguments(gradient_checkpointing=True): transformers 5.17's
        # Trainer passes `every_n_layers` to SentenceTransformer.gradient_checkpointing_enable (ST 6.0.1),
        # which does not accept it.
        model.gradient_checkpointing_enable()
    model.model_card_data.model_name = (
        f"{args.output.name}: Mamba Retriever for documents of up to {args.max_seq_length} tokens"
    )

    # 2. Load the data: (query, long document) pairs, and held-out queries for evaluation
    if args.data is not None:
        corpus, queries, relevant = read_beir(args.data, "train")
        pairs = [(queries[qid], corpus[doc_id]) for qid, doc_ids in relevant.items() for doc_id in sorted(doc_ids)]
        eval_split = args.eval_split or next(
            (s for s in ("dev", "test") if (args.data / "qrels" / f"{s}.tsv").is_file()), None
        )
        held_out = {args.data.name: read_beir(args.data, eval_split)} if eval_split else {}
    else:
        pairs, held_out = load_locov1(args.tasks, args.eval_fraction, args.seed)
    train_dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "document": [d for _, d in pairs]})
    logger.info("Training on %d pairs; evaluating on %s", len(train_dataset), sorted(held_out))

    # 3. Define the loss: cached InfoNCE, so that a large batch of long documents fits in memory
    gather = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.mini_batch_size:
        loss = CachedMultipleNegativesRankingLoss(
            model, scale=SCALE, mini_batch_size=args.mini_batch_size, gather_across_devices=gather
        )
    else:
        loss = MultipleNegativesRankingLoss(model, scale=SCALE, gather_across_devices=gather)

    # 4. Define the evaluator: each task's held-out queries against that task's documents
    evaluators = [
        InformationRetrievalEvaluator(
            queries=task_queries,
            corpus=corpus,
            relevant_docs=relevant,
            name=name,
            batch_size=args.eval_batch_size,
        )
        for name, (corpus, task_queries, relevant) in sorted(held_out.items())
    ]
    evaluator = SequentialEvaluator(evaluators, main_score_function=lambda scores: sum(scores) / len(scores))

    # 5. Train: no duplicate texts in a batch (they would be false in-batch negatives), resumable checkpoints
    column_prompts = {"query": model.prompts.get("query"), "document": model.prompts.get("document")}
    column_prompts = {column: prompt for column, prompt in column_prompts.items() if prompt}
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=WARMUP_RATIO,
        bf16=bf16,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts=column_prompts or None,
        dataloader_drop_last=gather,  # gathering needs equal batch sizes on every process
        # st-mamba: packed batches (inference only) are pinned by MambaEncoder itself; left off here as run on the H200
        dataloader_pin_memory=torch.cuda.is_available() and not isinstance(model[0], st_mamba.MambaEncoder),
        use_cpu=gather and not torch.cuda.is_available(),  # several CPU processes: DDP over gloo
        eval_strategy="steps" if evaluators and args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        run_name=args.output.name,
        seed=args.seed,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        loss=loss,
        evaluator=evaluator if evaluators else None,
    )
    trainer.train(resume_from_checkpoint=args.resume)

    # 6. Evaluate the trained model and save it (with its model card)
    if trainer.is_world_process_zero():
        if evaluators:
            logger.info("After training: %s", evaluator(model))
        model.save(str(args.output))
        logger.info("Saved the model to %s", args.output)
    # Under DDP every process waits for the saving one, then all leave the process group together:
    # a process that exits while another still holds the gloo group can abort (seen once in CI).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return trainer


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main()

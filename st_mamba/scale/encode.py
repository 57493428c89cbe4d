"""Sharded, resumable corpus encoding on one machine: one process, or one process per device.

    from st_mamba.scale import encode_corpus
    encode_corpus("scifact/corpus.jsonl", "models/st-mamba", "scifact-shards", shard_size=10_000,
                  devices=["cuda:0", "cuda:1"])      # several devices: Sentence-Transformers' process pool

The corpus is read once to plan the shards (and to report bad lines before any encoding), then shard
by shard: each shard's documents are encoded in one ``encode_document`` call and written atomically
(``st_mamba.scale.shards``). Run the same call again after a crash and it picks up at the first
missing shard; a different model, corpus, dtype or shard size refuses to resume (``ResumeError``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from st_mamba.scale.corpus import Corpus, Document, OnBadLine, ShardSpec, plan_shards
from st_mamba.scale.shards import (
    Manifest,
    check_resumable,
    finished_shards,
    job_identity,
    remove_temporary_files,
    write_manifest,
    write_shard,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


def describe_model(model: SentenceTransformer, name: str, prompt: str | None) -> dict[str, Any]:
    """The model's part of a job's identity: its name, a hash of its weights, and what shapes its input."""
    digest = hashlib.blake2b(digest_size=16)
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "name": name,
        "weights_blake2b": digest.hexdigest(),
        "document_prompt": document_prompt(model, prompt),
        "max_seq_length": model.max_seq_length,
    }


def document_prompt(model: SentenceTransformer, prompt: str | None) -> str | None:
    """The prompt ``encode_document`` prepends: ``prompt`` if given, else the model's saved document prompt."""
    if prompt is not None:
        return prompt
    saved = next((name for name in ("document", "passage", "corpus") if name in model.prompts), None)
    return model.prompts[saved] if saved else None


def model_name(model: str | os.PathLike | SentenceTransformer) -> str:
    """A folder as its absolute path, a Hub id as is, an in-memory model by its class."""
    if isinstance(model, str | os.PathLike):
        path = Path(model).expanduser()
        return str(path.resolve()) if path.is_dir() else str(model)
    return f"(in-memory {type(model).__name__})"


def open_job(
    corpus: Corpus, folder: Path, job: dict[str, Any], shard_size: int, progress: bool
) -> tuple[Manifest, list[ShardSpec]]:
    """Start or resume the job in ``folder``: returns its manifest and the shards still to encode."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(folder)
    manifest = check_resumable(folder, job)
    if manifest is None:
        shards, skipped = plan_shards(corpus, shard_size, progress=progress)
        manifest = Manifest(job, shards, skipped)
        write_manifest(folder, manifest)
    done = finished_shards(folder)
    todo = [shard for shard in manifest.shards if shard.number not in done]
    if done:
        logger.info("resuming %s: %d of %d shards already written", folder, len(done), len(manifest.shards))
    return manifest, todo


def pool_chunk_size(documents: int, processes: int, batch_size: int) -> int:
    """Texts per task of the process pool for one shard: about four tasks per process, at least a full batch.

    Sentence-Transformers' own default (a tenth of a process's share) suits one large call; on a
    shard of a few thousand texts it would hand GPUs tasks smaller than one batch.
    """
    return max(batch_size, math.ceil(documents / (4 * processes)))


def read_shard_documents(corpus: Corpus, shard: ShardSpec) -> list[Document]:
    """The documents of one planned shard, checked against the plan."""
    documents = list(corpus.documents(shard.start, shard.stop, shard.first_line))
    if len(documents) != shard.documents:
        raise RuntimeError(
            f"shard {shard.number} of {corpus.path} has {len(documents)} documents, the plan says {shard.documents}: "
            "the corpus changed while it was being encoded"
        )
    return documents


def encode_corpus(
    corpus: str | os.PathLike | Corpus,
    model: str | os.PathLike | SentenceTransformer,
    output: str | os.PathLike,
    shard_size: int = 10_000,
    dtype: str = "float16",
    batch_size: int = 32,
    devices: Sequence[str] | None = None,
    prompt: str | None = None,
    on_bad_line: OnBadLine = "fail",
    progress: bool = True,
) -> Manifest:
    """Encode every document of ``corpus`` into shards of ``shard_size`` embeddings under ``output``.

    Args:
        corpus: a .jsonl / .parquet file or a BEIR folder (see ``st_mamba.scale.corpus``), or a ``Corpus``.
        model: a SentenceTransformer, or a folder / Hub id to load one from.
        output: the shard folder; created, or resumed if it holds shards of this same job.
        dtype: "float16" (half the disk, ample for unit vectors) or "float32".
        devices: one device ("cuda:0", "cpu") for this process, or several for Sentence-Transformers'
            multi-process pool (one process per entry: ``["cuda:0", "cuda:1"]``, ``["cpu"] * 4``).
            None: the model's device.
        prompt: instead of the model's saved document prompt.
        on_bad_line: "fail" at a line without id or text, or "skip" it (counted in the manifest).

    Returns:
        The manifest; ``st_mamba.scale.load_shards(output)`` reads the embeddings back.
    """
    from tqdm.auto import tqdm

    from st_mamba.loading import load_model

    if not isinstance(corpus, Corpus):
        corpus = Corpus.open(corpus, on_bad_line)
    name = model_name(model)
    several = devices is not None and len(devices) > 1
    if isinstance(model, str | os.PathLike):
        model = load_model(model, device="cpu" if several else devices[0] if devices else None)
    elif devices and not several:
        model.to(devices[0])
    job = job_identity(describe_model(model, name, prompt), model.get_embedding_dimension(), dtype, shard_size,
                       corpus.fingerprint())  # fmt: skip
    folder = Path(output)
    manifest, todo = open_job(corpus, folder, job, shard_size, progress)
    remaining = sum(shard.documents for shard in todo)
    pool = model.start_multi_process_pool(list(devices)) if several and todo else None
    try:
        with tqdm(total=manifest.documents, initial=manifest.documents - remaining, unit="doc", desc="Encoding",
                  disable=not progress, smoothing=0.1) as bar:  # fmt: skip
            for shard in todo:
                documents = read_shard_documents(corpus, shard)
                embeddings = model.encode_document(
                    [document.text for document in documents], prompt=prompt, batch_size=batch_size,
                    convert_to_numpy=True, show_progress_bar=False, pool=pool,
                    chunk_size=pool_chunk_size(len(documents), len(devices), batch_size) if pool else None,
                )  # fmt: skip
                write_shard(folder, shard.number, [d.id for d in documents], embeddings,
                            [d.position for d in documents], dtype)  # fmt: skip
                bar.update(len(documents))
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    return manifest

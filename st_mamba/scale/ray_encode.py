"""The same sharded encoding on a Ray cluster, with Ray Data: one model actor per GPU (or per CPU slot).

    import ray
    from st_mamba.scale import encode_corpus_ray
    ray.init()  # or ray.init(address="auto") on a node of a running cluster
    encode_corpus_ray("/shared/corpus.jsonl", "/shared/models/st-mamba", "/shared/shards",
                      workers=16, gpus_per_worker=1)

The driver plans the shards exactly as ``encode_corpus`` does and writes the manifest; Ray Data then
streams the *descriptions* of the unfinished shards (number, byte or row range) through
``map_batches`` to a pool of ``workers`` actors (``ActorPoolStrategy``), each holding one copy of the model. An actor reads
its shard's documents from the corpus, encodes them and writes the shard file itself (atomically),
so the output is the same folder, file for file, as ``encode_corpus`` writes, and resumes the same
way. On a cluster, the corpus, the model folder and the output folder must be on storage that every
node sees at the same path (NFS, a mounted bucket, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from st_mamba.scale.corpus import Corpus, OnBadLine, ShardSpec
from st_mamba.scale.encode import describe_model, model_name, open_job, read_shard_documents
from st_mamba.scale.shards import Manifest, job_identity, write_shard


def ray_module():
    """Import Ray with Ray Data, or say how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 (Ray Data is a separate extra of ray)
    except ImportError:
        raise ImportError("encoding on Ray needs Ray Data: pip install 'st-mamba[scale]' (or 'ray[data]')") from None
    return ray


class ShardEncoder:
    """A Ray Data actor: loads the model once, then encodes and writes the shards of each batch it gets."""

    def __init__(
        self,
        model: str,
        corpus: Corpus,
        output: str,
        dtype: str,
        batch_size: int,
        prompt: str | None,
    ) -> None:
        import torch

        from st_mamba.loading import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray shows an actor only the GPUs it was given
        self.model = load_model(model, device=device)
        self.corpus, self.output, self.dtype = corpus, Path(output), dtype
        self.batch_size, self.prompt = batch_size, prompt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = []
        for values in zip(*(batch[name] for name in _SHARD_FIELDS), strict=True):
            shard = ShardSpec(*map(int, values))
            documents = read_shard_documents(self.corpus, shard)
            embeddings = self.model.encode_document(
                [document.text for document in documents], prompt=self.prompt, batch_size=self.batch_size,
                convert_to_numpy=True, show_progress_bar=False,
            )  # fmt: skip
            write_shard(self.output, shard.number, [d.id for d in documents], embeddings,
                        [d.position for d in documents], self.dtype)  # fmt: skip
            written.append(len(documents))
        return {"number": batch["number"], "documents": np.asarray(written, dtype=np.int64)}


_SHARD_FIELDS = ("number", "start", "stop", "documents", "first_line")  # ShardSpec's fields, in order


def encode_corpus_ray(
    corpus: str | os.PathLike | Corpus,
    model: str | os.PathLike,
    output: str | os.PathLike,
    shard_size: int = 10_000,
    dtype: str = "float16",
    batch_size: int = 32,
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    prompt: str | None = None,
    on_bad_line: OnBadLine = "fail",
    progress: bool = True,
) -> Manifest:
    """``encode_corpus`` on the Ray cluster this process is connected to (``ray.init()`` first, else a local one).

    Args:
        model: a folder or Hub id that every node can load (save an in-memory model first).
        workers: model actors; one per GPU with ``gpus_per_worker=1``.
        gpus_per_worker / cpus_per_worker: what Ray reserves for each actor (an actor on CPU uses
            ``cpus_per_worker`` threads).
        Other arguments as in ``encode_corpus``; the output folder is the same.
    """
    from tqdm.auto import tqdm

    from st_mamba.loading import load_model

    ray = ray_module()
    if not isinstance(corpus, Corpus):
        corpus = Corpus.open(corpus, on_bad_line)
    name = model_name(model)
    # The driver loads the model on CPU too: its weights' hash and dimension identify the job.
    local = load_model(model, device="cpu")
    job = job_identity(describe_model(local, name, prompt), local.get_embedding_dimension(), dtype, shard_size,
                       corpus.fingerprint())  # fmt: skip
    folder = Path(output).resolve()
    manifest, todo = open_job(corpus, folder, job, shard_size, progress)
    if not todo:
        return manifest
    items = [{field: getattr(shard, field) for field in _SHARD_FIELDS} for shard in todo]
    # One block per shard, so that every actor gets shards to encode, not only the first.
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEncoder,
        fn_constructor_kwargs=dict(
            model=name, corpus=corpus, output=str(folder), dtype=dtype, batch_size=batch_size, prompt=prompt
        ),
        batch_size=1,  # one shard per call: a shard is already thousands of documents
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus_per_worker,
        num_cpus=cpus_per_worker,
    )
    remaining = sum(shard.documents for shard in todo)
    with tqdm(total=manifest.documents, initial=manifest.documents - remaining, unit="doc", desc="Encoding (Ray)",
              disable=not progress, smoothing=0.1) as bar:  # fmt: skip
        for row in results.iter_rows():
            bar.update(int(row["documents"]))
    return manifest

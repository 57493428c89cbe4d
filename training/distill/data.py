"""The training data: the corpus, a held-out draw, GPT-NeoX ids, the teacher's targets, batches and their collation."""

from __future__ import annotations

import json
import lzma
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from st_mamba.module import prepare_texts
from training.distill import settings


def read_jsonl_xz(path: Path) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def split_held_out(records: list[dict], count: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training texts and of ``count`` held-out texts (a seeded random draw)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    count = min(count, len(records) // 10)
    return sorted(order[count:]), sorted(order[:count])


def teacher_targets(
    teacher: SentenceTransformer,
    texts: list[str],
    batch_size: int = 256,
    window: int | None = None,
    dim: int | None = None,
) -> torch.Tensor:
    """(N, dim) float32: each text's mean teacher embedding over windows of its word pieces, renormalised.

    ``window`` (default ``TEACHER_WINDOW``) and ``dim`` (default ``TEACHER_DIM``): the teacher's tokens a window, its
    special tokens included, and its embedding's width.
    Each text is tokenised once and cut into consecutive windows of ``window - 2`` word pieces;
    a window's ids, between the tokenizer's special tokens, go to the teacher as they are (no decoding and
    re-encoding of pieces: that second tokenisation was most of the time). An empty text is one empty window.
    The windows' unit vectors are averaged with weights ``TARGET_WINDOW_WEIGHTS``: 1 each, or their word pieces.
    """
    tokenizer = teacher.tokenizer
    prefix, suffix = _special_tokens(tokenizer)
    size = (window or settings.TEACHER_WINDOW) - 2
    if teacher.max_seq_length is not None and size + len(prefix) + len(suffix) > teacher.max_seq_length:
        raise ValueError(f"a window of {size} word pieces and {len(prefix) + len(suffix)} special tokens is longer "
                         f"than the teacher's max_seq_length ({teacher.max_seq_length})")  # fmt: skip
    windows: list[list[int]] = []
    owner: list[int] = []
    for index, row in enumerate(tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                          return_token_type_ids=False, verbose=False)["input_ids"]):  # fmt: skip
        for start in range(0, max(len(row), 1), size):
            windows.append(prefix + row[start : start + size] + suffix)
            owner.append(index)
    lengths = np.array([len(window) for window in windows], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first: little padding, and memory peaks at once
    extra = {key: value for key, value in teacher.preprocess([""]).items() if not isinstance(value, torch.Tensor)}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vectors = torch.empty(len(windows), dim or settings.TEACHER_DIM, device=teacher.device)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = int(lengths[rows[0]])
            columns = np.arange(width)
            input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
            input_ids[columns < lengths[rows, None]] = np.concatenate([windows[i] for i in rows])
            features = {"input_ids": torch.from_numpy(input_ids),
                        "attention_mask": torch.from_numpy((columns < lengths[rows, None]).astype(np.int64))}  # fmt: skip
            features = {key: value.to(teacher.device) for key, value in features.items()} | extra
            embedded = teacher(features)["sentence_embedding"]
            vectors[torch.from_numpy(rows).to(teacher.device)] = F.normalize(embedded.float(), dim=-1)
    if settings.TARGET_WINDOW_WEIGHTS == "tokens":
        pieces = torch.from_numpy(lengths - len(prefix) - len(suffix)).clamp_(min=1)
        vectors *= pieces.to(vectors.device, torch.float32)[:, None]
    elif settings.TARGET_WINDOW_WEIGHTS != "equal":
        raise ValueError(f"TARGET_WINDOW_WEIGHTS must be 'equal' or 'tokens', not {settings.TARGET_WINDOW_WEIGHTS!r}")
    owner_t = torch.tensor(owner, device=vectors.device)
    sums = torch.zeros(len(texts), vectors.shape[1], device=vectors.device).index_add_(0, owner_t, vectors)
    return F.normalize(sums, dim=-1).cpu()


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's own (BERT: [CLS] and [SEP]; none for GPT-NeoX)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"cannot find the text's ids {plain} among {full}: unknown special-token layout")


def tokenize(
    tokenizer, texts: list[str], limit: int, reading: dict | None = None, batch: int = 20000
) -> list[np.ndarray]:
    """GPT-NeoX ids of each text as a ``MambaEncoder`` with the settings ``reading`` reads it (``prepare_text``'s
    keyword arguments: lower case, whitespace, a space before; none by default), without EOS, cut to ``limit`` tokens."""
    ids: list[np.ndarray] = []
    for start in range(0, len(texts), batch):
        chunk = prepare_texts(texts[start : start + batch], **(reading or {}))
        encoded = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False)
        ids += [np.asarray(row[:limit], dtype=np.int32) for row in encoded["input_ids"]]
    return ids


def token_counts(ids: list[np.ndarray], indices: list[int], vocab_size: int) -> np.ndarray:
    """(vocab_size,) how often each token occurs in the texts ``indices``, each text's appended EOS included."""
    counts = np.bincount(np.concatenate([ids[i] for i in indices] or [np.zeros(0, np.int32)]), minlength=vocab_size)
    counts[settings.EOS_ID] += len(indices)
    return counts[:vocab_size]


def max_batch_texts() -> int:
    """Most texts in one batch: one per ``TOKENS_PER_TEXT`` of the batch's padded tokens."""
    return max(1, settings.MAX_BATCH_TOKENS // settings.TOKENS_PER_TEXT)


def make_batches(lengths: np.ndarray, indices: list[int], seed: int, epoch: int) -> list[list[int]]:
    """One epoch of batches: shuffle, sort pools of texts by length, cut by padded tokens and count, shuffle batches."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(indices)
    rng.shuffle(order)
    max_texts = max_batch_texts()
    pool_size = settings.POOL_BATCHES * max_texts
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start : start + pool_size], key=lambda i: lengths[i])
        batch: list[int] = []
        longest = 0
        for index in pool:
            longest_if_added = max(longest, int(lengths[index]))
            if batch and (longest_if_added * (len(batch) + 1) > settings.MAX_BATCH_TOKENS or len(batch) >= max_texts):
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

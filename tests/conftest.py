"""Shared fixtures: a tiny byte-level tokenizer and tiny random Mamba models, all built in the test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the socket guard (pyproject addopts) is the hard stop

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GPT_NEOX_DIR = SHARED / "assets" / "gpt-neox-20b"

CORPUS = [
    "State space models read a sequence left to right and keep a fixed-size state.",
    "Mamba makes the step size, B and C depend on the current token.",
    "Dense retrieval encodes queries and documents into vectors and ranks by cosine similarity.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?,.;:'\"()[]{}",
    "Ünïcödé, emoji 🙂 and tabs\tand\nnewlines are bytes like any other.",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 400-token byte-level BPE tokenizer with ``<|endoftext|>`` = 0, saved like a Hub checkpoint's."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def tiny_config(version: int = 1, vocab_size: int = 400, **overrides):
    from st_mamba import MambaConfig

    if version == 1:
        values = dict(d_model=32, n_layer=2, vocab_size=vocab_size, d_state=8, dt_rank=4)
    else:
        values = dict(d_model=32, n_layer=2, vocab_size=vocab_size, version=2, d_state=8, headdim=16)
    values.update(overrides)
    return MambaConfig(**values)


@pytest.fixture(params=[1, 2], ids=["mamba1", "mamba2"])
def tiny_model(request, tokenizer_dir):
    """A random tiny st-mamba SentenceTransformer (Mamba-1 and Mamba-2)."""
    from st_mamba import from_config

    torch.manual_seed(0)
    return from_config(
        tiny_config(request.param), tokenizer_dir, seed=0, max_seq_length=256,
        prompts={"query": "query: ", "document": "passage: "}, device="cpu",
    )  # fmt: skip


def random_texts(n: int, seed: int, max_words: int = 60) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    words = " ".join(CORPUS).split()
    texts = []
    for _ in range(n):
        count = int(torch.randint(1, max_words, (1,), generator=generator))
        picks = torch.randint(0, len(words), (count,), generator=generator)
        texts.append(" ".join(words[i] for i in picks))
    return texts

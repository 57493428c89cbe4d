"""Builders that return a ready ``SentenceTransformer``: MambaEncoder followed by Normalize."""

from __future__ import annotations

import os

from sentence_transformers import SentenceTransformer, SentenceTransformerModelCardData
from sentence_transformers.base.modules import Normalize

from st_mamba.checkpoints import GPT_NEOX_TOKENIZER, load_backbone
from st_mamba.config import MambaConfig
from st_mamba.modeling import MambaBackbone
from st_mamba.module import MambaEncoder, load_tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _assemble(
    encoder: MambaEncoder, prompts: dict[str, str] | None, device: str | None, base_model: str | None
) -> SentenceTransformer:
    card = SentenceTransformerModelCardData(base_model=base_model) if base_model else None
    return SentenceTransformer(
        modules=[encoder, Normalize()],
        prompts=prompts,
        device=device,
        similarity_fn_name="cosine",
        model_card_data=card,
    )


def from_backbone(
    name_or_path: str | os.PathLike,
    max_seq_length: int | None = 512,
    prompts: dict[str, str] | None = None,
    tokenizer_name_or_path: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    pooling: str = "eos",
    do_lower_case: bool = False,
    normalize_whitespace: bool = False,
    add_prefix_space: bool = False,
    device: str | None = None,
    revision: str | None = None,
    token: bool | str | None = None,
    cache_folder: str | None = None,
    local_files_only: bool = False,
) -> SentenceTransformer:
    """A SentenceTransformer (MambaEncoder + Normalize) from a Mamba language-model checkpoint.

    Args:
        name_or_path: local folder or Hub id of a transformers-format or mamba_ssm-format
            checkpoint, Mamba-1 or Mamba-2 (e.g. ``state-spaces/mamba-370m-hf``).
        max_seq_length: most tokens per text, EOS included (None: no limit).
        prompts: e.g. ``{"query": "query: ", "document": "passage: "}`` for ``encode_query`` /
            ``encode_document``.
        tokenizer_name_or_path: tokenizer to use when the checkpoint has none (mamba_ssm format);
            defaults to the checkpoint's own, else ``EleutherAI/gpt-neox-20b``.
        chunk_size: read texts longer than this in chunks carrying the state (constant memory).
        pooling: ``"eos"`` (the hidden state at the appended EOS, as in the paper), ``"mean"`` or
            ``"weighted-mean"`` (see ``MambaEncoder``).
        do_lower_case: lower-case texts before tokenising (saved with the model; see ``MambaEncoder``).
        normalize_whitespace, add_prefix_space: how texts are read before tokenising (saved with the model;
            see ``MambaEncoder``).
        device: where to put the model ("cpu", "cuda", ...); ST picks one if None.
    """
    backbone, folder = load_backbone(
        name_or_path, revision=revision, token=token, cache_folder=cache_folder, local_files_only=local_files_only
    )
    if tokenizer_name_or_path is None:
        has_own = any((folder / f).is_file() for f in _TOKENIZER_FILES)
        tokenizer_name_or_path = folder if has_own else GPT_NEOX_TOKENIZER
    tokenizer = load_tokenizer(tokenizer_name_or_path, backbone.config.eos_token_id)
    encoder = MambaEncoder(backbone, tokenizer, max_seq_length, chunk_size, pooling, do_lower_case,
                           normalize_whitespace=normalize_whitespace, add_prefix_space=add_prefix_space)  # fmt: skip
    base = str(name_or_path) if not os.path.isdir(name_or_path) else None
    return _assemble(encoder, prompts, device, base)


def from_config(
    config: MambaConfig,
    tokenizer_name_or_path: str | os.PathLike,
    max_seq_length: int | None = 512,
    prompts: dict[str, str] | None = None,
    chunk_size: int | None = None,
    pooling: str = "eos",
    do_lower_case: bool = False,
    normalize_whitespace: bool = False,
    add_prefix_space: bool = False,
    seed: int | None = None,
    device: str | None = None,
) -> SentenceTransformer:
    """A randomly initialised st-mamba SentenceTransformer (for training from scratch and for tests)."""
    backbone = MambaBackbone(config).reset_parameters(seed)
    tokenizer = load_tokenizer(tokenizer_name_or_path, config.eos_token_id)
    encoder = MambaEncoder(backbone, tokenizer, max_seq_length, chunk_size, pooling, do_lower_case,
                           normalize_whitespace=normalize_whitespace, add_prefix_space=add_prefix_space)  # fmt: skip
    return _assemble(encoder, prompts, device, None)


__all__ = ["from_backbone", "from_config"]

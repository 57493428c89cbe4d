"""MambaEncoder: the Sentence-Transformers input module that turns a Mamba backbone into an embedder.

As in Mamba Retriever (Zhang et al., 2024): ``<EOS>`` is appended to every text, the backbone reads
the text left to right, and the final hidden state at ``<EOS>`` is the text's embedding (the
pipeline's ``Normalize`` module then makes ``model.similarity`` a cosine). ``pooling="mean"``
averages the hidden states of the text's tokens and its EOS instead (an option for models
trained from scratch; docs/distillation.md compares the two there), and ``pooling="weighted-mean"``
weighs each token by a learned weight of its vocabulary entry (as SIF and Model2Vec weigh frequent
words down).

Texts are right-padded with EOS under the attention mask. For a causal model right padding is
exact: no position before a text's EOS can see the padding after it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers.base.modules import InputModule
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from st_mamba import ops
from st_mamba.checkpoints import CheckpointError, load_backbone, resolve_folder, save_backbone
from st_mamba.config import MambaConfig
from st_mamba.cuda_graphs import CudaGraphs, graphs_apply, graphs_enabled
from st_mamba.modeling import LayerState, MambaBackbone
from st_mamba.staging import PinnedStaging

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_TINY = torch.finfo(torch.float32).tiny  # floor of a text's summed pooling weights (each is > 0)


class TokenizerNotFoundError(CheckpointError):
    """The checkpoint folder has no tokenizer and none was named."""


def load_tokenizer(name_or_path: str | os.PathLike, eos_token_id: int = 0) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a folder or Hub id, making sure it knows its EOS token."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise TokenizerNotFoundError(
            f"no tokenizer in {path} (looked for {', '.join(_TOKENIZER_FILES)}). mamba_ssm checkpoints do not ship "
            "one: pass tokenizer_name_or_path='EleutherAI/gpt-neox-20b' or a local folder holding its tokenizer.json"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else str(name_or_path))
    except Exception as exc:
        raise TokenizerNotFoundError(f"could not load a tokenizer from {str(name_or_path)!r}: {exc}") from exc
    if tokenizer.eos_token_id is None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)
    # We truncate ourselves (to max_seq_length - 1, then EOS): silence the tokenizer's own length warning.
    tokenizer.model_max_length = int(1e30)
    return tokenizer


# ``prepare_text``: the characters that break a line (str.splitlines' breaks), and a table that makes each of them
# "\n". Python's whitespace (``str.split()``, ``str.strip()``, ``str.isspace()``) is the same set of characters as
# the regular expression ``\s``.
_LINE_BREAK = re.compile(r"[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_BREAKS_TO_NEWLINE = str.maketrans(dict.fromkeys("\r\v\f\x1c\x1d\x1e\x85\u2028\u2029", "\n"))


def _fold_whitespace(text: str) -> str:
    """Each run of whitespace as one line break if it holds one, else as one space; none at the ends.

    In linear time and without a Python call per run: the text's lines, each with its runs folded to one space,
    joined by one line break, the lines left empty dropped (those are the whitespace between two breaks of one run).
    """
    if _LINE_BREAK.search(text) is None:
        return " ".join(text.split())
    lines = (" ".join(line.split()) for line in text.translate(_BREAKS_TO_NEWLINE).split("\n"))
    return "\n".join(line for line in lines if line)


def prepare_text(
    text: str, do_lower_case: bool = False, normalize_whitespace: bool = False, add_prefix_space: bool = False
) -> str:
    """What a ``MambaEncoder`` with these settings hands its tokenizer of ``text``: lower-cased
    (``do_lower_case``); each run of whitespace as one line break if it holds one, else one space, the ends
    dropped (``normalize_whitespace``); a space before a non-empty text (``add_prefix_space``)."""
    if do_lower_case:
        text = text.lower()
    if normalize_whitespace:
        text = _fold_whitespace(text)
    if add_prefix_space and text and not text[0].isspace():
        text = " " + text
    return text


def prepare_texts(texts: Sequence[str], **reading: bool) -> list[str]:
    """``prepare_text`` of each text with the settings ``reading``; the texts as they are where none is on."""
    if not any(reading.values()):
        return list(texts)
    return [prepare_text(text, **reading) for text in texts]


class MambaEncoder(InputModule):
    """Mamba backbone + EOS (or mean) pooling, as a Sentence-Transformers input module.

    Args:
        backbone: the Mamba (or Mamba-2) backbone.
        tokenizer: its tokenizer (GPT-NeoX-20B for the state-spaces checkpoints).
        max_seq_length: most tokens per text, EOS included; longer texts are truncated before the
            EOS is appended. None keeps every token.
        chunk_size: if set, batches longer than this many tokens are read in chunks of this size,
            each chunk starting from the SSM and convolution states the previous one left, so that
            activation memory stays constant however long the text. The embedding equals the
            one-pass embedding. ``token_embeddings`` are then not returned.
        pooling: ``"eos"`` (the paper's: the hidden state at EOS), ``"mean"`` (over the text's
            tokens and its EOS) or ``"weighted-mean"`` (the same tokens, token ``i`` weighing
            ``exp(token_log_weights[i])``; the weights start equal and are learned, and are saved in
            ``token_weights.safetensors``).
        do_lower_case: lower-case every text (prompt included) before tokenising, as an uncased
            model does. GPT-NeoX's tokenizer is cased: without this, "PAIN" and "pain" are different
            tokens, and a model trained on lower-case text reads capitals as unseen tokens.
        normalize_whitespace: read every run of whitespace as one line break if it holds one, else as
            one space, and drop whitespace at both ends. GPT-NeoX's tokenizer keeps whitespace: without
            this, "a  b" (two spaces) and "a b" are different tokens. Line breaks stay, since a model
            trained on text as it is written reads them as structure (turns of a transcript, lines).
        add_prefix_space: put a space before every non-empty text (after the prompt and the other
            settings), so that its first word is read as the same token as anywhere else in a text
            (" pain", not "pain"), as GPT-2-style tokenizers' ``add_prefix_space`` does.
        cuda_graphs: on a CUDA GPU, run packed inference batches of up to 16,384 tokens and 256 texts as
            replays of CUDA graphs captured per size bucket (``st_mamba/cuda_graphs.py``), batches of one
            text included (they are then packed too). On by default; ``ST_MAMBA_CUDA_GRAPHS=0`` (or ``1``)
            overrides the setting. No effect on CPU.
    """

    config_file_name = "st_mamba_config.json"
    config_keys = [
        "max_seq_length", "chunk_size", "pooling", "do_lower_case", "normalize_whitespace", "add_prefix_space",
        "cuda_graphs",
    ]  # fmt: skip
    poolings = ("eos", "mean", "weighted-mean")
    weights_file_name = "token_weights.safetensors"

    def __init__(
        self,
        backbone: MambaBackbone,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_length: int | None = 512,
        chunk_size: int | None = None,
        pooling: str = "eos",
        do_lower_case: bool = False,
        cuda_graphs: bool = True,
        normalize_whitespace: bool = False,
        add_prefix_space: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in self.poolings:
            raise ValueError(f"pooling must be one of {self.poolings}, got {pooling!r}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.chunk_size = chunk_size
        self.pooling = pooling
        self.do_lower_case = do_lower_case
        self.normalize_whitespace = normalize_whitespace
        self.add_prefix_space = add_prefix_space
        self.eos_token_id = tokenizer.eos_token_id
        self._staging = PinnedStaging()
        self._graphs = CudaGraphs()
        self.cuda_graphs = cuda_graphs
        if pooling == "weighted-mean":
            table = backbone.embeddings.weight
            self.token_log_weights = nn.Parameter(torch.zeros(table.shape[0], device=table.device))  # (V,)

    @property
    def max_seq_length(self) -> int | None:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"max_seq_length must be a positive int or None, got {value!r}")
        self._max_seq_length = value

    @property
    def chunk_size(self) -> int | None:
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {value!r}")
        self._chunk_size = value

    @property
    def cuda_graphs(self) -> bool:
        return self._cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {value!r}")
        self._cuda_graphs = value
        if not value:
            self._graphs.clear()  # frees their memory

    def _graphs_on(self) -> bool:
        """The ``cuda_graphs`` setting, unless ``ST_MAMBA_CUDA_GRAPHS`` overrides it."""
        return graphs_enabled(self.cuda_graphs)

    @property
    def config(self) -> MambaConfig:
        return self.backbone.config

    def get_embedding_dimension(self) -> int:
        return self.backbone.config.d_model

    # --- preprocess ---------------------------------------------------------------------------

    @property
    def text_reading(self) -> dict[str, bool]:
        """The settings that decide what the tokenizer reads of a text (``prepare_text``'s keyword arguments)."""
        return {"do_lower_case": self.do_lower_case, "normalize_whitespace": self.normalize_whitespace,
                "add_prefix_space": self.add_prefix_space}  # fmt: skip

    def prepare_text(self, text: str) -> str:
        """What the tokenizer reads of ``text``: the module-level ``prepare_text`` with this encoder's settings."""
        return prepare_text(text, **self.text_reading)

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs) -> dict[str, Tensor]:
        """Prepare the texts (``prepare_text``), tokenise, truncate to ``max_seq_length - 1``, append EOS, right-pad with EOS.

        Returns ``input_ids`` and ``attention_mask``, both (B, L_max) int64. Where the backbone reads
        packed batches in one pass (Mamba-1 on a CUDA GPU with Triton or on the compiled CPU kernels), no
        text is longer than ``chunk_size`` and the batch has padding, the texts are instead packed end to
        end without padding at inference (eval mode, autograd off, as in ``encode``): see ``_pack``. With
        ``cuda_graphs`` on a GPU, batches without padding that fit a graph bucket are packed too.
        """
        if isinstance(inputs, str):
            raise TypeError("expected a list of strings, got a single str; wrap it in a list")
        for index, text in enumerate(inputs):
            if not isinstance(text, str):
                raise TypeError(f"text {index} of the batch is {type(text).__name__} ({text!r:.40}), expected str")
        texts = prepare_texts([prompt + text for text in inputs] if prompt else inputs, **self.text_reading)
        if not texts:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        ids = self._token_ids(texts, None if self.max_seq_length is None else self.max_seq_length - 1)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        longest = int(lengths.max()) + 1
        columns = np.arange(longest)
        input_ids = np.full((len(ids), longest), self.eos_token_id, dtype=np.int64)
        input_ids[columns < lengths[:, None]] = np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum()))
        input_ids = torch.from_numpy(input_ids)
        attention_mask = torch.from_numpy((columns <= lengths[:, None]).astype(np.int64))  # the tokens and their EOS
        device = self.backbone.embeddings.weight.device
        padded = len(ids) > 1 and int(lengths.min()) + 1 < longest  # else packing removes nothing
        # Packed batches that fit a bucket run as CUDA graph replays, one text or many of one length too.
        graphed = (
            device.type == "cuda"
            and self._graphs_on()
            and self._graphs.bucket_for(sum(len(row) + 1 for row in ids), len(ids)) is not None
        )
        fits_one_pass = self.chunk_size is None or longest <= self.chunk_size  # else forward streams the batch
        # Inference only (eval mode, no autograd: ``encode`` runs under inference mode). Training collators
        # pin, split (cached losses) and move batches by row themselves, and may run before the model is
        # switched to training mode, but never without autograd.
        inference = not self.training and not torch.is_grad_enabled()
        if (padded or graphed) and inference and fits_one_pass and ops.packs_in_one_pass(device, self.config.version):
            return self._pack(input_ids, attention_mask, device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _token_ids(self, texts: list[str], limit: int | None) -> list[list[int]]:
        """Each prepared text's token ids, without special tokens, cut to its first ``limit``.

        A fast tokenizer with no truncation or padding of its own is called directly (tokenizers'
        ``encode_batch_fast``: no character offsets, none of transformers' per-call settings): the same ids, for
        32 SciFact abstracts in 4.0 ms against transformers' 5.0 on a 2-core CPU, host time a GPU batch waits for.
        """
        if limit == 0:
            return [[] for _ in texts]
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if (
            getattr(self.tokenizer, "is_fast", False)
            and hasattr(backend, "encode_batch_fast")
            and backend.truncation is None
            and backend.padding is None
        ):
            rows = [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
            return rows if limit is None else [row[:limit] for row in rows]
        return self.tokenizer(
            texts, add_special_tokens=False, truncation=limit is not None, max_length=limit,
            return_attention_mask=False,
        )["input_ids"]  # fmt: skip

    def _pack(self, input_ids: Tensor, attention_mask: Tensor, device: torch.device) -> dict[str, Tensor]:
        """The padded batch without its padding: the texts (each with its EOS) end to end in one row.

        Returns ``input_ids`` (1, T), ``cu_seqlens`` (B + 1,) int32 (text i is ``cu_seqlens[i]:cu_seqlens[i + 1]``),
        ``packed_positions`` (T,), each token's index in the flattened (B, L_max) padded layout, and the
        padded ``attention_mask`` (B, L_max), so that ``token_embeddings`` keep their usual shape.

        In the main process the tensors are already sent to the model's GPU, in one asynchronous copy
        through a reused pinned buffer (``staging.PinnedStaging``), so that moving the batch to the device
        neither allocates pinned memory nor waits for the previous batch's forward pass.
        """
        keep = attention_mask.bool()
        lengths = attention_mask.sum(dim=1)
        parts = {
            "input_ids": input_ids[keep],
            "cu_seqlens": torch.nn.functional.pad(lengths.cumsum(0), (1, 0)),
            "packed_positions": keep.flatten().nonzero().squeeze(1),
            "attention_mask": attention_mask.flatten(),
        }
        if torch.utils.data.get_worker_info() is None and torch.device(device).type == "cuda":
            sizes = [len(part) for part in parts.values()]
            sent = self._staging.to_device(torch.cat(list(parts.values())), torch.device(device))
            parts = dict(zip(parts, sent.split(sizes), strict=True))
        return {
            "input_ids": parts["input_ids"].unsqueeze(0),  # (1, T)
            "cu_seqlens": parts["cu_seqlens"].to(torch.int32),  # (B + 1,)
            "packed_positions": parts["packed_positions"],  # (T,)
            "attention_mask": parts["attention_mask"].view(attention_mask.shape),  # (B, L_max)
        }

    # --- forward ------------------------------------------------------------------------------

    def forward(self, features: dict[str, Tensor], **kwargs) -> dict[str, Tensor]:
        """Adds ``sentence_embedding`` (B, D), the pooled hidden states, and ``token_embeddings`` (B, L, D).

        A query-sized batch on CPU runs on the calling thread, pooling included (``MambaBackbone.threads_for``).
        """
        with self.backbone.threads_for(features["input_ids"]):
            return self._forward(features)

    def _forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        if "cu_seqlens" in features:
            return self._forward_packed(features)
        eos_positions = attention_mask.sum(dim=1) - 1  # (B,): right padding puts EOS last
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if self.chunk_size is not None and input_ids.shape[1] > self.chunk_size:
            features["sentence_embedding"] = self._forward_streaming(input_ids, attention_mask, eos_positions)
            return features
        hidden = self.backbone(input_ids)  # (B, L, D)
        features["token_embeddings"] = hidden
        if self.pooling != "eos":
            weights = self._pooling_weights(input_ids, attention_mask).unsqueeze(-1)  # (B, L, 1)
            mean = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=_TINY)
            features["sentence_embedding"] = mean.to(hidden.dtype)
        else:
            features["sentence_embedding"] = hidden[rows, eos_positions]
        return features

    def _forward_packed(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The same outputs from a packed batch (see ``_pack``): one pass over T tokens, no padding."""
        input_ids, cu_seqlens = features["input_ids"], features["cu_seqlens"]
        attention_mask = features["attention_mask"]
        if self._graphs_on() and graphs_apply(self.backbone, input_ids):
            hidden = self._graphs.forward(self.backbone, input_ids, cu_seqlens)  # (T, D)
        else:
            hidden = self.backbone(input_ids, cu_seqlens=cu_seqlens)[0]  # (T, D)
        if self.pooling != "eos":
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (B,)
            texts = torch.arange(len(lengths), device=hidden.device)
            owner = torch.repeat_interleave(texts, lengths, output_size=hidden.shape[0])  # (T,); no sync for the size
            values = hidden.float()  # (T, D)
            if self.pooling == "weighted-mean":
                weights = self._pooling_weights(input_ids[0])  # (T,)
                values = values * weights.unsqueeze(1)
                totals = weights.new_zeros(len(lengths)).index_add_(0, owner, weights)  # (B,)
            else:
                totals = lengths.float()
            sums = hidden.new_zeros(len(lengths), hidden.shape[-1], dtype=torch.float32).index_add_(0, owner, values)
            features["sentence_embedding"] = (sums / totals.clamp(min=_TINY).unsqueeze(1)).to(hidden.dtype)
        else:
            features["sentence_embedding"] = hidden[cu_seqlens[1:].long() - 1]  # each text's EOS is its last token
        padded = hidden.new_zeros(attention_mask.numel(), hidden.shape[-1])
        padded.index_copy_(0, features["packed_positions"], hidden)
        features["token_embeddings"] = padded.view(*attention_mask.shape, hidden.shape[-1])  # (B, L_max, D)
        return features

    def _forward_streaming(self, input_ids: Tensor, attention_mask: Tensor, eos_positions: Tensor) -> Tensor:
        """Read (B, L) ids ``chunk_size`` tokens at a time; keep only what the pooling needs.

        EOS pooling keeps each text's hidden state at its EOS; the means a running (B, D) fp32 sum and the
        (B, 1) sum of the weights. A text whose EOS is behind leaves the batch: later chunks read only the
        texts still going, and no chunk reads past the longest of them (a batch of texts of 4K to 35K tokens
        would otherwise read 35K tokens for each).
        """
        state: list[LayerState] | None = None
        ends = eos_positions.tolist()  # one sync per batch, so that choosing the rows of a chunk needs none
        going = list(range(input_ids.shape[0]))  # the rows still being read, in batch order
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        embedding = None
        total = torch.zeros(input_ids.shape[0], 1, device=input_ids.device)  # (B, 1)
        for start in range(0, input_ids.shape[1], self.chunk_size):
            keep = [i for i, row in enumerate(going) if ends[row] >= start]
            if len(keep) < len(going):  # state rows follow ``going``
                index = torch.tensor(keep, device=input_ids.device)
                state = [LayerState(layer.conv[index], layer.ssm[index]) for layer in state]
                going = [going[i] for i in keep]
                rows = torch.tensor(going, device=input_ids.device)
            stop = min(start + self.chunk_size, max(ends[row] for row in going) + 1)
            ids = input_ids[rows, start:stop] if len(going) < input_ids.shape[0] else input_ids[:, start:stop]
            hidden, state = self.backbone(ids, state, return_state=True)
            if embedding is None:
                embedding = hidden.new_zeros(input_ids.shape[0], hidden.shape[-1], dtype=torch.float32)
            if self.pooling != "eos":
                weights = self._pooling_weights(ids, attention_mask[rows, start:stop]).unsqueeze(-1)
                embedding.index_add_(0, rows, (hidden.float() * weights).sum(dim=1))
                total.index_add_(0, rows, weights.sum(dim=1))
                continue
            here = [i for i, row in enumerate(going) if start <= ends[row] < stop]
            if here:
                local = torch.tensor(here, device=input_ids.device)
                picked = hidden[local, eos_positions[rows[local]] - start].float()
                embedding = embedding.index_put((rows[local],), picked)
        if self.pooling != "eos":
            embedding /= total.clamp(min=_TINY)
        return embedding.to(hidden.dtype)

    def _pooling_weights(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Each token's fp32 weight in the mean, shaped like ``input_ids``: the mask (ones if None), times
        ``exp(token_log_weights)`` of the token for ``"weighted-mean"``."""
        weights = torch.ones_like(input_ids, dtype=torch.float32) if attention_mask is None else attention_mask.float()
        if self.pooling == "weighted-mean":
            weights = weights * self.token_log_weights.float()[input_ids].exp()
        return weights

    # --- training -----------------------------------------------------------------------------

    def train(self, mode: bool = True) -> MambaEncoder:
        """Training mode; drops the CUDA graphs first (training changes the weights they read)."""
        if mode:
            self._graphs.clear()
        return super().train(mode)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each residual block's activations during the backward pass instead of storing them.

        ``SentenceTransformer.gradient_checkpointing_enable()`` calls this on every module that has it.
        The backbone always uses non-reentrant ``torch.utils.checkpoint``; other settings are refused.
        """
        extra = {k: v for k, v in (gradient_checkpointing_kwargs or {}).items() if (k, v) != ("use_reentrant", False)}
        if extra:
            raise ValueError(f"MambaEncoder only supports non-reentrant gradient checkpointing, got {extra}")
        self.backbone.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.backbone.gradient_checkpointing = False

    # --- save / load --------------------------------------------------------------------------

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """Write the backbone as a transformers Mamba checkpoint (safetensors), the tokenizer and our config."""
        save_backbone(self.backbone, output_path)
        self.save_tokenizer(output_path)
        self.save_config(output_path)
        if self.pooling == "weighted-mean":
            weights = {"token_log_weights": self.token_log_weights.detach().cpu().contiguous()}
            save_file(weights, str(Path(output_path) / self.weights_file_name))

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> MambaEncoder:
        """Load a saved MambaEncoder (the inverse of ``save``); ``model_kwargs`` may hold a ``dtype``."""
        hub = dict(token=token, cache_folder=cache_folder, revision=revision, local_files_only=local_files_only)
        folder = Path(resolve_folder(model_name_or_path, **hub)) / subfolder
        config_path = folder / cls.config_file_name
        settings = cls.load_config(str(folder)) if config_path.is_file() else {}
        backbone, _ = load_backbone(folder)
        dtype = (model_kwargs or {}).get("dtype") or (model_kwargs or {}).get("torch_dtype")
        if dtype is not None:
            backbone = backbone.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        tokenizer = load_tokenizer(folder, backbone.config.eos_token_id)
        encoder = cls(backbone, tokenizer, **settings)
        if encoder.pooling == "weighted-mean":
            path = folder / cls.weights_file_name
            if not path.is_file():
                raise CheckpointError(f"{folder} uses weighted-mean pooling but has no {cls.weights_file_name}")
            weights = load_file(str(path))["token_log_weights"]
            if weights.shape != encoder.token_log_weights.shape:
                raise CheckpointError(
                    f"{path} holds {tuple(weights.shape)} token weights; the vocabulary has "
                    f"{encoder.token_log_weights.shape[0]} entries"
                )
            with torch.no_grad():
                encoder.token_log_weights.copy_(weights)
        return encoder

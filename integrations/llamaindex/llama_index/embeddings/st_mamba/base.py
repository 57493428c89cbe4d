"""STMambaEmbedding: a LlamaIndex ``BaseEmbedding`` over an st-mamba (or any) Sentence-Transformers model."""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import Field, PrivateAttr, model_validator
from sentence_transformers import SentenceTransformer
from typing_extensions import Self

from st_mamba.async_batching import QueryBatcher
from st_mamba.loading import load_model

# Arguments of ``encode`` that have a field of their own here.
_MANAGED_ENCODE_ARGS = {
    "prompt": "query_prompt / document_prompt",
    "prompt_name": "query_prompt / document_prompt",
    "batch_size": "embed_batch_size",
    "normalize_embeddings": "normalize",
    "device": "device",
    "pool": "device",
    "show_progress_bar": None,
    "convert_to_numpy": None,
    "convert_to_tensor": None,
    "output_value": None,
}


class STMambaEmbedding(BaseEmbedding):
    """Sentence embeddings from an st-mamba model (Mamba Retriever) or any Sentence-Transformers model.

    Query embeddings come from ``encode_query`` and text (node) embeddings from ``encode_document``,
    so the prompts saved with the model ("query" and "document") are applied; ``query_prompt`` and
    ``document_prompt`` replace them (``""`` for none). Texts are passed to the model exactly as given.

    Example:
        .. code-block:: python

            from llama_index.core import VectorStoreIndex
            from llama_index.embeddings.st_mamba import STMambaEmbedding

            embed_model = STMambaEmbedding(model_name="models/st-mamba-distilled")
            index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)

    Args:
        model_name: folder of a saved Sentence-Transformers model, or a Hugging Face Hub id.
        client: an already loaded ``SentenceTransformer`` to use instead of loading ``model_name``.
        embed_batch_size: texts per call to the model (LlamaIndex splits larger lists into such batches).
        device: ``"cpu"``, ``"cuda:0"``...; a list such as ``["cuda:0", "cuda:1"]`` encodes in one
            process per device, through a pool that is started on first use and stopped by ``close()``.
        normalize: L2-normalise the vectors (st-mamba models already end in ``Normalize``).
        chunk_size: st-mamba only: read texts longer than this many tokens in chunks that carry the
            recurrent state, so memory stays flat however long the text (sets the model's
            ``MambaEncoder.chunk_size``; the embeddings are unchanged).
        query_prompt: prompt for queries; None uses the model's saved "query" prompt.
        document_prompt: prompt for texts/nodes; None uses the model's saved "document" prompt.
        trust_remote_code: let Sentence-Transformers import module classes named by the model;
            not needed for st-mamba folders, whose classes come from the installed st-mamba.
        model_kwargs: more keyword arguments for ``SentenceTransformer(...)``.
        encode_kwargs: more keyword arguments for ``encode``, e.g. ``{"truncate_dim": 256}``.
    """

    model_name: str = Field(default="unknown", description="Folder or Hugging Face Hub id of the model.")
    embed_batch_size: int = Field(default=32, gt=0, le=2048, description="Texts per call to the model.")
    client: SentenceTransformer | None = Field(default=None, exclude=True, repr=False)
    device: str | list[str] | None = None
    normalize: bool = True
    chunk_size: int | None = Field(default=None, gt=0)
    query_prompt: str | None = None
    document_prompt: str | None = None
    trust_remote_code: bool = False
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    encode_kwargs: dict[str, Any] = Field(default_factory=dict)

    _executor: ThreadPoolExecutor = PrivateAttr()
    _query_batcher: QueryBatcher = PrivateAttr()
    _pool: dict[str, Any] | None = PrivateAttr(default=None)
    _pool_finalizer: weakref.finalize | None = PrivateAttr(default=None)
    _pool_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        return "STMambaEmbedding"

    @model_validator(mode="after")
    def _load(self) -> Self:
        clashes = sorted(set(self.encode_kwargs) & set(_MANAGED_ENCODE_ARGS))
        if clashes:
            hints = ", ".join(f"{key} (use {_MANAGED_ENCODE_ARGS[key] or 'nothing: it is fixed'})" for key in clashes)
            raise ValueError(f"encode_kwargs may not set {hints}")
        if self.client is None:
            if self.model_name == "unknown":
                raise ValueError("pass model_name= (a folder or Hub id) or client= (a loaded SentenceTransformer)")
            single_device = None if isinstance(self.device, list) else self.device
            self.client = load_model(self.model_name, single_device, self.trust_remote_code, self.model_kwargs)
        if self.chunk_size is not None:
            _set_chunk_size(self.client, self.chunk_size)
        # One worker: encodes run off the event loop, one at a time, instead of competing for the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="st-mamba-encode")
        self._query_batcher = QueryBatcher(lambda texts: self._encode(texts, "query"), self._executor)
        return self

    # --- public entry points: check the caller's whole list before LlamaIndex splits it ---------

    def get_text_embedding_batch(self, texts: list[str], show_progress: bool = False, **kwargs: Any) -> list[Embedding]:
        return super().get_text_embedding_batch(_check_texts(texts), show_progress=show_progress, **kwargs)

    async def aget_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        return await super().aget_text_embedding_batch(_check_texts(texts), show_progress=show_progress, **kwargs)

    # --- the BaseEmbedding interface -------------------------------------------------------------

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encode([_check_one(query, "query")], "query")[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encode([_check_one(text, "text")], "document")[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encode(_check_texts(texts), "document")

    async def _aget_query_embedding(self, query: str) -> Embedding:
        """Queries awaited at the same time are encoded together as one batch."""
        return await self._query_batcher.embed(_check_one(query, "query"))

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._aget_text_embeddings([_check_one(text, "text")]))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        texts = _check_texts(texts)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._encode, texts, "document")

    # --- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the multi-process pool, if one was started. The object stays usable."""
        with self._pool_lock:
            finalizer, self._pool_finalizer, self._pool = self._pool_finalizer, None, None
        if finalizer is not None:
            finalizer()  # stops the pool; a finalizer runs at most once

    # --- internals ---------------------------------------------------------------------------------

    def _encode(self, texts: list[str], role: Literal["query", "document"]) -> list[Embedding]:
        if not texts:
            return []
        encode = self.client.encode_query if role == "query" else self.client.encode_document
        if isinstance(self.device, list):
            placement = {"pool": self._multi_process_pool()}
        else:
            placement = {"device": self.device}
        embeddings = encode(
            texts,
            prompt=self.query_prompt if role == "query" else self.document_prompt,
            batch_size=self.embed_batch_size,
            show_progress_bar=False,  # LlamaIndex shows its own, over batches (show_progress=True)
            normalize_embeddings=self.normalize,
            convert_to_numpy=True,
            **placement,
            **self.encode_kwargs,
        )
        return embeddings.tolist()

    def _multi_process_pool(self) -> dict[str, Any]:
        with self._pool_lock:
            if self._pool is None:
                self._pool = self.client.start_multi_process_pool(list(self.device))
                # Also stop the worker processes if this object is dropped (or at exit) without close().
                self._pool_finalizer = weakref.finalize(self, SentenceTransformer.stop_multi_process_pool, self._pool)
            return self._pool


def _set_chunk_size(client: SentenceTransformer, chunk_size: int) -> None:
    from st_mamba import MambaEncoder

    first = client[0]
    if not isinstance(first, MambaEncoder):
        raise ValueError(f"chunk_size is an st-mamba option; this model starts with {type(first).__name__}")
    first.chunk_size = chunk_size


def _check_texts(texts: list[str]) -> list[str]:
    """Raise TypeError naming the first non-string, by its index in the caller's list."""
    if isinstance(texts, str):
        raise TypeError("expected a list of strings, got a single str; wrap it in a list")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__} ({text!r:.40}), expected str")
    return texts


def _check_one(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"the {what} is {type(text).__name__} ({text!r:.40}), expected str")
    return text

"""STMambaEmbeddings: LangChain ``Embeddings`` over an st-mamba (or any) Sentence-Transformers model."""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from sentence_transformers import SentenceTransformer
from st_mamba.async_batching import QueryBatcher
from st_mamba.loading import load_model
from typing_extensions import Self

# Arguments of ``encode`` that have a field of their own here.
_MANAGED_ENCODE_ARGS = {
    "prompt": "query_prompt / document_prompt",
    "prompt_name": "query_prompt / document_prompt",
    "batch_size": "batch_size",
    "show_progress_bar": "show_progress",
    "normalize_embeddings": "normalize_embeddings",
    "device": "device",
    "pool": "device",
    "convert_to_numpy": None,
    "convert_to_tensor": None,
    "output_value": None,
}


class STMambaEmbeddings(BaseModel, Embeddings):
    """Sentence embeddings from an st-mamba model (Mamba Retriever) or any Sentence-Transformers model.

    ``embed_documents`` calls ``encode_document`` and ``embed_query`` calls ``encode_query``, so the
    prompts saved with the model ("document" and "query") are applied; ``document_prompt`` and
    ``query_prompt`` replace them (``""`` for none). Texts are passed to the model exactly as given.

    Example:
        .. code-block:: python

            from langchain_st_mamba import STMambaEmbeddings

            embeddings = STMambaEmbeddings(model="models/st-mamba-distilled")
            vectors = embeddings.embed_documents(["Mamba reads text left to right."])
            query = embeddings.embed_query("How does Mamba read text?")

    Args:
        model: folder of a saved Sentence-Transformers model, or a Hugging Face Hub id.
        client: an already loaded ``SentenceTransformer`` to use instead of ``model``.
        device: ``"cpu"``, ``"cuda:0"``...; a list such as ``["cuda:0", "cuda:1"]`` encodes in one
            process per device, through a pool that is started on first use and stopped by ``close()``.
        batch_size: texts per forward pass.
        normalize_embeddings: L2-normalise the vectors (st-mamba models already end in ``Normalize``;
            this makes dot product equal cosine for other models too).
        show_progress: show a progress bar over batches.
        chunk_size: st-mamba only: read texts longer than this many tokens in chunks that carry the
            recurrent state, so memory stays flat however long the document (sets the model's
            ``MambaEncoder.chunk_size``; the embeddings are unchanged).
        query_prompt: prompt for queries; None uses the model's saved "query" prompt.
        document_prompt: prompt for documents; None uses the model's saved "document" prompt.
        trust_remote_code: let Sentence-Transformers import module classes named by the model;
            not needed for st-mamba folders, whose classes come from the installed st-mamba.
        model_kwargs: more keyword arguments for ``SentenceTransformer(...)``.
        encode_kwargs: more keyword arguments for ``encode``, e.g. ``{"truncate_dim": 256}``.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    model: str | None = None
    client: SentenceTransformer | None = Field(default=None, exclude=True, repr=False)
    device: str | list[str] | None = None
    batch_size: int = Field(default=32, gt=0)
    normalize_embeddings: bool = True
    show_progress: bool = False
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

    @model_validator(mode="after")
    def _load(self) -> Self:
        clashes = sorted(set(self.encode_kwargs) & set(_MANAGED_ENCODE_ARGS))
        if clashes:
            hints = ", ".join(f"{key} (use {_MANAGED_ENCODE_ARGS[key] or 'nothing: it is fixed'})" for key in clashes)
            raise ValueError(f"encode_kwargs may not set {hints}")
        if self.client is None:
            if self.model is None:
                raise ValueError("pass model= (a folder or Hub id) or client= (a loaded SentenceTransformer)")
            single_device = None if isinstance(self.device, list) else self.device
            self.client = load_model(self.model, single_device, self.trust_remote_code, self.model_kwargs)
        if self.chunk_size is not None:
            _set_chunk_size(self.client, self.chunk_size)
        # One worker: encodes run off the event loop, one at a time, instead of competing for the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="st-mamba-encode")
        self._query_batcher = QueryBatcher(lambda texts: self._encode(texts, "query"), self._executor)
        return self

    # --- the Embeddings interface ----------------------------------------------------------------

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents with the model's document prompt (or ``document_prompt``)."""
        return self._encode(_check_texts(texts), "document")

    def embed_query(self, text: str) -> list[float]:
        """Embed one query with the model's query prompt (or ``query_prompt``)."""
        return self._encode([_check_query(text)], "query")[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Like ``embed_documents``, on a worker thread so the event loop keeps running."""
        texts = _check_texts(texts)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._encode, texts, "document")

    async def aembed_query(self, text: str) -> list[float]:
        """Like ``embed_query``; queries awaited at the same time are encoded together as one batch."""
        return await self._query_batcher.embed(_check_query(text))

    # --- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the multi-process pool, if one was started. The object stays usable."""
        with self._pool_lock:
            finalizer, self._pool_finalizer, self._pool = self._pool_finalizer, None, None
        if finalizer is not None:
            finalizer()  # stops the pool; a finalizer runs at most once

    # --- internals ---------------------------------------------------------------------------------

    def _encode(self, texts: list[str], role: Literal["query", "document"]) -> list[list[float]]:
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
            batch_size=self.batch_size,
            show_progress_bar=self.show_progress,
            normalize_embeddings=self.normalize_embeddings,
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
        raise TypeError("embed_documents takes a list of strings, got a single str; wrap it in a list")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__} ({text!r:.40}), expected str")
    return texts


def _check_query(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"the query is {type(text).__name__} ({text!r:.40}), expected str")
    return text

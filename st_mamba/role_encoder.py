"""The encoding layer the LangChain and LlamaIndex embeddings classes share: loading, input checks, encoding by role.

``integrations/langchain`` (``STMambaEmbeddings``) and ``integrations/llamaindex`` (``STMambaEmbedding``)
are thin pydantic classes with the field names of their ecosystems; both delegate to a ``RoleEncoder``
here: queries go through ``encode_query`` and documents through ``encode_document`` (so the prompts saved
with the model apply), on one worker thread for async callers, with concurrent async queries batched
together, and on several devices through a multi-process pool when given a list of devices.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from sentence_transformers import SentenceTransformer

from st_mamba.async_batching import QueryBatcher
from st_mamba.loading import load_model, set_chunk_size

Role = Literal["query", "document"]

# Arguments of ``encode`` that the integrations set themselves: a field of their own, or fixed (None).
_SHARED_FIELDS = {
    "prompt": "query_prompt / document_prompt",
    "prompt_name": "query_prompt / document_prompt",
    "device": "device",
    "pool": "device",
    "convert_to_numpy": None,
    "convert_to_tensor": None,
    "output_value": None,
}


def check_encode_kwargs(encode_kwargs: dict[str, Any], fields: dict[str, str | None]) -> None:
    """Refuse ``encode_kwargs`` that would override an integration's own fields.

    Args:
        encode_kwargs: the user's extra arguments for ``encode``.
        fields: the integration's ``encode`` argument -> field that sets it (None: fixed), beyond those
            every integration has (prompts, device, output type).

    Raises:
        ValueError: naming each clashing argument and the field to use instead.
    """
    managed = {**_SHARED_FIELDS, **fields}
    clashes = sorted(set(encode_kwargs) & set(managed))
    if clashes:
        hints = ", ".join(f"{key} (use {managed[key] or 'nothing: it is fixed'})" for key in clashes)
        raise ValueError(f"encode_kwargs may not set {hints}")


def load_client(
    model: str | os.PathLike | None,
    client: SentenceTransformer | None,
    *,
    model_field: str,
    device: str | list[str] | None,
    trust_remote_code: bool,
    model_kwargs: dict[str, Any],
    chunk_size: int | None,
) -> SentenceTransformer:
    """``client`` if given, else the model loaded from ``model`` (a folder or Hub id); with ``chunk_size`` set
    on its MambaEncoder. ``model_field`` names the integration's field in the error for neither."""
    if client is None:
        if model is None:
            raise ValueError(f"pass {model_field}= (a folder or Hub id) or client= (a loaded SentenceTransformer)")
        single_device = None if isinstance(device, list) else device  # a list: worker processes, one each
        client = load_model(model, single_device, trust_remote_code, model_kwargs)
    if chunk_size is not None:
        set_chunk_size(client, chunk_size)
    return client


def check_texts(texts: list[str]) -> list[str]:
    """The texts as a list; TypeError naming the first non-string by its index in the caller's list."""
    if isinstance(texts, str):
        raise TypeError("expected a list of strings, got a single str; wrap it in a list")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__} ({text!r:.40}), expected str")
    return texts


def check_text(text: str, what: str) -> str:
    """``text``, or TypeError calling it ``what`` ("query", "text"...) if it is not a string."""
    if not isinstance(text, str):
        raise TypeError(f"the {what} is {type(text).__name__} ({text!r:.40}), expected str")
    return text


class RoleEncoder:
    """Encodes queries or documents with a SentenceTransformer, for an integration's embeddings class.

    Args:
        client: the model.
        encode_kwargs: called at each encode with the role; returns the integration's current settings as
            ``encode`` arguments (``prompt``, ``batch_size``, ``normalize_embeddings``, ``device``...).
            A list as ``device`` encodes in one process per device, through a pool started on first use.
    """

    def __init__(self, client: SentenceTransformer, encode_kwargs: Callable[[Role], dict[str, Any]]) -> None:
        self.client = client
        self._encode_kwargs = encode_kwargs
        # One worker: encodes run off the event loop, one at a time, instead of competing for the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="st-mamba-encode")
        self._query_batcher = QueryBatcher(lambda texts: self.encode(texts, "query"), self._executor)
        self._pool: dict[str, Any] | None = None
        self._pool_finalizer: weakref.finalize | None = None
        self._pool_lock = threading.Lock()

    def encode(self, texts: list[str], role: Role) -> list[list[float]]:
        """Embeddings of checked ``texts`` as lists of floats ([] for no texts)."""
        if not texts:
            return []
        kwargs = self._encode_kwargs(role)
        device = kwargs.pop("device", None)
        placement = {"pool": self._multi_process_pool(device)} if isinstance(device, list) else {"device": device}
        encode = self.client.encode_query if role == "query" else self.client.encode_document
        return encode(texts, convert_to_numpy=True, **placement, **kwargs).tolist()

    async def aencode(self, texts: list[str], role: Role) -> list[list[float]]:
        """Like ``encode``, on the worker thread so that the event loop keeps running."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.encode, texts, role)

    async def aencode_query(self, text: str) -> list[float]:
        """One query; queries awaited at the same time are encoded together as one batch."""
        return await self._query_batcher.embed(text)

    def close(self) -> None:
        """Stop the multi-process pool, if one was started. The encoder stays usable."""
        with self._pool_lock:
            finalizer, self._pool_finalizer, self._pool = self._pool_finalizer, None, None
        if finalizer is not None:
            finalizer()  # stops the pool; a finalizer runs at most once

    def _multi_process_pool(self, devices: list[str]) -> dict[str, Any]:
        with self._pool_lock:
            if self._pool is None:
                self._pool = self.client.start_multi_process_pool(list(devices))
                # Also stop the worker processes if this object is dropped (or at exit) without close().
                self._pool_finalizer = weakref.finalize(self, SentenceTransformer.stop_multi_process_pool, self._pool)
            return self._pool

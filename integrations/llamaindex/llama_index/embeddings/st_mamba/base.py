"""STMambaEmbedding: a LlamaIndex ``BaseEmbedding`` over an st-mamba (or any) Sentence-Transformers model."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import Field, PrivateAttr, model_validator
from sentence_transformers import SentenceTransformer
from typing_extensions import Self

from st_mamba.role_encoder import Role, RoleEncoder, check_encode_kwargs, check_text, check_texts, load_client

# ``encode`` arguments set by a field of this class (or fixed: None), beyond the prompts and the device.
_ENCODE_FIELDS = {
    "batch_size": "embed_batch_size",
    "normalize_embeddings": "normalize",
    "show_progress_bar": None,
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

    _encoder: RoleEncoder = PrivateAttr()

    @classmethod
    def class_name(cls) -> str:
        return "STMambaEmbedding"

    @model_validator(mode="after")
    def _load(self) -> Self:
        check_encode_kwargs(self.encode_kwargs, _ENCODE_FIELDS)
        model = None if self.model_name == "unknown" else self.model_name  # LlamaIndex's default name
        self.client = load_client(
            model, self.client, model_field="model_name", device=self.device,
            trust_remote_code=self.trust_remote_code, model_kwargs=self.model_kwargs, chunk_size=self.chunk_size,
        )  # fmt: skip
        self._encoder = RoleEncoder(self.client, self._encode_kwargs)
        return self

    # --- public entry points: check the caller's whole list before LlamaIndex splits it ---------

    def get_text_embedding_batch(self, texts: list[str], show_progress: bool = False, **kwargs: Any) -> list[Embedding]:
        return super().get_text_embedding_batch(check_texts(texts), show_progress=show_progress, **kwargs)

    async def aget_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        return await super().aget_text_embedding_batch(check_texts(texts), show_progress=show_progress, **kwargs)

    # --- the BaseEmbedding interface -------------------------------------------------------------

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encoder.encode([check_text(query, "query")], "query")[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encoder.encode([check_text(text, "text")], "document")[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encoder.encode(check_texts(texts), "document")

    async def _aget_query_embedding(self, query: str) -> Embedding:
        """Queries awaited at the same time are encoded together as one batch."""
        return await self._encoder.aencode_query(check_text(query, "query"))

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._encoder.aencode([check_text(text, "text")], "document"))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await self._encoder.aencode(check_texts(texts), "document")

    # --- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the multi-process pool, if one was started. The object stays usable."""
        self._encoder.close()

    def _encode_kwargs(self, role: Role) -> dict[str, Any]:
        """This object's settings as ``encode`` arguments, read at each call."""
        prompt = self.query_prompt if role == "query" else self.document_prompt
        # show_progress_bar off: LlamaIndex shows its own progress, over batches (show_progress=True)
        return dict(prompt=prompt, device=self.device, batch_size=self.embed_batch_size, show_progress_bar=False,
                    normalize_embeddings=self.normalize, **self.encode_kwargs)  # fmt: skip

"""STMambaEmbeddings: LangChain ``Embeddings`` over an st-mamba (or any) Sentence-Transformers model."""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from sentence_transformers import SentenceTransformer
from st_mamba.role_encoder import Role, RoleEncoder, check_encode_kwargs, check_text, check_texts, load_client
from typing_extensions import Self

# ``encode`` arguments set by a field of this class, beyond the prompts and the device.
_ENCODE_FIELDS = {
    "batch_size": "batch_size",
    "show_progress_bar": "show_progress",
    "normalize_embeddings": "normalize_embeddings",
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

    _encoder: RoleEncoder = PrivateAttr()

    @model_validator(mode="after")
    def _load(self) -> Self:
        check_encode_kwargs(self.encode_kwargs, _ENCODE_FIELDS)
        self.client = load_client(
            self.model, self.client, model_field="model", device=self.device,
            trust_remote_code=self.trust_remote_code, model_kwargs=self.model_kwargs, chunk_size=self.chunk_size,
        )  # fmt: skip
        self._encoder = RoleEncoder(self.client, self._encode_kwargs)
        return self

    # --- the Embeddings interface ----------------------------------------------------------------

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents with the model's document prompt (or ``document_prompt``)."""
        return self._encoder.encode(check_texts(texts), "document")

    def embed_query(self, text: str) -> list[float]:
        """Embed one query with the model's query prompt (or ``query_prompt``)."""
        return self._encoder.encode([check_text(text, "query")], "query")[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Like ``embed_documents``, on a worker thread so the event loop keeps running."""
        return await self._encoder.aencode(check_texts(texts), "document")

    async def aembed_query(self, text: str) -> list[float]:
        """Like ``embed_query``; queries awaited at the same time are encoded together as one batch."""
        return await self._encoder.aencode_query(check_text(text, "query"))

    def close(self) -> None:
        """Stop the multi-process pool, if one was started. The object stays usable."""
        self._encoder.close()

    def _encode_kwargs(self, role: Role) -> dict[str, Any]:
        """This object's settings as ``encode`` arguments, read at each call."""
        prompt = self.query_prompt if role == "query" else self.document_prompt
        return dict(prompt=prompt, device=self.device, batch_size=self.batch_size, show_progress_bar=self.show_progress,
                    normalize_embeddings=self.normalize_embeddings, **self.encode_kwargs)  # fmt: skip

"""A LlamaIndex ``VectorStoreIndex`` over this repository's docs, embedded with st-mamba, offline.

Reads the Markdown docs as LlamaIndex ``Document``s, lets LlamaIndex split them into nodes, embeds
the nodes with ``STMambaEmbedding`` and prints what the index's retriever returns for each question.
No LLM is configured: this is retrieval only (``index.as_query_engine(llm=...)`` adds generation).

The model is the repository's distilled st-mamba model (``models/st-mamba-distilled``) or any other
st-mamba / Sentence-Transformers folder given with ``--model``. While no distilled model exists, an
untrained stand-in is used and announced: its rankings are meaningless.

    pip install -e . -e integrations/llamaindex
    python examples/llamaindex_vector_index.py "Which checkpoint formats can st-mamba load?"
"""

from __future__ import annotations

import argparse

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.embeddings.st_mamba import STMambaEmbedding

from st_mamba.cli import DEMO_QUERIES, demo_documents, demo_model

TOP_K = 3  # nodes the retriever returns per question
NODE_TOKENS = 256  # LlamaIndex's node size (in its own tokenizer's tokens)
NODE_OVERLAP = 32  # tokens shared by neighbouring nodes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", nargs="*", default=DEMO_QUERIES, help="questions (default: four about st-mamba)")
    parser.add_argument("--model", help="model folder (default: models/st-mamba-distilled, else untrained)")
    parser.add_argument("--tokenizer", help="tokenizer folder for the untrained stand-in")
    parser.add_argument(
        "--corpus", action="append", help="a Markdown file or folder (repeatable; default: README.md and docs/)"
    )
    args = parser.parse_args(argv)

    # 1. Load the model and wrap it for LlamaIndex
    model, description, trained = demo_model(args.model, args.tokenizer)
    embed_model = STMambaEmbedding(client=model)
    print(f"model: {description}")
    if not trained:
        print("WARNING: untrained model, the nodes below are ranked at random.")

    # 2. Load the documents; the file name is metadata, kept out of the embedded text
    paths, _ = demo_documents(args.corpus)
    documents = [
        Document(text=path.read_text("utf-8"), metadata={"file": path.name}, excluded_embed_metadata_keys=["file"])
        for path in paths
    ]

    # 3. Split into nodes and embed them (the model's document prompt) into a VectorStoreIndex
    splitter = SentenceSplitter(chunk_size=NODE_TOKENS, chunk_overlap=NODE_OVERLAP)
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model, transformations=[splitter])
    print(f"indexed {len(index.docstore.docs)} nodes from {len(paths)} files")

    # 4. Retrieve (the model's query prompt) and print the nodes found
    retriever = index.as_retriever(similarity_top_k=TOP_K)
    for question in args.questions:
        print(f"\nQ: {question}")
        for rank, hit in enumerate(retriever.retrieve(question), start=1):
            text = " ".join(hit.node.get_content().split())
            print(f"  {rank}. {hit.score:.3f} [{hit.node.metadata['file']}] {text[:150]}")


if __name__ == "__main__":
    main()

"""The retrieval half of RAG with LangChain and st-mamba, offline.

Loads this repository's Markdown docs, embeds their passages (or the whole files) with
``STMambaEmbeddings``, stores them in LangChain's ``InMemoryVectorStore``, and answers each question
by printing the passages its retriever returns. The generation half is one step more: hand those
passages to an LLM chain as context.

The model is the repository's distilled st-mamba model (``models/st-mamba-distilled``) or any other
st-mamba / Sentence-Transformers folder given with ``--model``. While no distilled model exists, an
untrained stand-in is used and announced: its rankings are meaningless.

    pip install -e . -e integrations/langchain
    python examples/langchain_rag.py "How can I embed a very long document?"
    python examples/langchain_rag.py --whole-documents --model path/to/model
"""

from __future__ import annotations

import argparse

from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_st_mamba import STMambaEmbeddings

from st_mamba.cli import DEMO_QUERIES, demo_documents, demo_model, read_passages

TOP_K = 3  # passages the retriever returns per question
STREAM_CHUNK = 512  # whole documents are read this many tokens at a time, carrying the Mamba state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", nargs="*", default=DEMO_QUERIES, help="questions (default: four about st-mamba)")
    parser.add_argument("--model", help="model folder (default: models/st-mamba-distilled, else untrained)")
    parser.add_argument("--tokenizer", help="tokenizer folder for the untrained stand-in")
    parser.add_argument(
        "--corpus", action="append", help="a Markdown file or folder (repeatable; default: README.md and docs/)"
    )
    parser.add_argument("--whole-documents", action="store_true", help="embed whole files instead of passages")
    args = parser.parse_args(argv)

    # 1. Load the model and wrap it for LangChain
    model, description, trained = demo_model(args.model, args.tokenizer)
    if args.whole_documents:
        # Keep every token of a long file; streaming keeps memory flat and the embedding unchanged.
        model[0].max_seq_length = None
        embeddings = STMambaEmbeddings(client=model, chunk_size=STREAM_CHUNK)
    else:
        embeddings = STMambaEmbeddings(client=model)
    print(f"model: {description}")
    if not trained:
        print("WARNING: untrained model, the passages below are ranked at random.")

    # 2. Load the documents: one per passage, or one per file
    paths, root = demo_documents(args.corpus)
    if args.whole_documents:
        documents = [Document(page_content=path.read_text("utf-8"), metadata={"source": path.name}) for path in paths]
    else:
        passages = read_passages(paths, root)
        documents = [Document(page_content=p.text, metadata={"source": p.source}) for p in passages]

    # 3. Embed them into a vector store (embed_documents: the model's document prompt)
    store = InMemoryVectorStore.from_documents(documents, embeddings)
    print(f"indexed {len(documents)} {'files' if args.whole_documents else 'passages'} from {len(paths)} files")

    # 4. A retriever over the store (embed_query: the model's query prompt)
    retriever = store.as_retriever(search_kwargs={"k": TOP_K})

    # 5. "Answer": print what the retriever found
    for question in args.questions:
        print(f"\nQ: {question}")
        for rank, document in enumerate(retriever.invoke(question), start=1):
            text = " ".join(document.page_content.split())
            print(f"  {rank}. [{document.metadata['source']}] {text[:150]}")


if __name__ == "__main__":
    main()

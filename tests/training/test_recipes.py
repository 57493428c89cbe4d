"""The training recipes end to end, offline: a tiny random st-mamba model on a tiny BEIR folder.

Each recipe's ``main()`` trains a few steps, writes checkpoints, resumes from the last one and saves a
model that loads with ``SentenceTransformer(path, trust_remote_code=True)``; the in-batch InfoNCE loss
on the training pairs must go down. The DDP test runs the BEIR-folder recipe in 2 CPU processes (gloo).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import random_texts, tiny_config
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

pytest.importorskip("datasets", reason="the recipes need the train extra: pip install -e '.[train]'")
pytest.importorskip("accelerate", reason="the recipes need the train extra: pip install -e '.[train]'")

TRAINING = Path(__file__).resolve().parents[2] / "training"
# Enough steps at a high learning rate for a random 2-layer model to fit 24 pairs a little.
FAST = ["--batch-size", "8", "--lr", "3e-3", "--logging-steps", "1", "--save-steps", "2", "--eval-steps", "4"]


def load_recipe(name: str) -> ModuleType:
    """Import training/<name>.py (a script, not a package) by its path."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", TRAINING / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A saved random st-mamba model; also a transformers-format Mamba checkpoint with its tokenizer."""
    from st_mamba import from_config

    model = from_config(
        tiny_config(1), tokenizer_dir, seed=0, max_seq_length=64,
        prompts={"query": "query: ", "document": "passage: "}, device="cpu",
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory) -> Path:
    """32 documents; query i is a few words of document i; 24 train and 8 test queries."""
    folder = tmp_path_factory.mktemp("tiny-beir")
    (folder / "qrels").mkdir()
    documents = random_texts(32, seed=1, max_words=30)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as corpus:
        for i, text in enumerate(documents):
            corpus.write(json.dumps({"_id": f"d{i}", "title": f"doc {i}", "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as queries:
        for i, text in enumerate(documents):
            words = text.split()
            queries.write(json.dumps({"_id": f"q{i}", "text": " ".join(words[:3] + words[-2:])}) + "\n")
    for split, ids in (("train", range(24)), ("test", range(24, 32))):
        with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as qrels:
            qrels.write("query-id\tcorpus-id\tscore\n")
            qrels.writelines(f"q{i}\td{i}\t1\n" for i in ids)
    return folder


def train_pairs(beir: Path) -> list[tuple[str, str]]:
    corpus, queries, relevant = load_recipe("train_beir_folder").read_beir(beir, "train")
    return [(queries[qid], corpus[doc_id]) for qid, doc_ids in sorted(relevant.items()) for doc_id in doc_ids]


def in_batch_loss(model: SentenceTransformer, pairs: list[tuple[str, str]]) -> float:
    """InfoNCE of every training query against all training documents, as the recipes' loss computes it."""
    with torch.no_grad():
        queries = model.encode_query([q for q, _ in pairs], convert_to_tensor=True)
        documents = model.encode_document([d for _, d in pairs], convert_to_tensor=True)
    return F.cross_entropy(20.0 * queries @ documents.T, torch.arange(len(pairs))).item()


@pytest.fixture
def spy_resume(monkeypatch) -> list[str]:
    """Records the checkpoint folders the trainer resumes from."""
    loaded = []
    original = SentenceTransformerTrainer._load_from_checkpoint

    def load_and_record(self, checkpoint_path, *args, **kwargs):
        loaded.append(Path(checkpoint_path).name)
        return original(self, checkpoint_path, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformerTrainer, "_load_from_checkpoint", load_and_record)
    return loaded


def check_run(recipe: str, common: list[str], output: Path, pairs, start: SentenceTransformer, spy_resume) -> None:
    """Train 4 steps, resume for 2 more, then check the checkpoints, the loss and the saved model."""
    main = load_recipe(recipe).main
    first = main([*common, *FAST, "--output", str(output), "--max-steps", "4"])
    checkpoints = output.with_name(output.name + "-checkpoints")
    assert first.state.global_step == 4
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert any("eval_" in key for entry in first.state.log_history for key in entry)  # evaluated during training

    resumed = main([*common, *FAST, "--output", str(output), "--max-steps", "6", "--resume"])
    assert spy_resume == ["checkpoint-4"]
    assert resumed.state.global_step == 6
    assert (checkpoints / "checkpoint-6").is_dir()

    trained = SentenceTransformer(str(output), trust_remote_code=True, device="cpu")
    assert type(trained[0]).__name__ == "MambaEncoder"
    assert trained.prompts["query"] == "query: "
    assert (output / "README.md").is_file()
    before, after = in_batch_loss(start, pairs), in_batch_loss(trained, pairs)
    assert after < before, f"{recipe}: training-set loss went from {before:.3f} to {after:.3f}"


def test_train_beir_folder(tiny_model_dir, tiny_beir, tmp_path, spy_resume):
    start = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, device="cpu")
    common = ["--data", str(tiny_beir), "--model", str(tiny_model_dir), "--hard-negatives", "1",
              "--no-gradient-checkpointing"]  # fmt: skip
    check_run("train_beir_folder", common, tmp_path / "beir-model", train_pairs(tiny_beir), start, spy_resume)


def test_train_msmarco_from_local_triplets(tiny_model_dir, tiny_beir, tmp_path, spy_resume):
    pairs = train_pairs(tiny_beir)
    triplets = tmp_path / "triplets.jsonl"
    with open(triplets, "w", encoding="utf-8") as rows:
        for i, (query, positive) in enumerate(pairs):
            rows.write(json.dumps({"query": query, "positive": positive, "negative": pairs[i - 1][1]}) + "\n")
    # --backbone: a saved st-mamba model is also a transformers-format Mamba checkpoint with a tokenizer
    common = ["--train-files", str(triplets), "--eval-folder", str(tiny_beir), "--backbone", str(tiny_model_dir),
              "--max-seq-length", "64", "--no-gradient-checkpointing"]  # fmt: skip
    start = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, device="cpu")
    check_run("train_msmarco", common, tmp_path / "msmarco-model", pairs, start, spy_resume)


def test_train_long_documents_from_beir_folder(tiny_model_dir, tiny_beir, tmp_path, spy_resume):
    common = ["--data", str(tiny_beir), "--model", str(tiny_model_dir), "--max-seq-length", "48",
              "--chunk-size", "24", "--mini-batch-size", "8"]  # fmt: skip
    start = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, device="cpu")
    check_run("train_long_documents", common, tmp_path / "long-model", train_pairs(tiny_beir), start, spy_resume)


def test_gradient_checkpointing_reaches_the_backbone(tiny_model_dir):
    model = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, device="cpu")
    features = model.preprocess(["a short text", "a somewhat longer text to read"])
    reference = torch.autograd.grad(model(dict(features))["sentence_embedding"].sum(), list(model.parameters()))

    model.gradient_checkpointing_enable()  # what the recipes call; ST forwards it to MambaEncoder
    assert model[0].backbone.gradient_checkpointing
    model.train()
    checkpointed = torch.autograd.grad(model(dict(features))["sentence_embedding"].sum(), list(model.parameters()))
    for (name, _), expected, actual in zip(model.named_parameters(), reference, checkpointed, strict=True):
        torch.testing.assert_close(actual, expected, msg=lambda m, name=name: f"{name}: {m}")
    with pytest.raises(ValueError, match="non-reentrant"):
        model[0].gradient_checkpointing_enable({"use_reentrant": True})


@pytest.mark.slow
def test_ddp_two_cpu_processes_gather_negatives(tiny_model_dir, tiny_beir, tmp_path):
    output = tmp_path / "ddp-model"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(TRAINING / "train_beir_folder.py"), "--data", str(tiny_beir), "--model", str(tiny_model_dir),
        "--output", str(output), "--max-steps", "3", "--batch-size", "4", "--save-steps", "3",
        "--eval-steps", "0", "--no-eval-before",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (output.with_name("ddp-model-checkpoints") / "checkpoint-3").is_dir()
    state = json.loads((output.with_name("ddp-model-checkpoints") / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["epoch"] == 1.0  # 3 steps x 4 queries x 2 processes = the 24 training pairs: the data was sharded
    card = (output / "README.md").read_text(encoding="utf-8")
    assert '"gather_across_devices": true' in card
    trained = SentenceTransformer(str(output), trust_remote_code=True, device="cpu")
    assert trained.encode(["query: anything"]).shape == (1, tiny_config(1).d_model)

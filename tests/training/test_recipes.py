"""The training recipes end to end, offline: a tiny random st-mamba model on a tiny BEIR folder.

Each recipe's ``main()`` trains a few steps, writes checkpoints, resumes from the last one and saves a
model that loads with ``SentenceTransformer(path, trust_remote_code=True)``; the in-batch InfoNCE loss
on the training pairs must go down. The DDP test runs the BEIR-folder recipe in 2 CPU processes (gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

from tests.conftest import tiny_config
from tests.training.conftest import TRAINING, load_recipe

pytest.importorskip("datasets", reason="the recipes need the train extra: pip install -e '.[train]'")
pytest.importorskip("accelerate", reason="the recipes need the train extra: pip install -e '.[train]'")

# Enough steps at a high learning rate for a random 2-layer model to fit 24 pairs a little.
FAST = ["--batch-size", "8", "--lr", "3e-3", "--logging-steps", "1", "--save-steps", "2", "--eval-steps", "4"]


def train_pairs(beir: Path) -> list[tuple[str, str]]:
    common = load_recipe("_common")
    return common.relevant_pairs(common.read_beir(beir, "train"))


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


@pytest.mark.usefixtures("one_thread")
def test_train_beir_folder(tiny_model_dir, tiny_beir, tmp_path, spy_resume):
    start = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, device="cpu")
    common = ["--data", str(tiny_beir), "--model", str(tiny_model_dir), "--hard-negatives", "1",
              "--no-gradient-checkpointing"]  # fmt: skip
    check_run("train_beir_folder", common, tmp_path / "beir-model", train_pairs(tiny_beir), start, spy_resume)


@pytest.mark.usefixtures("one_thread")
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


@pytest.mark.usefixtures("one_thread")
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

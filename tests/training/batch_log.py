"""Writes down the batches a training run sees, step by step; can SIGKILL the run in the middle of a step.

Used by ``test_resume.py`` in the test process (through ``monkeypatch``) and in the training subprocess
that it kills, so both record the same way.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

from sentence_transformers import SentenceTransformerTrainer


def logging_training_step(log: Path, kill_during_step: int | None = None) -> Callable:
    """A replacement for ``SentenceTransformerTrainer.training_step`` that appends each step's texts to ``log``.

    One JSON line per optimizer step: ``{"step": n, "query": [...], "document": [...], ...}``, every text
    column of the batch decoded from its token ids (prompts included, padding left out). With
    ``kill_during_step`` the process sends itself SIGKILL as that step starts: nothing after the last
    checkpoint survives, as when a machine is lost.
    """
    original = SentenceTransformerTrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        step = self.state.global_step + 1
        if step == kill_during_step:
            os.kill(os.getpid(), signal.SIGKILL)
        decode = self.model.tokenizer.batch_decode
        texts = {
            key.removesuffix("_input_ids"): decode(value, skip_special_tokens=True)
            for key, value in inputs.items()
            if key.endswith("_input_ids")
        }
        with open(log, "a", encoding="utf-8") as lines:
            lines.write(json.dumps({"step": step, **texts}) + "\n")
        return original(self, model, inputs, *args, **kwargs)

    return training_step


def read_log(log: Path) -> dict[int, dict[str, list[str]]]:
    """step -> {column: texts of that step's batch}."""
    steps = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        steps[entry.pop("step")] = entry
    return steps

"""Issue #4: a killed training run resumes from its last checkpoint with the same data order.

``train_beir_folder.py`` trains 12 steps (2 epochs of 6 batches of 4 pairs) without interruption while
every step's batch is written down. The same command then runs as a script in a subprocess, writes
checkpoint-8 and is killed with SIGKILL as step 10 starts; ``--resume`` continues from checkpoint-8.
Step 9 lies inside the second epoch, so both the sampler's per-epoch shuffle and the skipping of the
epoch's first two batches have to be right for steps 9-12 to see the uninterrupted run's batches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from sentence_transformers import SentenceTransformerTrainer

from tests.training.batch_log import logging_training_step, read_log
from tests.training.conftest import TRAINING, load_recipe

pytest.importorskip("datasets", reason="the recipes need the train extra: pip install -e '.[train]'")
pytest.importorskip("accelerate", reason="the recipes need the train extra: pip install -e '.[train]'")

STEPS, CHECKPOINT, KILLED_DURING = 12, 8, 10
RUN = [
    "--batch-size", "4", "--lr", "3e-3", "--max-steps", str(STEPS), "--save-steps", str(CHECKPOINT),
    "--eval-steps", "0", "--no-eval-before", "--logging-steps", "4", "--no-gradient-checkpointing", "--seed", "5",
]  # fmt: skip
# The recipe as a script, with the batch log in place: python -c DRIVER LOG KILL_DURING_STEP SCRIPT ARGS...
DRIVER = """
import runpy, sys
from pathlib import Path
from sentence_transformers import SentenceTransformerTrainer
from tests.training.batch_log import logging_training_step

log, kill_during_step, script, *args = sys.argv[1:]
SentenceTransformerTrainer.training_step = logging_training_step(Path(log), int(kill_during_step))
sys.argv = [script, *args]
sys.path.insert(0, str(Path(script).parent))  # what `python training/<recipe>.py` does
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.usefixtures("one_thread")
def test_killed_run_resumes_from_its_checkpoint_with_the_same_batches(tiny_model_dir, tiny_beir, tmp_path, monkeypatch):
    recipe = load_recipe("train_beir_folder")
    command = ["--data", str(tiny_beir), "--model", str(tiny_model_dir), *RUN]

    # The reference: all steps in one go
    monkeypatch.setattr(SentenceTransformerTrainer, "training_step", logging_training_step(tmp_path / "reference.log"))
    reference_model = recipe.main([*command, "--output", str(tmp_path / "reference")]).model
    reference = read_log(tmp_path / "reference.log")
    assert sorted(reference) == list(range(1, STEPS + 1))
    first_epoch, second_epoch = (
        [q for step in steps for q in reference[step]["query"]] for steps in (range(1, 7), range(7, 13))
    )
    assert len(set(first_epoch)) == 24 and sorted(first_epoch) == sorted(second_epoch)  # every pair once an epoch
    assert first_epoch != second_epoch, "each epoch is shuffled anew"

    # The same command as a script, killed as step 10 starts: checkpoint-8 and nothing after it survives
    output = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed_log = tmp_path / "killed.log"
    arguments = [str(killed_log), str(KILLED_DURING), str(TRAINING / "train_beir_folder.py"), *command]
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, *arguments, "--output", str(output)],
        cwd=TRAINING.parent, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-4000:]
    assert read_log(killed_log) == {step: reference[step] for step in range(1, KILLED_DURING)}
    checkpoints = output.with_name("killed-checkpoints")
    assert sorted(path.name for path in checkpoints.iterdir()) == [f"checkpoint-{CHECKPOINT}"]
    assert not output.exists()

    # --resume: from checkpoint-8, steps 9 to 12 see the reference's batches, in its order
    monkeypatch.setattr(SentenceTransformerTrainer, "training_step", logging_training_step(tmp_path / "resumed.log"))
    resumed_trainer = recipe.main([*command, "--output", str(output), "--resume"])
    assert resumed_trainer.state.global_step == STEPS
    resumed = read_log(tmp_path / "resumed.log")
    assert sorted(resumed) == list(range(CHECKPOINT + 1, STEPS + 1))
    for step, batch in resumed.items():
        assert batch == reference[step], f"step {step}: resumed batch differs from the uninterrupted run's"

    # ... and ends with the reference's weights (the steps before the kill ran in another process)
    resumed_weights = resumed_trainer.model.state_dict()
    for name, expected in reference_model.state_dict().items():
        torch.testing.assert_close(resumed_weights[name], expected, msg=lambda m, name=name: f"{name}: {m}")

"""The GPU run: data and teacher targets, the students, evaluation and speed, written as it goes; and the sweep."""

from __future__ import annotations

import gzip
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

import st_mamba
from training.distill import settings
from training.distill.checkpoints import checkpoint_meta
from training.distill.data import read_jsonl_xz, split_held_out, teacher_targets, token_counts, tokenize
from training.distill.evaluate import encoding_speed, evaluate_all, fixed_length_texts
from training.distill.prepare import relation_teacher_source
from training.distill.students import (
    as_saved,
    build_mamba_student,
    build_student,
    initialise_from_teacher,
    parameter_count,
    start_from_model,
    text_reading,
    training_reading,
    training_settings,
)
from training.distill.train import TrainData, held_out_cosine, train_student

logger = logging.getLogger("distill")


@dataclass
class RunRecord:
    """A command's ``results.json.gz``: what it measured so far, and when each step ended."""

    results: dict
    started: float
    output: Path

    def save(self) -> None:
        with gzip.open(self.output / "results.json.gz", "wt", encoding="utf-8") as out:
            json.dump(self.results, out)

    def mark(self, name: str) -> None:
        self.results["timings"][name] = round(time.time() - self.started, 1)
        logger.info("== %s at %.1f s", name, time.time() - self.started)
        self.save()


@dataclass
class Prepared:
    """What every training command needs: the data with its teacher targets, and the run's record."""

    data: TrainData
    held_out: list[int]
    kinds: list[str]  # each text's kind (query, passage, segment, sentence)
    texts: list[str]
    teacher: SentenceTransformer
    device: str
    record: RunRecord


def prepare_training(work: Path, output: Path, run_settings: dict, reading: dict[str, bool]) -> Prepared:
    """Steps 2-3 on the best device: the corpus, a held-out set, GPT-NeoX ids, the teacher's targets.

    ``reading``: how the students read the texts (the ids; ``training_reading``); the teacher reads them as they are.
    """
    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    output.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                     "settings": {**run_settings, "transformer": settings.TRANSFORMER,
                                  **{key: getattr(settings, name) for key, name, _ in settings.CHECKPOINT_RECIPE},
                                  "relation_scale": settings.RELATION_SCALE, "mse_weight": settings.MSE_WEIGHT, "mnrl": [settings.MNRL_EVERY, settings.MNRL_BATCH, settings.MNRL_WEIGHT]},
                     "log": [], "timings": {}}  # fmt: skip

    # 2. Data: the corpus, a held-out set, GPT-NeoX ids
    records = read_jsonl_xz(work / "corpus" / "corpus.jsonl.xz")
    pair_rows = read_jsonl_xz(work / "corpus" / "pairs.jsonl.xz")
    texts, kinds = [row["text"] for row in records], [row["kind"] for row in records]
    train, held_out = split_held_out(records, settings.HELD_OUT, settings.SEED)
    tokenizer = st_mamba.load_tokenizer(work / "gpt-neox-20b", settings.EOS_ID)

    def student_ids(strings: list[str], limit: int) -> list[np.ndarray]:
        return tokenize(tokenizer, strings, limit, reading)

    ids = student_ids(texts, settings.MAX_TRAIN_TOKENS - 1)
    pairs = list(zip(student_ids([row["query"] for row in pair_rows], settings.MNRL_MAX_TOKENS - 1),
                     student_ids([row["document"] for row in pair_rows], settings.MNRL_MAX_TOKENS - 1), strict=True))  # fmt: skip
    results["corpus"] = {"texts": len(texts), "train_texts": len(train), "held_out": len(held_out),
                         "gpt_neox_tokens": int(sum(len(row) for row in ids)), "pairs": len(pairs),
                         "text_reading": reading}  # fmt: skip
    record = RunRecord(results, started, output)
    record.mark("tokenized")

    # 3. Teacher targets
    teacher = SentenceTransformer(str(work / "teacher"), device=device)
    if device == "cuda":
        teacher.half()
    else:
        teacher.float()  # saved in fp16, which is slow on CPU
    data = TrainData(ids, teacher_targets(teacher, texts), train, pairs, pad_id=tokenizer.eos_token_id)
    record.mark("teacher_targets")
    if settings.RELATION_TEACHER:  # a second teacher, whose cosines the relation term teaches
        folder = work / settings.RELATION_TEACHER  # an absolute path stays as it is
        second = SentenceTransformer(str(folder), device=device)
        second = second.half() if device == "cuda" else second.float()
        dim, window = second.get_embedding_dimension(), second.max_seq_length
        data.relation_targets = teacher_targets(second, texts, window=window, dim=dim)
        results["settings"]["relation_teacher"] = {**relation_teacher_source(folder), "dim": dim, "window": window}
        del second
        record.mark("relation_targets")
    return Prepared(data, held_out, kinds, texts, teacher, device, record)


def untrained_student(name: str, work: Path, teacher_dir: Path) -> SentenceTransformer:
    """The Mamba student ``name`` as training would start it: teacher-initialised if its variant says so, a
    weighted-mean student's weights from the training texts of ``work``'s corpus (the same held-out split)."""
    variant = settings.STUDENT_VARIANTS[name]
    model = build_mamba_student(work / "gpt-neox-20b", **variant)
    if variant.get("init") == "teacher":
        counts = None
        if variant["pooling"] == "weighted-mean":
            records = read_jsonl_xz(work / "corpus" / "corpus.jsonl.xz")
            train, _ = split_held_out(records, settings.HELD_OUT, settings.SEED)
            texts = [records[i]["text"] for i in train]
            ids = tokenize(model.tokenizer, texts, settings.MAX_TRAIN_TOKENS - 1, text_reading(variant))
            counts = token_counts(ids, list(range(len(ids))), variant["config"]["vocab_size"])
        initialise_from_teacher(model, SentenceTransformer(str(teacher_dir), device="cpu").float(), counts)
    as_saved(model)
    return model


def sweep(work: Path, output: Path, names: list[str], seconds: float, scratch: Path) -> dict:
    """Train each named student ``seconds`` on the same first batches; its held-out cosine to the teacher.

    Equal time, not equal steps: a student with faster kernels takes more steps, as it would in ``train``.
    """
    unknown = sorted(set(names) - set(settings.STUDENT_VARIANTS) - {"transformer"})
    if unknown:
        raise SystemExit(f"unknown students {unknown}; known: {sorted(settings.STUDENT_VARIANTS)} and 'transformer'")
    reading = training_reading(names)
    run = prepare_training(
        work,
        output,
        {"sweep_seconds": seconds, "variants": {n: settings.STUDENT_VARIANTS.get(n) for n in names}},
        reading,
    )
    results = run.record.results
    results["sweep"] = {}
    for name in names:
        model, kind, training = build_student(name, work, scratch, run.teacher, reading["do_lower_case"], run.data)
        try:
            train = train_student(model, kind, run.data, run.device, None, seconds, results["log"], **training)
        except Exception as error:  # one failing student (a kernel, memory) must not cost the others' results
            logger.exception("%s failed", name)
            results["sweep"][name] = {"error": repr(error)}
        else:
            results["sweep"][name] = {"train": train, "parameters": parameter_count(model),
                                      "held_out_cosine": held_out_cosine(model, kind, run.data, run.held_out, run.kinds, run.device)}  # fmt: skip
        run.record.mark(name)
        del model
        if run.device == "cuda":
            torch.cuda.empty_cache()
    return results


def run_training(
    work: Path,
    output: Path,
    resume: Path | None,
    student: str = settings.STUDENT,
    smoke: bool = False,
    seconds: float | None = None,
    control: bool = True,
    run_seconds: float = settings.RUN_SECONDS,
    extend_to: float | None = None,
    steps: int | None = None,
    extend_to_steps: int | None = None,
    init_from: Path | None = None,
    learning_rate: float | None = None,
) -> dict:
    """Steps 2-7 on the best device: targets, both students, evaluation, speed; writes results as it goes.

    ``seconds``: the Mamba student's training time (default ``TRAIN_SECONDS``). ``control=False`` trains
    no Transformer: a longer Mamba run in one call, compared with a control from another run.
    ``run_seconds``: the whole command's time, after which no evaluation or speed test starts.
    ``extend_to``: with ``resume``, train the checkpoint's student until it has trained this many seconds in all;
    ``extend_to_steps``: likewise for a checkpoint of a run planned in steps, until this many steps in all.
    ``steps``: train the Mamba student this many steps instead of ``seconds``: the same schedule and batches on
    any card (a new run only; a resumed one keeps its checkpoint's plan).
    ``init_from``: a saved model folder of this student (the shipped model, say) whose weights the student starts
    from instead of the teacher's token table: training goes on from an earlier run's model, on this run's corpus
    and schedule (a new run, without the control, which would start from the teacher). ``learning_rate``: the peak
    learning rate, instead of the student's.
    """
    variant = settings.STUDENT_VARIANTS[student]
    if steps is not None and (resume is not None or seconds is not None or steps < 1):
        raise SystemExit(f"steps={steps} plans a new run in steps (at least 1), without seconds or resume")
    seconds = settings.TRAIN_SECONDS if seconds is None else seconds
    run_settings = {"student": student, "mamba": variant, "train_seconds": None if steps else seconds,
                    "train_steps": steps, "control": control}  # fmt: skip
    reading = training_reading([student], control)  # refused before the data and the targets are made
    started = None  # the student with a saved model's weights: checked before the data and the targets are made
    if init_from is not None:
        if resume is not None or control:
            raise SystemExit("--init-from starts a new run from a saved model: it takes --no-control, and no --resume")
        started = build_mamba_student(work / "gpt-neox-20b", **variant)
        run_settings["init_from"] = start_from_model(started, init_from, variant)
    if learning_rate is not None:
        if not learning_rate > 0:
            raise SystemExit(f"the peak learning rate is positive, not {learning_rate}")
        run_settings["learning_rate"] = learning_rate
    if resume is not None:  # checked before the data and the teacher's targets are made
        resumed = checkpoint_meta(resume)
        if resumed.get("student", student) != student:
            raise SystemExit(f"{resume} holds a checkpoint of student {resumed['student']!r}, not {student!r}")
        if resumed.get("text_reading", reading) != reading:
            raise SystemExit(f"{resume} trained on texts read as {resumed['text_reading']}, this run reads {reading}")
        run_settings |= {"resumed_from": resumed, "extend_to": extend_to, "extend_to_steps": extend_to_steps}
    if settings.RELATION_TEACHER and not (work / settings.RELATION_TEACHER / "modules.json").is_file():
        raise SystemExit(f"the relation teacher {work / settings.RELATION_TEACHER} is not a Sentence-Transformers folder "
                         "(python -m training.distill relation-teacher writes one)")  # fmt: skip
    run = prepare_training(work, output, run_settings, reading)
    deadline = run.record.started + run_seconds
    stop_training = deadline - settings.EVALUATION_RESERVE_SECONDS  # what was trained is always evaluated
    results, teacher = run.record.results, run.teacher
    data, held_out, kinds, device = run.data, run.held_out, run.kinds, run.device

    # 4. The Mamba student
    if started is None:
        mamba, _, training = build_student(student, work, output, teacher, reading["do_lower_case"], data)
    else:  # not started from the teacher: no token table to make
        mamba, training = started, training_settings(variant)
    if learning_rate is not None:
        training["peak_learning_rate"] = learning_rate
    results["parameters"] = {"mamba": parameter_count(mamba)}
    results["held_out_cosine"] = {
        "mamba@init": held_out_cosine(mamba.to(device), "mamba", data, held_out, kinds, device)
    }
    meta = {"student": student, "config": variant["config"], "pooling": variant["pooling"],
            "do_lower_case": reading["do_lower_case"], "text_reading": reading}  # fmt: skip
    results["train"] = {"mamba": train_student(mamba, "mamba", data, device, steps, seconds, results["log"],
                                               checkpoint_dir=output, resume=resume, checkpoint_meta=meta,
                                               extend_to=extend_to, extend_to_steps=extend_to_steps,
                                               stop_at=stop_training, **training)}  # fmt: skip
    results["held_out_cosine"]["mamba"] = held_out_cosine(mamba, "mamba", data, held_out, kinds, device)
    run.record.mark("mamba_trained")

    # 5. The Transformer control: same batches, same number of steps
    models = {"mamba": mamba, "teacher": teacher}  # in the order they are evaluated
    if control:
        scratch = Path(tempfile.mkdtemp(prefix="distill-transformer-")) if not smoke else output / "tf"
        transformer, _, _ = build_student(
            "transformer", work, scratch, teacher, reading["do_lower_case"], data, like=student
        )
        results["parameters"]["transformer"] = parameter_count(transformer)
        results["held_out_cosine"]["transformer@init"] = held_out_cosine(
            transformer.to(device), "transformer", data, held_out, kinds, device
        )
        steps, mamba_seconds = results["train"]["mamba"]["steps"], results["train"]["mamba"]["trained_seconds"]
        results["train"]["transformer"] = train_student(  # a resumed Mamba run's steps and time count in full
            transformer, "transformer", data, device, steps, mamba_seconds, results["log"], stop_at=stop_training
        )
        results["held_out_cosine"]["transformer"] = held_out_cosine(
            transformer, "transformer", data, held_out, kinds, device
        )
        run.record.mark("transformer_trained")
        models["transformer"] = transformer

    # 6. Evaluation (runs only; scored with ir-measures by the `score` subcommand)
    as_saved(mamba)
    results["runs"] = evaluate_all(models, work / "data", deadline - 25)
    run.record.mark("evaluated")

    # 7. Speed on this device, every model in fp16 (the teacher already is)
    if time.time() < deadline - 20:
        for name, model in models.items():
            if name != "teacher":
                model.half()
        texts_by_length = {512: fixed_length_texts(mamba.tokenizer, run.texts[:2000], 512, 256 if not smoke else 4),
                           8192: fixed_length_texts(mamba.tokenizer, run.texts[:2000], 8192, 32 if not smoke else 2)}  # fmt: skip
        results["speed"] = encoding_speed(models, texts_by_length, device)
        run.record.mark("speed")
    return results

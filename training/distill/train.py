"""Training a student on the teacher's targets (plus MNRL on real pairs, and optionally the batch's similarities),
and its held-out cosine."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MSELoss, MultipleNegativesRankingLoss

from training.distill import settings
from training.distill.checkpoints import checkpoint_tensors, load_checkpoint, restore, save_checkpoint
from training.distill.data import batch_schedule, collate
from training.distill.students import is_token_embedding

logger = logging.getLogger("distill")


def _move(tensor: torch.Tensor, device: str) -> torch.Tensor:
    """To ``device``; to a GPU through pinned memory, without making the host wait for the GPU's queue."""
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _to(features: dict, device: str) -> dict:
    return {key: _move(value, device) if isinstance(value, torch.Tensor) else value for key, value in features.items()}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class TrainData:
    ids: list[np.ndarray]  # GPT-NeoX ids of every corpus text
    targets: torch.Tensor  # (N, 384) teacher targets
    train: list[int]
    pairs: list[
        tuple[np.ndarray, np.ndarray]
    ]  # GPT-NeoX ids of (claim, abstract), abstracts cut to settings.MNRL_MAX_TOKENS
    pad_id: int  # EOS of GPT-NeoX (also the Transformer's pad)
    # (N, dim) a second teacher's embeddings of the texts, whose cosines the relation term teaches (settings.RELATION_TEACHER)
    relation_targets: torch.Tensor | None = None


def learning_rate(progress: float, peak: float = settings.LEARNING_RATE) -> float:
    """Linear warm-up to ``peak`` over the first ``WARMUP_SHARE`` of training, then linear decay to 0 at the end."""
    return peak * max(
        0.0, min(1.0, (progress + 1e-3) / settings.WARMUP_SHARE, (1.0 - progress) / (1.0 - settings.WARMUP_SHARE))
    )


def mnrl_batch(
    pairs: list[tuple[np.ndarray, np.ndarray]], rng: random.Random
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``MNRL_BATCH`` pairs with distinct abstracts (several claims cite one abstract: no false in-batch negatives)."""
    picked: dict[bytes, int] = {}
    distinct = len({document.tobytes() for _, document in pairs})
    while len(picked) < min(settings.MNRL_BATCH, distinct):
        index = rng.randrange(len(pairs))
        picked.setdefault(pairs[index][1].tobytes(), index)
    chosen = [pairs[index] for index in picked.values()]
    return [query for query, _ in chosen], [document for _, document in chosen]


def relation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    scale: float,
    bank: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    teacher_bank: torch.Tensor | None = None,
) -> torch.Tensor:
    """How far the student's view of a batch is from the teacher's: for each text, the KL divergence from the
    teacher's to the student's softmax over its cosines x ``scale`` to other texts, averaged over the texts.

    ``student`` and ``teacher`` hold one row per text; the teacher's rows may have another width (a second teacher
    whose cosines the student learns, beside targets in the first one's space). Without ``bank`` the other texts
    are the batch's (0 for a batch of fewer than three texts, where each has at most one batch mate): student cosines
    between students, teacher cosines between teacher rows. With ``bank``, (K, student width) embeddings of other
    texts in the student's space (their targets), each text's cosines go to the bank's rows: the student's against
    ``bank``, the teacher's against ``teacher_bank``, the same texts in the teacher's space (default ``bank``).
    ``exclude``, (texts, K) bool, leaves out rows that are the text itself.

    Matching each target alone weighs every direction of the error alike; this term weighs the error by what it does
    to the order of a text's neighbours, the order that retrieval reads.
    """
    if student.dim() != 2 or teacher.dim() != 2 or len(student) != len(teacher):
        raise ValueError(f"student and teacher embeddings are (texts, dim) with one row per text, not "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")  # fmt: skip
    if bank is None and (exclude is not None or teacher_bank is not None):
        raise ValueError("exclude and teacher_bank name bank rows: they need a bank")
    if bank is not None:
        teacher_bank = bank if teacher_bank is None else teacher_bank
        if bank.dim() != 2 or bank.shape[1] != student.shape[1]:
            raise ValueError(f"the bank is (rows, {student.shape[1]}) embeddings, not {tuple(bank.shape)}")
        if teacher_bank.dim() != 2 or tuple(teacher_bank.shape) != (len(bank), teacher.shape[1]):
            raise ValueError(f"the teacher's bank is {(len(bank), teacher.shape[1])}, not {tuple(teacher_bank.shape)}")
        if exclude is not None and tuple(exclude.shape) != (len(student), len(bank)):
            raise ValueError(f"exclude is (texts, bank rows) = {(len(student), len(bank))}, not {tuple(exclude.shape)}")
    elif len(student) < 3:
        return student.new_zeros((), dtype=torch.float32)
    with torch.autocast(student.device.type, enabled=False):  # in fp32 under a bf16 step too
        student = torch.nn.functional.normalize(student.float(), dim=-1)
        teacher = torch.nn.functional.normalize(teacher.float(), dim=-1)
        if bank is None:
            keys_student, keys_teacher = student, teacher
            # A text is not its own neighbour.
            exclude = torch.eye(len(student), dtype=torch.bool, device=student.device)
        else:
            keys_student = torch.nn.functional.normalize(bank.float(), dim=-1)
            keys_teacher = torch.nn.functional.normalize(teacher_bank.float(), dim=-1)
        # Left-out keys take a large finite logit, not -inf, so that 0 x (their log-ratio) stays 0.
        student_logits, teacher_logits = scale * student @ keys_student.T, scale * teacher @ keys_teacher.T
        if exclude is not None:
            student_logits = student_logits.masked_fill(exclude, -1e4)
            teacher_logits = teacher_logits.masked_fill(exclude, -1e4)
        student_log = torch.log_softmax(student_logits, dim=-1)
        teacher_log = torch.log_softmax(teacher_logits, dim=-1)
        return torch.nn.functional.kl_div(student_log, teacher_log, log_target=True, reduction="batchmean")


def relation_bank(train: np.ndarray, batch: list[int], step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank of step ``step``: ``size`` of the ``train`` texts (corpus indices) drawn at random without
    replacement, the same draw for a step however often it is made (a resumed run draws as the first did), and
    which of them are the batch's own texts, (len(batch), size) bool."""
    if not 0 < size <= len(train):
        raise ValueError(f"a relation bank holds 1 to {len(train):,} texts (the training texts), not {size}")
    rows = train[np.random.default_rng((settings.SEED, step)).choice(len(train), size, replace=False)]
    return torch.from_numpy(rows), torch.from_numpy(np.asarray(batch)[:, None] == rows[None, :])


def training_autocast(device: str) -> torch.autocast:
    """Where a student's forward and losses run: under bf16 autocast with ``TRAIN_PRECISION`` "bf16" (the weights,
    their gradients and AdamW stay fp32), else as they are (a disabled autocast)."""
    if settings.TRAIN_PRECISION not in settings.PRECISIONS:
        raise ValueError(f"training precision {settings.TRAIN_PRECISION!r} is not one of {settings.PRECISIONS}")
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=settings.TRAIN_PRECISION == "bf16")


def train_student(
    model: SentenceTransformer,
    kind: str,
    data: TrainData,
    device: str,
    total_steps: int | None,
    seconds: float,
    log: list,
    checkpoint_dir: Path | None = None,
    resume: Path | None = None,
    peak_learning_rate: float = settings.LEARNING_RATE,
    checkpoint_meta: dict | None = None,
    extend_to: float | None = None,
    stop_at: float | None = None,
    table_learning_rate: float = 1.0,
    extend_to_steps: int | None = None,
) -> dict:
    """Train for ``total_steps``, or with ``total_steps=None`` for ``seconds`` of wall time.

    The learning rate follows the share of training done: of the steps, or of the seconds, so that
    a stall (Triton compiling a kernel the first time it meets a shape) costs steps, not the schedule.
    ``checkpoint_meta`` (the student's config and pooling) goes into the checkpoints with the progress.
    A resumed run keeps its checkpoint's plan; ``extend_to`` stretches a timed one to that many seconds of
    training in all, finished or not, and ``extend_to_steps`` one planned in steps to that many steps: the
    learning rate goes back up to the schedule's value at the share already trained and decays to 0 over the
    rest. ``table_learning_rate``: the token table's rate as a share
    of the others' (0: the table stays as it starts). ``stop_at`` (a ``time.time()``) ends training early, so
    that what was trained is still evaluated: the result's ``stopped_early`` says so.
    """
    model.to(device).train()
    # Training reads every text in one pass. The saved Mamba student streams texts past its chunk_size
    # (bounded memory at inference): the same gradients, but an 8K-token batch then launches four times
    # the kernels and left the H200 idle half of the step (benchmarks/bench_train_step.py).
    saved_chunk_size = getattr(model[0], "chunk_size", None)
    if saved_chunk_size is not None:
        model[0].chunk_size = None
    # No decay on the token table: rows of tokens a batch does not hold would shrink towards 0 unread. The table
    # learns at ``table_learning_rate`` times the others' rate; at 0 it is fixed and out of the optimiser.
    if table_learning_rate < 0:
        raise ValueError(f"table_learning_rate is a share of the learning rate, >= 0, not {table_learning_rate}")
    table = [p for n, p in model.named_parameters() if is_token_embedding(n)]
    if table_learning_rate == 0:
        for param in table:
            param.requires_grad_(False)
    rest = [(n, p) for n, p in model.named_parameters() if not is_token_embedding(n)]
    groups = [{"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": settings.WEIGHT_DECAY, "share": 1.0},
              {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0, "share": 1.0}]  # fmt: skip
    if table_learning_rate > 0:
        groups.append({"params": table, "weight_decay": 0.0, "share": table_learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=peak_learning_rate, betas=(0.9, 0.98), eps=1e-6)
    autocast = training_autocast(device)
    mse, mnrl = MSELoss(model), MultipleNegativesRankingLoss(model)
    first_step, seconds_before = 0, 0.0
    if (extend_to is not None or extend_to_steps is not None) and resume is None:
        raise ValueError("extend_to and extend_to_steps continue a checkpoint: pass resume too")
    if extend_to is not None and extend_to_steps is not None:
        raise ValueError("a run is extended in seconds (extend_to) or in steps (extend_to_steps), not both")
    if resume is not None:
        tensors, meta = load_checkpoint(resume)
        if meta.get("max_batch_tokens", settings.MAX_BATCH_TOKENS) != settings.MAX_BATCH_TOKENS:
            raise ValueError(f"{resume} was trained on batches of {meta['max_batch_tokens']:,} tokens, not "
                             f"{settings.MAX_BATCH_TOKENS:,}: resume it with --batch-tokens {meta['max_batch_tokens']}")  # fmt: skip
        first_step, total_steps = meta["step"], meta["total_steps"]
        seconds, seconds_before = meta.get("seconds", seconds), meta.get("trained_seconds", 0.0)
        if extend_to is not None:
            if total_steps is not None or extend_to <= seconds_before:
                raise ValueError(f"cannot extend {resume} to {extend_to:g} s: it is planned in steps "
                                 f"({total_steps}) or has trained {seconds_before:g} s already")  # fmt: skip
            seconds = extend_to
        if extend_to_steps is not None:
            if total_steps is None or extend_to_steps <= first_step:
                raise ValueError(f"cannot extend {resume} to {extend_to_steps} steps: it is planned in seconds "
                                 f"or has trained {first_step} steps already")  # fmt: skip
            total_steps = extend_to_steps
        restore(model, optimizer, tensors, first_step)
    lengths = np.array(
        [min(len(row) + 1, settings.MAX_TRAIN_TOKENS) for row in data.ids]
    )  # the same batches for both students
    stream = batch_schedule(lengths, data.train, settings.SEED)
    train_rows = np.asarray(data.train)  # the relation term's bank is drawn from these
    rng = random.Random(settings.SEED + 1)
    start = time.perf_counter()
    last_checkpoint = start
    tokens = 0
    step = first_step
    stopped_early = False
    for _ in range(first_step):  # resume: skip the batches already seen, and the MNRL draws
        next(stream)
    for done in range(first_step):
        if done % settings.MNRL_EVERY == settings.MNRL_EVERY - 1:
            mnrl_batch(data.pairs, rng)

    def progress() -> float:
        if total_steps is None:
            return (seconds_before + time.perf_counter() - start) / seconds
        return step / total_steps

    def save() -> None:
        meta = {"step": step, "total_steps": total_steps, "seconds": seconds,
                **{key: getattr(settings, name) for key, name, _ in settings.CHECKPOINT_RECIPE},
                "trained_seconds": round(seconds_before + time.perf_counter() - start, 2), **(checkpoint_meta or {})}  # fmt: skip
        save_checkpoint(checkpoint_tensors(model, optimizer), meta, checkpoint_dir)

    while (done := progress()) < 1.0:
        epoch, batch = next(stream)
        rate = learning_rate(done, peak_learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = rate * group["share"]
        # The host prepares and queues the step without waiting for the GPU (no sync in the step; the
        # loss is read every 10th step), so collating the next batch overlaps the GPU's work.
        collated = collate([data.ids[i] for i in batch], kind, data.pad_id, model.max_seq_length)
        tokens += int(collated["attention_mask"].sum())
        features, labels = _to(collated, device), _move(data.targets[batch], device)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            embeddings = model(features)["sentence_embedding"]
            loss_mse = mse.compute_loss_from_embeddings([embeddings], [labels])
            loss = settings.MSE_WEIGHT * loss_mse
            loss_relation = None
            if settings.RELATION_WEIGHT:
                # the teacher's view: its targets, or a second teacher's embeddings of the same texts
                second = data.relation_targets
                views = labels if second is None else _move(second[batch], device)
                bank = exclude = teacher_bank = None
                if settings.RELATION_BANK:
                    rows, exclude = relation_bank(train_rows, batch, step, settings.RELATION_BANK)
                    bank, exclude = _move(data.targets[rows], device), _move(exclude, device)
                    teacher_bank = None if second is None else _move(second[rows], device)
                loss_relation = relation_loss(embeddings, views, settings.RELATION_SCALE, bank, exclude, teacher_bank)
                loss = loss + settings.RELATION_WEIGHT * loss_relation
        loss.backward()
        loss_mnrl = None
        if (
            data.pairs and step % settings.MNRL_EVERY == settings.MNRL_EVERY - 1
        ):  # a second backward: one graph in memory at a time
            pair_features = [_to(collate(texts, kind, data.pad_id), device) for texts in mnrl_batch(data.pairs, rng)]
            with autocast:
                loss_mnrl = mnrl(pair_features, None)
            (settings.MNRL_WEIGHT * loss_mnrl).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.MAX_GRAD_NORM)
        optimizer.step()
        step += 1
        if step % 10 == 0 or step == total_steps:
            entry = {"model": kind, "step": step, "epoch": epoch, "seconds": round(time.perf_counter() - start, 2),
                     "learning_rate": round(rate, 7),
                     "mse_x384": round(float(loss_mse.detach()) * settings.MSE_WEIGHT, 5),
                     "mnrl": None if loss_mnrl is None else round(float(loss_mnrl.detach()), 4)}  # fmt: skip
            if loss_relation is not None:
                entry["relation"] = round(float(loss_relation.detach()), 5)
            log.append(entry)
            logger.info("%s", entry)
        elapsed = time.perf_counter() - start
        if kind == "transformer" and total_steps is not None and elapsed > settings.TRANSFORMER_MAX_SHARE * seconds:
            # the control planned in the Mamba student's steps stops at its share of the time (a timed run ends on time)
            logger.warning("transformer: stopped at step %d of %d (%.0f s)", step, total_steps, elapsed)
            stopped_early = True
            break
        if stop_at is not None and time.time() > stop_at:
            logger.warning("%s: the run's time is up, stopped at step %d (%.0f s of %s)", kind, step,
                           elapsed, f"{total_steps} steps" if total_steps else f"{seconds:g} s")  # fmt: skip
            stopped_early = True
            break
        if checkpoint_dir is not None and time.perf_counter() - last_checkpoint > settings.CHECKPOINT_EVERY_SECONDS:
            save()
            last_checkpoint = time.perf_counter()
    _synchronize(device)
    elapsed = time.perf_counter() - start
    if checkpoint_dir is not None:
        save()
    if saved_chunk_size is not None:
        model[0].chunk_size = saved_chunk_size
    for param in table:
        param.requires_grad_(True)
    model.eval()
    return {"steps": step, "planned_steps": total_steps or step, "seconds": round(elapsed, 1), "tokens": tokens,
            "tokens_per_second": round(tokens / max(elapsed, 1e-9)),
            "trained_seconds": round(seconds_before + elapsed, 1), "stopped_early": stopped_early}  # fmt: skip


@torch.inference_mode()
def held_out_cosine(
    model: SentenceTransformer, kind: str, data: TrainData, held_out: list[int], kinds: list[str], device: str
) -> dict:
    """Mean cosine between the student's embedding and the teacher target on held-out texts, per text kind."""
    sums: dict[str, list[float]] = {}
    order = sorted(held_out, key=lambda i: len(data.ids[i]))
    for start in range(0, len(order), 16):
        batch = order[start : start + 16]
        features = _to(collate([data.ids[i] for i in batch], kind, data.pad_id, model.max_seq_length), device)
        embeddings = model(features)["sentence_embedding"].float()
        cosines = (embeddings * data.targets[batch].to(device)).sum(-1).tolist()
        for index, cosine in zip(batch, cosines, strict=True):
            sums.setdefault(kinds[index], []).append(cosine)
    return {name: round(float(np.mean(values)), 4) for name, values in sorted(sums.items())}

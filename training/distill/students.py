"""The students: an st-mamba encoder (optionally initialised from the teacher) and the Transformer control."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Module, Normalize

import st_mamba
from training.distill import settings
from training.distill.data import token_counts
from training.distill.prepare import sha256_of

if TYPE_CHECKING:
    from training.distill.train import TrainData


def as_saved(model: SentenceTransformer) -> SentenceTransformer:
    """The Mamba student set to read texts as the exported model does: up to ``SAVED_MAX_SEQ_LENGTH`` tokens, with
    ``SAVED_TEXT_READING``'s settings (after training and for evaluation; training reads the ids it is given)."""
    model.max_seq_length = settings.SAVED_MAX_SEQ_LENGTH
    for key, value in settings.SAVED_TEXT_READING.items():
        setattr(model[0], key, value)
    return model


def build_mamba_student(
    tokenizer_dir: str | Path, seed: int = settings.SEED, config: dict | None = None, pooling: str = "eos",
    embedding_std: float | None = None, do_lower_case: bool = False, **_: object,
) -> SentenceTransformer:  # fmt: skip
    """st-mamba encoder (EOS or mean pooling) -> Dense to the teacher's width -> Normalize.

    ``config`` defaults to ``STUDENT``'s; ``embedding_std`` re-draws the token embedding with that
    standard deviation; ``do_lower_case`` is saved with the encoder. Other keys of a ``STUDENT_VARIANTS``
    entry (the learning rate, ``init``) are applied by the caller.
    """
    shape = config or settings.STUDENT_VARIANTS[settings.STUDENT]["config"]
    torch.manual_seed(seed)
    model = st_mamba.from_config(st_mamba.MambaConfig(**shape), tokenizer_dir, seed=seed, pooling=pooling,
                                 max_seq_length=settings.MAX_TRAIN_TOKENS, chunk_size=settings.SAVED_CHUNK_SIZE,
                                 do_lower_case=do_lower_case, device="cpu")  # fmt: skip
    if embedding_std is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            torch.nn.init.normal_(model[0].backbone.embeddings.weight, std=embedding_std, generator=generator)
    width = model[0].get_embedding_dimension()
    return SentenceTransformer(modules=[model[0], Dense(width, settings.TEACHER_DIM, activation_function=None), Normalize()],
                               similarity_fn_name="cosine", device="cpu")  # fmt: skip


def teacher_token_table(
    teacher: SentenceTransformer, tokenizer, vocab_size: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's view of every student token, reduced to the student's width (the Model2Vec recipe).

    Each GPT-NeoX vocabulary entry is decoded to its text (the leading space of a word-initial token
    dropped) and embedded by the teacher on its own; the unit vectors are centred and projected on
    their first ``width`` principal directions. model2vec distils a teacher's *own* vocabulary; the
    student's tokens are GPT-NeoX's, so the few lines are here.

    Returns ``table`` (vocab_size, width), ``components`` (width, 384) and ``mean`` (384,):
    ``table @ components + mean`` approximates the teacher's vectors.
    """
    texts = [tokenizer.decode([index]).strip() if index < len(tokenizer) else "" for index in range(vocab_size)]
    vectors = teacher.encode(texts, batch_size=settings.TOKEN_TABLE_BATCH, convert_to_tensor=True, normalize_embeddings=True,
                             show_progress_bar=False).float().cpu()  # fmt: skip
    mean = vectors.mean(dim=0)
    _, _, directions = torch.linalg.svd(vectors - mean, full_matrices=False)
    components = directions[:width]  # (width, 384)
    return (vectors - mean) @ components.T, components, mean


def sif_log_weights(counts: np.ndarray, coefficient: float | None = None) -> torch.Tensor:
    """``log(a / (a + p))`` for every vocabulary entry, ``p`` its share of ``counts`` (one added to each count)."""
    a = settings.SIF_COEFFICIENT if coefficient is None else coefficient
    share = (counts.astype(np.float64) + 1) / (counts.sum() + len(counts))
    return torch.from_numpy(np.log(a / (a + share))).float()


def _start_from_teacher(
    table: torch.Tensor, dense: Dense, teacher: SentenceTransformer, tokenizer,
    token_log_weights: torch.Tensor | None, counts: np.ndarray | None,
) -> None:  # fmt: skip
    """The token table becomes ``teacher_token_table``'s; the Dense head maps its principal directions back to
    the teacher's space, scaled for a per-token norm (RMSNorm or LayerNorm: an RMS of 1), bias the teacher's mean.
    A weighted mean's ``token_log_weights`` (None for a plain mean) start at the SIF weights of ``counts``."""
    if token_log_weights is not None:
        if counts is None:
            raise ValueError("a weighted-mean student starts from SIF weights: pass the training texts' token counts")
        token_log_weights.copy_(sif_log_weights(counts))
    rows, components, mean = teacher_token_table(teacher, tokenizer, table.shape[0], table.shape[1])
    table.copy_(rows)
    scale = rows.norm(dim=1).mean() / table.shape[1] ** 0.5
    dense.linear.weight.copy_(components.T * scale)
    dense.linear.bias.copy_(mean)


@torch.no_grad()
def initialise_from_teacher(
    model: SentenceTransformer, teacher: SentenceTransformer, counts: np.ndarray | None = None
) -> None:
    """Start a Mamba student as a static embedding model that training only has to give context.

    The token table and the Dense head come from the teacher (``_start_from_teacher``); every mixer's
    ``out_proj`` starts at zero, so each residual block starts as the identity and the untrained student is
    the mean of its tokens' table rows (each set to an RMS of 1 by the final RMSNorm), read by the head. With
    ``weighted-mean`` pooling, each token's weight starts at its SIF weight (``sif_log_weights`` of ``counts``,
    the training texts' token counts, ``data.token_counts``): the untrained student is a SIF-weighted static model.
    """
    encoder, dense = model[0], model[1]
    weights = encoder.token_log_weights if encoder.pooling == "weighted-mean" else None
    _start_from_teacher(encoder.backbone.embeddings.weight, dense, teacher, encoder.tokenizer, weights, counts)
    for layer in encoder.backbone.layers:
        layer.mixer.out_proj.weight.zero_()


class TokenWeightedMean(Module):
    """The Transformer control's ``weighted-mean`` pooling: the mean of the token embeddings, token ``i``
    weighing ``exp(token_log_weights[i])`` (learned), as ``MambaEncoder(pooling="weighted-mean")`` pools."""

    config_keys = ["vocab_size", "dimension"]

    def __init__(self, vocab_size: int, dimension: int) -> None:
        super().__init__()
        self.vocab_size, self.dimension = vocab_size, dimension
        self.token_log_weights = torch.nn.Parameter(torch.zeros(vocab_size))

    def forward(self, features: dict) -> dict:
        tokens = features["token_embeddings"]
        weights = features["attention_mask"].float() * self.token_log_weights.float()[features["input_ids"]].exp()
        pooled = (tokens.float() * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-12)
        features["sentence_embedding"] = pooled.to(tokens.dtype)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)


@torch.no_grad()
def initialise_transformer_from_teacher(
    model: SentenceTransformer, teacher: SentenceTransformer, counts: np.ndarray | None = None
) -> None:
    """The Transformer control started as ``initialise_from_teacher`` starts the Mamba student.

    The word embeddings and the Dense head come from the teacher; the position and token-type embeddings
    start at zero, and so do the output projections of every attention and feed-forward block, so each
    post-LayerNorm layer starts as the identity: the untrained control is the (weighted) mean of its tokens'
    table rows, each normalised by the embeddings' LayerNorm, read by the head.
    """
    encoder, pooling, dense = model[0], model[1], model[2]
    bert = encoder.auto_model
    weights = pooling.token_log_weights if isinstance(pooling, TokenWeightedMean) else None
    _start_from_teacher(bert.embeddings.word_embeddings.weight, dense, teacher, encoder.tokenizer, weights, counts)
    bert.embeddings.position_embeddings.weight.zero_()
    bert.embeddings.token_type_embeddings.weight.zero_()
    for layer in bert.encoder.layer:
        for projection in (layer.attention.output.dense, layer.output.dense):
            projection.weight.zero_()
            projection.bias.zero_()


def build_transformer_student(
    tokenizer_dir: str | Path,
    folder: Path,
    seed: int = settings.SEED,
    config: dict | None = None,
    do_lower_case: bool = False,
    pooling: str = "mean",
) -> SentenceTransformer:
    """BERT-shaped encoder, random init, GPT-NeoX tokenizer -> mean or weighted-mean pooling -> Dense -> Normalize."""
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertConfig, BertModel

    shape = config or settings.TRANSFORMER
    torch.manual_seed(seed)
    tokenizer = st_mamba.load_tokenizer(tokenizer_dir)  # GPT-NeoX's tokenizer.json names no EOS: this sets it
    tokenizer.pad_token = tokenizer.eos_token
    bert = BertModel(BertConfig(pad_token_id=tokenizer.pad_token_id, **shape), add_pooling_layer=False)
    folder.mkdir(parents=True, exist_ok=True)
    bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    encoder = Transformer(
        str(folder),
        max_seq_length=shape["max_position_embeddings"],
        model_kwargs={"add_pooling_layer": False},
        do_lower_case=do_lower_case,
    )
    encoder.tokenizer.eos_token = encoder.tokenizer.pad_token = tokenizer.eos_token
    if pooling == "weighted-mean":
        pool: Module = TokenWeightedMean(shape["vocab_size"], shape["hidden_size"])
    else:
        pool = Pooling(shape["hidden_size"], pooling_mode=pooling)
    return SentenceTransformer(modules=[encoder, pool, Dense(shape["hidden_size"], settings.TEACHER_DIM, activation_function=None),
                                        Normalize()], similarity_fn_name="cosine", device="cpu")  # fmt: skip


def parameter_count(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for name, p in model.named_parameters() if is_token_embedding(name))
    return {"total": total, "token_embedding": embedding, "rest": total - embedding}


# 4. Checkpoints --------------------------------------------------------------------------------------------
def is_token_embedding(name: str) -> bool:
    """The (vocabulary, width) table: Mamba's ``backbone.embeddings``, BERT's ``word_embeddings`` (not its positions)."""
    return name.endswith(("backbone.embeddings.weight", "word_embeddings.weight"))


def build_student(
    name: str,
    work: Path,
    scratch: Path,
    teacher: SentenceTransformer,
    lower_case: bool = False,
    data: TrainData | None = None,
    like: str | None = None,
) -> tuple[SentenceTransformer, str, dict]:
    """A ``STUDENT_VARIANTS`` entry or ``"transformer"``: the model, its collate kind and how it trains (the
    keyword arguments of ``train_student``: its peak learning rate and the token table's share of it).

    The Transformer control lower-cases its input when the run's ids are lower-cased (``lower_case``) and
    starts as the Mamba student ``like`` starts: from the teacher where that one does, with its pooling where
    a Transformer has it (mean for an EOS-pooled student). ``data``: the run's texts, whose token counts (as
    the students read them) start a weighted-mean student's weights.
    """
    source = like if name == "transformer" else name
    variant = settings.STUDENT_VARIANTS[source] if source else {}
    counts = None
    if variant.get("init") == "teacher" and variant["pooling"] == "weighted-mean" and data is not None:
        counts = token_counts(data.ids, data.train, variant["config"]["vocab_size"])
    if name == "transformer":
        pooling = "weighted-mean" if variant.get("pooling") == "weighted-mean" else "mean"
        model = build_transformer_student(work / "gpt-neox-20b", scratch, do_lower_case=lower_case, pooling=pooling)
        if variant.get("init") == "teacher":
            initialise_transformer_from_teacher(model, teacher, counts)
        return model, "transformer", {"peak_learning_rate": settings.LEARNING_RATE}
    model = build_mamba_student(work / "gpt-neox-20b", **variant)
    if variant.get("init") == "teacher":
        initialise_from_teacher(model, teacher, counts)
    return model, "mamba", training_settings(variant)


def training_settings(variant: dict) -> dict:
    """How a ``STUDENT_VARIANTS`` entry trains (``train_student``'s keywords): its peak learning rate and the token
    table's share of it."""
    return {"peak_learning_rate": variant.get("learning_rate", settings.LEARNING_RATE),
            "table_learning_rate": variant.get("table_learning_rate", 1.0)}  # fmt: skip


def model_card_section(folder: Path, heading: str) -> str | None:
    """The text under ``## heading`` in a model folder's README.md (None without one)."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    section = card.read_text(encoding="utf-8").split(f"\n## {heading}\n", 1)
    return section[1].split("\n## ", 1)[0].strip() if len(section) == 2 else None


@torch.no_grad()
def start_from_model(model: SentenceTransformer, folder: Path, variant: dict) -> dict:
    """Put a saved model's weights into the student ``model`` (built for ``variant``): a run that goes on from an
    earlier model, not from the teacher's token table. The saved model must be this student (same shape, pooling
    and casing); its weights are read with safetensors. Returns what the run records of where it started."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{folder} holds no model.safetensors: --init-from takes a saved st-mamba student folder")
    saved = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)
    encoder = saved[0]
    if not isinstance(encoder, st_mamba.MambaEncoder):
        raise SystemExit(f"{folder} is not an st-mamba model (its first module is {type(encoder).__name__})")
    ours = model[0]
    for key in ("pooling", "do_lower_case"):
        if getattr(encoder, key) != getattr(ours, key):
            raise SystemExit(f"{folder} has {key}={getattr(encoder, key)!r}, the student {getattr(ours, key)!r}")
    mismatched = [key for key, value in variant["config"].items() if getattr(encoder.config, key) != value]
    if mismatched or len(saved) != len(model):
        shown = {key: getattr(encoder.config, key) for key in mismatched}
        raise SystemExit(f"{folder} is not this student: its {shown or 'modules'} differ from {variant['config']}")
    model.load_state_dict(saved.state_dict(), strict=True)  # fp16 weights copied into the fp32 student
    return {"path": folder.name, "sha256": sha256_of(weights),
            "training": model_card_section(folder, "Training")}  # fmt: skip


def text_reading(variant: dict) -> dict[str, bool]:
    """How a ``STUDENT_VARIANTS`` entry reads its training texts (``st_mamba.module.prepare_text``'s settings):
    lower-cased if it says ``do_lower_case``; with ``reads_as_saved``, also as the exported model reads a text
    (``SAVED_TEXT_READING``), else with its whitespace as given."""
    saved = settings.SAVED_TEXT_READING if variant.get("reads_as_saved") else {}
    return {"do_lower_case": bool(variant.get("do_lower_case")),
            "normalize_whitespace": bool(saved.get("normalize_whitespace")),
            "add_prefix_space": bool(saved.get("add_prefix_space"))}  # fmt: skip


def training_reading(names: list[str], control: bool = False) -> dict[str, bool]:
    """How the run's ids read the texts: as its Mamba students read them (they must agree). The Transformer
    control (``control`` or ``"transformer"`` among ``names``) reads through Sentence-Transformers' Transformer
    module, which lower-cases but cannot change whitespace, so it cannot be trained on such ids."""
    readings = {tuple(text_reading(settings.STUDENT_VARIANTS[name]).items()) for name in names if name != "transformer"}
    if len(readings) > 1:
        raise SystemExit(
            f"students {names} read their texts differently ({sorted(readings)}): sweep them in separate runs"
        )
    reading = dict(readings.pop()) if readings else text_reading({})
    if (control or "transformer" in names) and (reading["normalize_whitespace"] or reading["add_prefix_space"]):
        raise SystemExit(f"the students read texts as the saved model does ({reading}), which the Transformer "
                         "control cannot: train without it (--no-control)")  # fmt: skip
    return reading

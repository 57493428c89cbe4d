"""The recipe's settings: model shapes, the students, batching, optimiser, loss weights, run limits.

Every other module reads them as ``settings.NAME`` at call time, so that a test can change one.
"""

from __future__ import annotations

SEED = 0
TEACHER_WINDOW = 256  # the teacher's max_seq_length: 254 word pieces + [CLS] + [SEP]
TEACHER_DIM = 384
# A long text's target is the mean of its windows' embeddings, each window counting once ("equal") or by its
# word pieces ("tokens": a 2-piece tail window then counts 2/256 of a 256-piece text, not half of it).
TARGET_WINDOW_WEIGHTS = "equal"
MAMBA2 = dict(d_model=256, n_layer=12, version=2, d_state=64, headdim=64, expand=2, vocab_size=50280, eos_token_id=0)
MAMBA1 = dict(d_model=256, n_layer=12, version=1, d_state=16, expand=2, vocab_size=50280, eos_token_id=0)
TRANSFORMER = dict(hidden_size=256, num_hidden_layers=5, num_attention_heads=4, intermediate_size=1024,
                   max_position_embeddings=8192, vocab_size=50280)  # fmt: skip
MAX_TRAIN_TOKENS = 8192  # longest text a student reads in training (the corpus builder cuts at this length)
SAVED_MAX_SEQ_LENGTH = 32768  # what the exported Mamba student reads by default; long texts stream...
SAVED_CHUNK_SIZE = 2048  # ...in chunks of this many tokens, carrying the state (bounded memory)
# How the saved Mamba student reads a text besides lower-casing it (``MambaEncoder``): each run of whitespace as one
# space or one line break, and a space before the text, so that its first word is the token it is inside a text.
# Read so, the shipped model (trained on the texts as they are) came closer to its teacher on held-out training texts,
# and doubled spaces stopped costing it (docs/distillation.md, "How the student reads whitespace"). A variant with
# ``reads_as_saved`` also trains on the texts read so (``students.text_reading``).
SAVED_TEXT_READING = {"normalize_whitespace": True, "add_prefix_space": True}
# A GPU call holds ``--run-seconds``: tokenising and teacher targets, the students, then evaluation and
# speed. Read in one pass, the Mamba student is faster per step than the Transformer on long batches and
# slower on short ones (benchmarks/bench_train_step.py), so the control may need more time for the same steps.
TRAIN_SECONDS = 150  # Mamba student's training time; its steps are the Transformer's
TRANSFORMER_MAX_SHARE = 1.35  # the control stops after this many times the Mamba student's time if it is slower
# Mamba students that `sweep` compares, each trained for the same time (SWEEP_SECONDS) on the same first
# batches; `train` trains STUDENT.
# Keys: the backbone config, the pooling, and optionally the peak learning rate, the token table's share of it
# (``table_learning_rate``), the token embedding's initial standard deviation (mamba_ssm's 0.02 makes the
# token a few percent of the residual stream after 12 layers; 1.0 keeps it dominant, as BERT's LayerNorm on its
# embeddings does), the table's start (``init``) and how the texts are read (``do_lower_case``, ``reads_as_saved``).
STUDENT_VARIANTS = {
    "mamba2-eos": {"config": MAMBA2, "pooling": "eos"},
    "mamba2-mean": {"config": MAMBA2, "pooling": "mean"},
    "mamba1-eos": {"config": MAMBA1, "pooling": "eos"},  # the paper's backbone and pooling
    "mamba1-mean": {"config": MAMBA1, "pooling": "mean"},
    "mamba1-eos-lr3e-3": {"config": MAMBA1, "pooling": "eos", "learning_rate": 3e-3},
    "mamba1-eos-unit-embedding": {"config": MAMBA1, "pooling": "eos", "embedding_std": 1.0},
    "mamba1-mean-unit-embedding": {"config": MAMBA1, "pooling": "mean", "embedding_std": 1.0},
    # The token table starts as the teacher's view of each GPT-NeoX token (``initialise_from_teacher``) and
    # texts are lower-cased (the teacher is uncased): the untrained student is a static embedding model.
    "mamba1-mean-teacher-init": {"config": MAMBA1, "pooling": "mean", "init": "teacher", "do_lower_case": True},
    # The same with a learned weight for every vocabulary entry in the mean, starting at its SIF weight
    # a / (a + p(token)) (frequencies counted on the training texts): frequent tokens count less from the start.
    "mamba1-wmean-teacher-init": {
        "config": MAMBA1,
        "pooling": "weighted-mean",
        "init": "teacher",
        "do_lower_case": True,
    },
    # Twice the mixers' parameters within the 50 MB cap: d_inner 1,024 (expand 4) in 11 layers. On the GPU a
    # step of the 256-wide student is bound by launches, which grow with depth, not width.
    "mamba1-mean-teacher-init-x4": {
        "config": {**MAMBA1, "expand": 4, "n_layer": 11},
        "pooling": "mean",
        "init": "teacher",
        "do_lower_case": True,
    },
    # The same trained on its texts as the exported model reads them (SAVED_TEXT_READING), not as they are.
    "mamba1-mean-teacher-init-x4-as-saved": {
        "config": {**MAMBA1, "expand": 4, "n_layer": 11},
        "pooling": "mean",
        "init": "teacher",
        "do_lower_case": True,
        "reads_as_saved": True,
    },
    # The 12-layer recipe with the token table kept near the teacher's view of each token
    # (``table_learning_rate``: the table's peak learning rate as a share of the student's; 0 freezes it).
    # Trained at the full rate, a row read 10 or more times in training moves 0.8-1.1 times its own length
    # (cosine 0.73-0.77 to its start). At a tenth it scored below the full rate (docs/distillation.md).
    "mamba1-mean-teacher-init-slow-table": {
        "config": MAMBA1,
        "pooling": "mean",
        "init": "teacher",
        "do_lower_case": True,
        "table_learning_rate": 0.1,
    },
}
SIF_COEFFICIENT = 1e-4  # a in a / (a + p): Model2Vec's default (not tuned on any collection we score)
STUDENT = "mamba1-mean-teacher-init-x4"  # what `train` trains by default: the shipped model's recipe
SWEEP_SECONDS = 40  # default training time of each student in `sweep`
EOS_ID = 0  # GPT-NeoX's <|endoftext|>: the EOS appended to every text, and the padding
# Padded tokens in one batch; a batch holds at most one text per TOKENS_PER_TEXT of them, and batches are cut
# from pools of POOL_BATCHES batches' worth of texts sorted by length (little padding, random order). Most texts
# are short: at 32,768 tokens (512 texts) a step of the Mamba-1 student was host-bound (the H200 ~20% busy),
# so the default is 4x that; `--batch-tokens 32768` gives the run of record's batches. A Mamba-2 student on the
# PyTorch scan keeps ~100 KB a token for backward: sweep it with --batch-tokens 32768.
MAX_BATCH_TOKENS = 131072
# The students' arithmetic in training: "fp32" (TF32 matmuls on the GPU, the recipe of every model so far) or
# "bf16" (the forward and the losses under bf16 autocast; weights, gradients and AdamW stay fp32).
TRAIN_PRECISION = "fp32"
PRECISIONS = ("fp32", "bf16")
TOKENS_PER_TEXT = 64
POOL_BATCHES = 16
LEARNING_RATE = 1e-3
WARMUP_SHARE = 0.06  # linear warm-up over this share of the steps, then linear decay to 0
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
MSE_WEIGHT = float(TEACHER_DIM)  # MSE over 384 coordinates x 384 = squared distance of the unit vectors
MNRL_EVERY, MNRL_BATCH, MNRL_WEIGHT = 4, 32, 0.1
# The batch's similarity structure (``train.relation_loss``): the KL divergence from the teacher's to the student's
# distribution over a text's batch mates by cosine x RELATION_SCALE (MNRL's scale), times RELATION_WEIGHT. At 0, the
# recipe of every model so far, training matches each text's target alone. RELATION_BANK > 0 puts a text's cosines
# to that many training texts drawn at random each step (their teacher targets) in place of its batch mates: batches
# are cut from texts of one length, so batch mates are texts of one kind, where the bank mixes every kind.
# RELATION_TEACHER, a Sentence-Transformers folder (relative to the run's work folder, or absolute), gives the teacher
# side of the term from a second teacher's embeddings of the texts (all-mpnet-base-v2: `python -m training.distill
# relation-teacher`), while the MSE still matches the first teacher's targets; None: the targets' own cosines.
RELATION_WEIGHT, RELATION_SCALE, RELATION_BANK, RELATION_TEACHER = 0.0, 20.0, 0, None
# The recipe settings a checkpoint records and a resumed run takes from it unless told otherwise: its metadata key,
# the setting's name here, and what a checkpoint without the key trained with (None: the current default).
CHECKPOINT_RECIPE = (
    ("max_batch_tokens", "MAX_BATCH_TOKENS", None),
    ("target_window_weights", "TARGET_WINDOW_WEIGHTS", "equal"),
    ("precision", "TRAIN_PRECISION", "fp32"),
    ("relation_weight", "RELATION_WEIGHT", 0.0),
    ("relation_bank", "RELATION_BANK", 0),
    ("relation_teacher", "RELATION_TEACHER", None),
)
MNRL_MAX_TOKENS = 512  # abstracts are cut here in the MNRL batches
HELD_OUT = 2000  # texts kept out of training, to measure how close students come to the teacher
SHARD_BYTES = 16 * 2**20  # most bytes in one checkpoint file...
HEADER_BYTES = 64 * 2**10  # ...of which this much is kept for the safetensors header (names, shapes, metadata)
CHECKPOINT_EVERY_SECONDS = 45
RUN_SECONDS = 520  # no evaluation run starts later than 25 s, and no speed test later than 20 s, before this
EVALUATION_RESERVE_SECONDS = 120  # training, Mamba or control, stops this long before RUN_SECONDS run out
TOKEN_TABLE_BATCH = 1024  # vocabulary entries the teacher embeds at a time (``teacher_token_table``)
EVAL_BATCH = {"teacher": 256, "mamba": 64, "transformer": 64}
RECASED = ("upper", "lower", "title")  # SciFact's test queries are also run re-typed so (beir.QUERY_CASES)

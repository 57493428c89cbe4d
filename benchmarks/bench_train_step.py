"""Where a distillation training step's time goes: the students of training/distill/, one batch shape at a time.

For each batch shape of the distillation run (many short texts ... a few 8K-token segments, each at
most 32,768 padded tokens), the Mamba and the Transformer student take the recipe's step (forward,
MSELoss against fixed targets, backward, gradient clipping, AdamW) on random token ids, fp32 with
TF32 matmuls as in the recipe (or, with ``--precision bf16``, the forward and loss under bf16 autocast).
Reported per shape: wall milliseconds per step (median after warm-up, the batch already on the GPU, a
sync after each step), the GPU's busy time within it (the summed kernel times of one profiled step, from
torch.profiler), so that the rest, wall minus busy, is time the GPU waited on the host; and the mean step time in a loop like the recipe's (the
batch collated from token ids on the host and sent to the GPU each step, no sync between steps).

Run on the GPU machine (prints a table last; ``--json`` keeps the rows):

    python benchmarks/bench_train_step.py --json bench_out/train_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.distill import data, settings, students, train  # noqa: E402  (the recipe's students and settings)

# (texts, tokens a text): shapes like the run's batches, about 32K padded tokens or 512 texts each.
SHAPES = [(512, 8), (512, 48), (128, 256), (32, 1024), (4, 8192)]


def train_step(model, loss, optimizer, features: dict, labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    with train.training_autocast("cuda"):  # as train.train_student runs the forward and the loss
        value = loss([features], labels)
    (settings.MSE_WEIGHT * value).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.MAX_GRAD_NORM)
    optimizer.step()


def busy_ms(step) -> float:
    """Summed device time of the kernels of one call of ``step`` (torch.profiler), in milliseconds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(event.device_time_total for event in prof.key_averages()) / 1e3


def loop_ms(model, loss, optimizer, ids, kind: str, labels: torch.Tensor, reps: int) -> float:
    """Milliseconds a step as train.train_student runs them back to back: each step collates its
    batch from token ids on the host and sends it to the GPU, with no sync between steps."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        collated = data.collate(ids, kind, 0, model.max_seq_length)
        int(collated["attention_mask"].sum())
        train_step(model, loss, optimizer, train._to(collated, "cuda"), train._move(labels, "cuda"))
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / reps


def measure(kind: str, name: str, model, reps: int, shapes: list[tuple[int, int]] = SHAPES) -> list[dict]:
    from sentence_transformers.sentence_transformer.losses import MSELoss

    model.to("cuda").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    loss = MSELoss(model)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for texts, length in shapes:
        ids = [torch.randint(1, 50000, (length - 1,), generator=generator).numpy() for _ in range(texts)]
        features = train._to(data.collate(ids, kind, 0, model.max_seq_length), "cuda")
        labels = torch.nn.functional.normalize(torch.randn(texts, settings.TEACHER_DIM, generator=generator), dim=-1)
        labels = labels.cuda()

        def step(features=features, labels=labels) -> None:
            train_step(model, loss, optimizer, features, labels)

        for _ in range(3):  # compiles, allocator warm-up
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        wall = statistics.median(times)
        busy = busy_ms(step)
        loop = loop_ms(model, loss, optimizer, ids, kind, labels.cpu(), reps)
        padded = int(features["input_ids"].numel())
        row = dict(model=name, texts=texts, length=length, padded_tokens=padded, wall_ms=round(wall, 2),
                   busy_ms=round(busy, 2), loop_ms=round(loop, 2), tok_s=round(padded / wall * 1e3))  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    model.to("cpu")
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| student | texts x tokens | wall ms | GPU busy ms | busy share | padded tok/s | in the loop, ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['texts']} x {r['length']:,} | {r['wall_ms']:.1f} | {r['busy_ms']:.1f} | "
                     f"{r['busy_ms'] / r['wall_ms']:.0%} | {r['tok_s'] / 1e3:,.0f}K | {r['loop_ms']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", type=Path, default=ROOT / ".bench_data" / "gpt-neox-20b")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--shapes", default=",".join(f"{t}x{n}" for t, n in SHAPES),
                   help="batch shapes, texts x tokens a text, comma-separated")  # fmt: skip
    p.add_argument("--precision", choices=settings.PRECISIONS, default=settings.TRAIN_PRECISION,
                   help="the students' arithmetic, as `train --precision`")  # fmt: skip
    a = p.parse_args()
    settings.TRAIN_PRECISION = a.precision
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in a.shapes.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    mamba = students.build_mamba_student(a.tokenizer, pooling="mean")
    mamba[0].chunk_size = None  # as train.train_student trains it: one pass
    rows = measure("mamba", "mamba", mamba, a.reps, shapes)
    # With the saved chunk_size, longer texts stream in chunks (the same gradients): what that costs a step.
    mamba[0].chunk_size = settings.SAVED_CHUNK_SIZE
    long = [shape for shape in shapes if shape[1] > settings.SAVED_CHUNK_SIZE]
    if long:
        rows += measure("mamba", f"mamba, {settings.SAVED_CHUNK_SIZE}-token chunks", mamba, a.reps, long)
    with tempfile.TemporaryDirectory() as scratch:  # where the Transformer student is built
        transformer = students.build_transformer_student(a.tokenizer, Path(scratch))
    rows += measure("transformer", "transformer", transformer, a.reps, shapes)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()

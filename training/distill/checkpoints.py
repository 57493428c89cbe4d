"""Checkpoint shards: the student in fp16 and its optimiser state, in files of at most ``SHARD_BYTES``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.distill import settings
from training.distill.students import is_token_embedding


def checkpoint_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights in fp16; AdamW moments in bf16, except the token embedding's: its second moment averaged per row."""
    tensors = {}
    for name, param in model.named_parameters():
        tensors[f"weight/{name}"] = param.detach().to(torch.float16).cpu()
        state = optimizer.state.get(param, {})
        if not state:
            continue
        if is_token_embedding(name):
            tensors[f"row_exp_avg_sq/{name}"] = state["exp_avg_sq"].mean(dim=1).float().cpu()
        else:
            tensors[f"exp_avg/{name}"] = state["exp_avg"].to(torch.bfloat16).cpu()
            tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].to(torch.bfloat16).cpu()
    return tensors


def save_checkpoint(
    tensors: dict[str, torch.Tensor],
    meta: dict,
    folder: Path,
    shard_bytes: int = settings.SHARD_BYTES,
    header_bytes: int = settings.HEADER_BYTES,
) -> list[Path]:
    """Write ``tensors`` in safetensors files of at most ``shard_bytes``; tensors larger than one are split by rows.

    The first shard's metadata holds ``meta`` (JSON) and the list of split tensors.
    """
    shard_bytes -= header_bytes
    pieces: list[tuple[str, torch.Tensor]] = []
    split: dict[str, int] = {}
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if size <= shard_bytes or tensor.dim() == 0:
            pieces.append((name, tensor.contiguous()))
            continue
        rows = max(1, shard_bytes // (tensor[0].numel() * tensor.element_size()))
        parts = torch.split(tensor, rows)
        split[name] = len(parts)
        pieces += [(f"{name}#{i}", part.contiguous()) for i, part in enumerate(parts)]
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in sorted(pieces, key=lambda item: -item[1].numel() * item[1].element_size()):
        size = tensor.numel() * tensor.element_size()
        placed = False
        for shard in shards:  # first fit, largest first
            if sum(t.numel() * t.element_size() for t in shard.values()) + size <= shard_bytes:
                shard[name] = tensor
                placed = True
                break
        if not placed:
            shards.append({name: tensor})
        used += size
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("checkpoint-*.safetensors"):
        old.unlink()
    paths = []
    for number, shard in enumerate(shards, start=1):
        path = folder / f"checkpoint-{number:05d}-of-{len(shards):05d}.safetensors"
        metadata = {"meta": json.dumps(meta), "split": json.dumps(split)} if number == 1 else {}
        save_file(shard, path, metadata=metadata)
        paths.append(path)
    return paths


def _checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The shards written by ``save_checkpoint``, in order, and the first one's metadata strings."""
    from safetensors import safe_open

    paths = sorted(folder.glob("checkpoint-*-of-*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no checkpoint-*.safetensors in {folder}")
    with safe_open(str(paths[0]), "pt") as first:
        return paths, first.metadata()


def checkpoint_meta(folder: Path) -> dict:
    """The metadata of a checkpoint (step, seconds, student...), without reading its tensors."""
    return json.loads(_checkpoint_files(folder)[1]["meta"])


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata written by ``save_checkpoint``."""
    paths, metadata = _checkpoint_files(folder)
    meta, split = json.loads(metadata["meta"]), json.loads(metadata["split"])
    pieces: dict[str, torch.Tensor] = {}
    for path in paths:
        pieces.update(load_file(path))
    tensors = {name: value for name, value in pieces.items() if "#" not in name}
    for name, count in split.items():
        tensors[name] = torch.cat([pieces[f"{name}#{i}"] for i in range(count)])
    return tensors, meta


def restore(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, tensors: dict[str, torch.Tensor], step: int
) -> None:
    """Load checkpoint weights (to fp32) and rebuild the AdamW state."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"weight/{name}"].to(param.dtype))
    if optimizer is None:
        return
    for name, param in params.items():
        if f"exp_avg/{name}" in tensors:
            exp_avg = tensors[f"exp_avg/{name}"].float()
            exp_avg_sq = tensors[f"exp_avg_sq/{name}"].float()
        elif f"row_exp_avg_sq/{name}" in tensors:
            exp_avg = torch.zeros_like(param, dtype=torch.float32)
            exp_avg_sq = tensors[f"row_exp_avg_sq/{name}"].float()[:, None].expand_as(param).clone()
        else:
            continue
        optimizer.state[param] = {"step": torch.tensor(float(step)), "exp_avg": exp_avg.to(param.device),
                                  "exp_avg_sq": exp_avg_sq.to(param.device)}  # fmt: skip

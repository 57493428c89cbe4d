"""Reading Mamba checkpoints (transformers format or mamba_ssm format) into ``MambaBackbone``.

Both formats, Mamba-1 and Mamba-2, from a local folder or a Hub id:

- transformers: ``config.json`` with ``model_type`` "mamba" / "mamba2" and safetensors (or .bin)
  weights under ``backbone.*`` (``MambaForCausalLM``) or at the top level (``MambaModel``);
- mamba_ssm: ``config.json`` with ``d_model`` / ``n_layer`` / ``ssm_cfg`` and ``pytorch_model.bin``
  weights under ``backbone.*``, with ``backbone.embedding`` for the embedding.

``save_backbone`` writes the transformers format, so what st-mamba saves loads in transformers too.
Weights are read with safetensors or ``torch.load(weights_only=True)``; nothing is executed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from st_mamba.config import MambaConfig
from st_mamba.modeling import MambaBackbone

GPT_NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"
"""The tokenizer of every state-spaces Mamba checkpoint; mamba_ssm-format folders do not carry it."""

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a Mamba backbone; the message says what is wrong."""


def resolve_folder(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: bool | str | None = None,
    cache_folder: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder as is, or a Hub id downloaded (config, weights and tokenizer files only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{str(name_or_path)!r} is a file; expected a checkpoint folder or a Hub id")
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, not "org/name"
        raise CheckpointError(f"checkpoint folder {text!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            str(name_or_path), revision=revision, token=token, cache_dir=cache_folder,
            local_files_only=local_files_only,
            allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin", "*.txt", "*.model"],
        )  # fmt: skip
    except Exception as exc:  # offline, unknown repo, gated...: say which checkpoint and why
        raise CheckpointError(f"could not find checkpoint {str(name_or_path)!r} locally or on the Hub: {exc}") from exc
    return Path(folder)


def read_config(folder: Path) -> tuple[MambaConfig, str]:
    """Parse ``config.json`` of either format into a ``MambaConfig``; also return the format's name."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in {folder}")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if raw.get("model_type") in ("mamba", "mamba2"):
        return _config_from_transformers(raw), "transformers"
    if "d_model" in raw and "n_layer" in raw:
        return _config_from_mamba_ssm(raw), "mamba_ssm"
    raise CheckpointError(
        f"{config_path} is neither a transformers Mamba config (model_type 'mamba' or 'mamba2') "
        f"nor a mamba_ssm config (d_model, n_layer); got keys {sorted(raw)}"
    )


def _config_from_transformers(raw: dict[str, Any]) -> MambaConfig:
    common = dict(
        d_model=raw["hidden_size"],
        n_layer=raw["num_hidden_layers"],
        vocab_size=raw["vocab_size"],
        d_state=raw.get("state_size", 16 if raw["model_type"] == "mamba" else 128),
        d_conv=raw.get("conv_kernel", 4),
        expand=raw.get("expand", 2),
        conv_bias=raw.get("use_conv_bias", True),
        bias=raw.get("use_bias", False),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        eos_token_id=_first(raw.get("eos_token_id"), 0),
    )
    if raw["model_type"] == "mamba":
        rank = raw.get("time_step_rank", "auto")
        return MambaConfig(version=1, dt_rank=None if rank == "auto" else int(rank), **common)
    headdim = raw.get("head_dim", 64)
    nheads = raw.get("num_heads", common["expand"] * common["d_model"] // headdim)
    if nheads * headdim != common["expand"] * common["d_model"]:
        raise CheckpointError(
            f"num_heads * head_dim = {nheads * headdim} does not equal expand * hidden_size = "
            f"{common['expand'] * common['d_model']}"
        )
    limit = [_json_float(v) for v in raw.get("time_step_limit", (0.0, math.inf))]
    # transformers normalises the gated RMSNorm over all of d_inner (a single group).
    return MambaConfig(
        version=2, headdim=headdim, ngroups=raw.get("n_groups", 1), norm_groups=1, dt_limit=tuple(limit), **common
    )


def _config_from_mamba_ssm(raw: dict[str, Any]) -> MambaConfig:
    if raw.get("d_intermediate", 0) or raw.get("attn_layer_idx"):
        raise CheckpointError(
            "hybrid checkpoints (MLP layers via d_intermediate, or attention layers via attn_layer_idx) "
            "are not supported; st-mamba reads pure Mamba-1 / Mamba-2 stacks"
        )
    if not raw.get("rms_norm", True):
        raise CheckpointError("checkpoints with LayerNorm (rms_norm=false) are not supported; only RMSNorm")
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    version = 2 if ssm_cfg.pop("layer", "Mamba1") == "Mamba2" else 1
    multiple = raw.get("pad_vocab_size_multiple", 8)
    vocab = raw["vocab_size"] + (-raw["vocab_size"] % multiple)  # mamba_ssm pads the embedding
    common = dict(
        d_model=raw["d_model"], n_layer=raw["n_layer"], vocab_size=vocab,
        d_state=ssm_cfg.pop("d_state", 16 if version == 1 else 128), d_conv=ssm_cfg.pop("d_conv", 4),
        expand=ssm_cfg.pop("expand", 2), conv_bias=ssm_cfg.pop("conv_bias", True), bias=ssm_cfg.pop("bias", False),
        residual_in_fp32=raw.get("residual_in_fp32", True), norm_eps=raw.get("norm_epsilon", 1e-5),
    )  # fmt: skip
    if version == 1:
        rank = ssm_cfg.pop("dt_rank", "auto")
        config = MambaConfig(version=1, dt_rank=None if rank == "auto" else int(rank), **common)
    else:
        ngroups = ssm_cfg.pop("ngroups", 1)
        # mamba_ssm's Mamba2 module normalises the gated output per group of heads.
        config = MambaConfig(
            version=2, headdim=ssm_cfg.pop("headdim", 64), ngroups=ngroups, norm_groups=ngroups,
            dt_limit=tuple(_json_float(v) for v in ssm_cfg.pop("dt_limit", (0.0, math.inf))), **common,
        )  # fmt: skip
        if (
            ssm_cfg.pop("norm_before_gate", False)
            or not ssm_cfg.pop("rmsnorm", True)
            or ssm_cfg.pop("D_has_hdim", False)
        ):
            raise CheckpointError(
                "Mamba-2 variants with norm_before_gate, D_has_hdim or without rmsnorm are not supported"
            )
    ignored = set(ssm_cfg) - {
        "dt_min",
        "dt_max",
        "dt_init",
        "dt_scale",
        "dt_init_floor",
        "A_init_range",
        "chunk_size",
        "use_fast_path",
    }
    if ignored:
        raise CheckpointError(f"unsupported ssm_cfg options: {sorted(ignored)}")
    return config


def _json_float(value: Any) -> float:
    """transformers 5 writes non-finite floats as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def _to_json_float(value: float) -> float | dict[str, str]:
    if math.isfinite(value):
        return value
    return {"__float__": "Infinity" if value > 0 else "-Infinity"}


def _first(value: Any, default: int) -> int:
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint folder: safetensors preferred, .bin read with ``weights_only=True``."""
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_weight_file(folder / shard))
            return state
        return _read_weight_file(path)
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(_WEIGHT_FILES)}")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc


def _to_backbone_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map either format's names onto ``MambaBackbone``'s; the LM head is dropped (tied or unused)."""
    out = {}
    for key, value in state.items():
        if key.startswith("lm_head."):
            continue
        key = key.removeprefix("backbone.")
        if key == "embedding.weight":  # mamba_ssm
            key = "embeddings.weight"
        out[key] = value
    return out


def load_backbone(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: bool | str | None = None,
    cache_folder: str | None = None,
    local_files_only: bool = False,
) -> tuple[MambaBackbone, Path]:
    """Build a ``MambaBackbone`` from a checkpoint; return it and the local folder it came from.

    Raises:
        CheckpointError: no config, unreadable weights, or weights that do not match the config
            (the message lists missing and unexpected keys and mismatched shapes).
    """
    folder = resolve_folder(name_or_path, revision, token, cache_folder, local_files_only)
    config, _ = read_config(folder)
    state = _to_backbone_keys(read_state_dict(folder))
    with torch.device("meta"):
        backbone = MambaBackbone(config)
    check_state_dict(backbone, state, source=str(folder))
    backbone.load_state_dict(state, assign=True)
    return backbone.float() if backbone.embeddings.weight.dtype != torch.float32 else backbone, folder


def check_state_dict(backbone: MambaBackbone, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``CheckpointError`` naming every missing key, unexpected key and shape mismatch."""
    expected = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        lines = [
            f"checkpoint {source} does not match a {backbone.config.n_layer}-layer Mamba-{backbone.config.version} backbone:"
        ]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        raise CheckpointError("\n".join(lines))


def to_transformers_config(config: MambaConfig) -> dict[str, Any]:
    """The transformers ``config.json`` for this backbone (``MambaModel`` / ``Mamba2Model``)."""
    common = {
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer, "vocab_size": config.vocab_size,
        "state_size": config.d_state, "conv_kernel": config.d_conv, "expand": config.expand,
        "use_conv_bias": config.conv_bias, "use_bias": config.bias, "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": config.residual_in_fp32, "eos_token_id": config.eos_token_id,
        "bos_token_id": config.eos_token_id, "pad_token_id": config.eos_token_id, "tie_word_embeddings": True,
    }  # fmt: skip
    if config.version == 1:
        return {"model_type": "mamba", "architectures": ["MambaModel"], "time_step_rank": config.dt_rank, **common}
    if config.norm_groups != 1:
        raise CheckpointError("transformers' Mamba2Model normalises over one group; this backbone uses norm_groups > 1")
    return {
        "model_type": "mamba2", "architectures": ["Mamba2Model"], "num_heads": config.nheads,
        "head_dim": config.headdim, "n_groups": config.ngroups,
        "time_step_limit": [_to_json_float(v) for v in config.dt_limit], **common,
    }  # fmt: skip


def save_backbone(backbone: MambaBackbone, folder: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` in the transformers ``MambaModel`` format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = to_transformers_config(backbone.config)
    (folder / "config.json").write_text(json.dumps(config, indent=2, allow_nan=True))
    state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

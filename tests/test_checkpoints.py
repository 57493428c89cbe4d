"""Our backbone against transformers' MambaModel / Mamba2Model, and reading both checkpoint formats."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from st_mamba import CheckpointError, load_backbone
from st_mamba.checkpoints import save_backbone
from st_mamba.ops import use_backend

VOCAB = 128


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight off its initial value so that no parameter can be silently ignored."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.add_(noise * (0.05 if "A_log" in name or "dt" in name else 0.2))


def hf_mamba1(seed: int = 0) -> transformers.MambaModel:
    torch.manual_seed(seed)
    config = transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        time_step_rank=4, use_cache=False,
    )  # fmt: skip
    model = transformers.MambaModel(config).eval()
    _perturb(model, seed)
    return model


def hf_mamba2(seed: int = 0, n_groups: int = 1) -> transformers.Mamba2Model:
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        num_heads=4, head_dim=16, n_groups=n_groups, chunk_size=16, use_cache=False,
    )  # fmt: skip
    model = transformers.Mamba2Model(config).eval()
    _perturb(model, seed)
    return model


def _compare(ours, theirs, batch: int, length: int, seed: int) -> float:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = theirs(input_ids=ids).last_hidden_state
        actual = ours(ids)
    assert actual.shape == expected.shape
    return (actual - expected).abs().max().item()


@pytest.mark.parametrize("batch,length", [(1, 1), (2, 7), (3, 33), (1, 130)])
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_mamba1_matches_transformers(tmp_path, batch, length, backend):
    theirs = hf_mamba1(seed=length)
    theirs.save_pretrained(tmp_path)
    ours, _ = load_backbone(tmp_path)
    with use_backend(backend):
        assert _compare(ours, theirs, batch, length, seed=batch) <= 1e-4


@pytest.mark.parametrize("batch,length", [(1, 1), (2, 7), (3, 33), (1, 130)])
@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_matches_transformers(tmp_path, batch, length, n_groups):
    theirs = hf_mamba2(seed=length, n_groups=n_groups)
    theirs.save_pretrained(tmp_path)
    ours, _ = load_backbone(tmp_path)
    assert ours.config.version == 2 and ours.config.ngroups == n_groups
    assert _compare(ours, theirs, batch, length, seed=batch) <= 1e-4


def _write_mamba_ssm_checkpoint(folder, hf_model, version: int) -> None:
    """The layout of state-spaces/mamba-*: mamba_ssm config.json + pytorch_model.bin under backbone.*"""
    state = {}
    for key, value in hf_model.state_dict().items():
        key = "embedding.weight" if key == "embeddings.weight" else key
        state[f"backbone.{key}"] = value.clone()
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    cfg = hf_model.config
    ssm_cfg = {"d_state": cfg.state_size, "d_conv": cfg.conv_kernel, "expand": cfg.expand}
    if version == 1:
        ssm_cfg["dt_rank"] = cfg.time_step_rank
    else:
        ssm_cfg.update(layer="Mamba2", headdim=cfg.head_dim, ngroups=cfg.n_groups)
    config = {
        "d_model": cfg.hidden_size, "n_layer": cfg.num_hidden_layers, "vocab_size": VOCAB - 5,
        "ssm_cfg": ssm_cfg, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "tie_embeddings": True, "d_intermediate": 0, "attn_layer_idx": [],
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "pytorch_model.bin")


@pytest.mark.parametrize("version", [1, 2])
def test_mamba_ssm_format_loads_and_matches(tmp_path, version):
    theirs = hf_mamba1(3) if version == 1 else hf_mamba2(3)
    _write_mamba_ssm_checkpoint(tmp_path, theirs, version)
    ours, _ = load_backbone(tmp_path)
    assert ours.config.vocab_size == VOCAB  # 123 padded to a multiple of 8
    assert _compare(ours, theirs, 2, 19, seed=5) <= 1e-4


@pytest.mark.parametrize("version", [1, 2])
def test_saved_backbone_is_a_transformers_checkpoint(tmp_path, version):
    theirs = hf_mamba1(4) if version == 1 else hf_mamba2(4)
    theirs.save_pretrained(tmp_path / "hf")
    ours, _ = load_backbone(tmp_path / "hf")
    save_backbone(ours, tmp_path / "ours")
    cls = transformers.MambaModel if version == 1 else transformers.Mamba2Model
    reloaded = cls.from_pretrained(tmp_path / "ours").eval()
    assert _compare(ours, reloaded, 2, 11, seed=6) <= 1e-5
    assert (tmp_path / "ours" / "model.safetensors").is_file()


def test_causal_lm_checkpoint_with_lm_head_loads(tmp_path):
    torch.manual_seed(0)
    lm = transformers.MambaForCausalLM(hf_mamba1(0).config).eval()
    lm.save_pretrained(tmp_path)
    ours, _ = load_backbone(tmp_path)
    assert _compare(ours, lm.backbone, 1, 9, seed=1) <= 1e-4


def test_missing_and_unexpected_keys_are_named(tmp_path):
    theirs = hf_mamba1(0)
    _write_mamba_ssm_checkpoint(tmp_path, theirs, 1)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    del state["backbone.layers.1.mixer.A_log"]
    state["backbone.layers.0.mixer.surprise"] = torch.zeros(3)
    state["backbone.norm_f.weight"] = torch.ones(31)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        load_backbone(tmp_path)
    message = str(info.value)
    assert "layers.1.mixer.A_log" in message and "missing" in message
    assert "layers.0.mixer.surprise" in message and "unexpected" in message
    assert "norm_f.weight: checkpoint (31,), model (32,)" in message


@pytest.mark.parametrize(
    "setup,needle",
    [
        (lambda p: None, "no config.json"),
        (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "config.json").write_text('{"model_type": "bert"}'), "neither a transformers Mamba config"),
        (lambda p: (p / "config.json").write_text('{"d_model": 8, "n_layer": 1, "vocab_size": 8}'), "no weights"),
    ],
)
def test_bad_checkpoint_folders_say_what_is_wrong(tmp_path, setup, needle):
    setup(tmp_path)
    with pytest.raises(CheckpointError, match=needle):
        load_backbone(tmp_path)


def test_unreadable_weights_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"d_model": 8, "n_layer": 1, "vocab_size": 8}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights file .*pytorch_model.bin"):
        load_backbone(tmp_path)


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "nowhere" / "model")


def test_hybrid_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"d_model": 8, "n_layer": 2, "vocab_size": 8, "attn_layer_idx": [1]}')
    with pytest.raises(CheckpointError, match="hybrid"):
        load_backbone(tmp_path)

"""The backbone's hyper-parameters, in one dataclass shared by Mamba-1 and Mamba-2.

Glossary of the symbols used across the package (shape comments use them too):

    B        batch size (number of texts)
    L        sequence length in tokens
    d_model  width of the residual stream (``D`` in shape comments)
    d_inner  width inside a mixer, ``expand * d_model`` (``Di``)
    d_state  size of the SSM state per channel (Mamba-1) or per head (Mamba-2) (``N``)
    d_conv   kernel width of the depthwise causal convolution (``K``)
    dt_rank  Mamba-1 only: rank of the low-rank projection that produces the step size dt (``R``)
    nheads   Mamba-2 only: ``d_inner / headdim`` heads, each with one scalar decay (``H``)
    headdim  Mamba-2 only: channels per head (``P``)
    ngroups  Mamba-2 only: heads share B and C in ``ngroups`` groups (``G``)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal


@dataclass
class MambaConfig:
    """Hyper-parameters of a Mamba-1 or Mamba-2 backbone (embedding, residual blocks, final norm)."""

    d_model: int
    n_layer: int
    vocab_size: int
    version: Literal[1, 2] = 1
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    headdim: int = 64
    ngroups: int = 1
    norm_groups: int = 1
    dt_limit: tuple[float, float] = (0.0, math.inf)
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    eos_token_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 (Mamba) or 2 (Mamba-2), got {self.version!r}")
        if self.dt_rank is None and self.version == 1:
            self.dt_rank = math.ceil(self.d_model / 16)
        self.dt_limit = tuple(float(v) for v in self.dt_limit)
        if self.version == 2:
            if self.d_inner % self.headdim:
                raise ValueError(f"d_inner={self.d_inner} is not a multiple of headdim={self.headdim}")
            if self.nheads % self.ngroups:
                raise ValueError(f"nheads={self.nheads} is not a multiple of ngroups={self.ngroups}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels that go through the causal convolution: x alone (Mamba-1), or x, B and C (Mamba-2)."""
        if self.version == 1:
            return self.d_inner
        return self.d_inner + 2 * self.ngroups * self.d_state

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        out["dt_limit"] = list(self.dt_limit)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MambaConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown MambaConfig keys: {unknown}")
        return cls(**values)

"""The Mamba backbone, readable top-down: backbone -> residual block -> mixer -> norm.

Parameter names follow transformers' ``MambaModel`` / ``Mamba2Model`` (``embeddings``,
``layers.{i}.norm``, ``layers.{i}.mixer.*``, ``norm_f``), so that a transformers-format state dict
loads with its ``backbone.`` prefix removed and a saved st-mamba model is itself a transformers
checkpoint. The scans and the convolution come from ``st_mamba.ops``, which picks the backend.
Symbols (B, L, D, Di, N, K, R, H, P, G): see ``config.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from st_mamba import ops
from st_mamba.config import MambaConfig
from st_mamba.ops import cpu as ops_cpu
from st_mamba.ops.weight_cache import cached

# CPU inference batches of at most this many (token, inner channel) pairs, a query or a few, run on the
# calling thread (ops.cpu.one_thread): for them the second core saves less than its parallel regions cost.
ONE_THREAD_MAX_WORK = 2**15
# Mamba-1 CPU inference batches of at most this many (token, inner channel) pairs run the whole backbone in one
# call of the compiled library (``MambaBackbone._in_one_call``), on the calling thread (as ONE_THREAD_MAX_WORK):
# for the 12-layer distilled model's shape in bf16 on a 2-core AMD EPYC, 1.2 ms for a query of 11 tokens against 5.7 ms
# layer by layer, 11.7 against 12.9 ms for 2 x 64 tokens; on both cores the one call ran 1.4-1.7x slower.
ONE_CALL_MAX_WORK = 2**15


class LayerState(NamedTuple):
    """What one layer carries from one chunk of a text to the next."""

    conv: Tensor  # (B, K - 1, conv_dim): the last inputs of the causal convolution
    ssm: Tensor  # (B, Di, N) for Mamba-1, (B, H, P, N) for Mamba-2; fp32


class MambaBackbone(nn.Module):
    """Token ids -> final hidden states: embedding, ``n_layer`` residual blocks, final RMSNorm."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(ResidualBlock(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: Tensor,
        state: list[LayerState] | None = None,
        return_state: bool = False,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[LayerState]]:
        """(B, L) token ids -> (B, L, D) hidden states, optionally continuing from and returning ``state``.

        With ``cu_seqlens`` (n + 1,) int32 the batch is packed: ``input_ids`` is (1, T), the n texts laid
        end to end, text i at ``cu_seqlens[i]:cu_seqlens[i + 1]``; no text sees another, and states are
        (n, ...), one per text.
        """
        with self.threads_for(input_ids):
            return self._forward(input_ids, state, return_state, cu_seqlens)

    def threads_for(self, input_ids: Tensor) -> contextlib.AbstractContextManager:
        """``ops.cpu.one_thread()`` for a small CPU inference batch of these token ids, else nothing."""
        small = input_ids.numel() * self.config.d_inner <= ONE_THREAD_MAX_WORK
        if small and input_ids.device.type == "cpu" and not torch.is_grad_enabled():
            return ops_cpu.one_thread()
        return contextlib.nullcontext()

    def _in_one_call(self, input_ids: Tensor) -> bool:
        """Whether this forward runs in one call of the compiled CPU library: a small Mamba-1 inference batch on
        the CPU (``ops.cpu.mamba1_forward_small``), where the layer-by-layer forward spends more time between
        its ops than in them."""
        return (
            input_ids.numel() * self.config.d_inner <= ONE_CALL_MAX_WORK
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and ops.on_cpu_kernels(input_ids.device, self.config.version)
        )

    def _forward(
        self, input_ids: Tensor, state: list[LayerState] | None, return_state: bool, cu_seqlens: Tensor | None
    ) -> Tensor | tuple[Tensor, list[LayerState]]:
        if state is None and not return_state and self._in_one_call(input_ids):
            hidden = ops_cpu.mamba1_forward_small(self, input_ids, cu_seqlens)
            if hidden is not None:
                return hidden
        hidden = self.embeddings(input_ids)  # (B, L, D)
        new_state = []
        for i, layer in enumerate(self.layers):
            layer_state = None if state is None else state[i]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, layer_state = checkpoint(
                    layer, hidden, layer_state, return_state, cu_seqlens, use_reentrant=False
                )
            else:
                hidden, layer_state = layer(hidden, layer_state, return_state, cu_seqlens)
            new_state.append(layer_state)
        hidden = self.norm_f(hidden)
        return (hidden, new_state) if return_state else hidden

    def reset_parameters(self, seed: int | None = None) -> MambaBackbone:
        """Random initialisation as in mamba_ssm (for models trained from scratch and for tests)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            nn.init.normal_(self.embeddings.weight, std=0.02, generator=generator)
            for layer in self.layers:
                layer.mixer.reset_parameters(generator, n_layer=self.config.n_layer)
        return self


class ResidualBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, the residual kept in fp32 if configured."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = Mamba1Mixer(config) if config.version == 1 else Mamba2Mixer(config)

    def forward(
        self, hidden: Tensor, state: LayerState | None, return_state: bool, cu_seqlens: Tensor | None = None
    ) -> tuple[Tensor, LayerState | None]:
        normed = self.norm(hidden.to(self.norm.weight.dtype))
        if hidden.dtype == self.norm.weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            # The mixer's output projection adds the residual itself (one GEMM on CUDA; ``ops.linear``).
            # ``hidden`` is the backbone's running sum, handed over: in inference the sum is written into it.
            return self.mixer(normed, state, return_state, cu_seqlens, residual=hidden)
        out, state = self.mixer(normed, state, return_state, cu_seqlens)
        if hidden.dtype == out.dtype:
            # PyTorch adds bf16 / fp16 tensors in fp32 and rounds once, so this one kernel is the fp32
            # residual add (residual_in_fp32) without the three passes of upcast, add and downcast.
            return hidden + out, state
        residual = hidden.float() if self.residual_in_fp32 else hidden
        return (residual + out).to(out.dtype), state


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, returned in the input dtype."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            # One fused kernel on GPU (fp32 inside); five elementwise passes cost more than the scan.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: ``rmsnorm(y * silu(z)) * weight``, normalised over ``groups`` equal slices."""

    def __init__(self, size: int, groups: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups = groups
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """(..., Di) y and gate z (z may be a strided slice of in_proj's output) -> (..., Di)."""
        return ops.gated_rms_norm(y, z, self.weight, self.groups, self.eps)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) that runs through ``ops.linear``: oneDNN on CPU inference."""

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return ops.linear(x, self.weight, self.bias, residual)


class _ProjectAndSplit(torch.autograd.Function):
    """``F.linear(hidden, weight, bias).split(sizes, -1)``, with a backward that keeps the parts apart.

    Autograd's backward of ``split`` concatenates the parts' gradients into one tensor before the
    two matrix products; here each part enters the products on its own (d_hidden accumulates in
    place, d_weight is written by row blocks), which spares that copy: for Mamba-1's x and z, 4.9 ms
    of a 244 ms mamba-130m training step on the H200 (benchmarks/kernel_dev/profile_gpu.py). Mamba-2
    splits its projection in three unequal parts (z, xBC, dt), ``sizes`` a list as ``Tensor.split`` takes.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, sizes: int | list[int]) -> tuple[Tensor, ...]:
        ctx.save_for_backward(hidden, weight)
        parts = F.linear(hidden, weight, bias).split(sizes, dim=-1)
        ctx.widths, ctx.has_bias = [part.shape[-1] for part in parts], bias is not None
        return parts

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight = ctx.saved_tensors
        starts = [0, *itertools.accumulate(ctx.widths)]
        rows = hidden.reshape(-1, hidden.shape[-1])
        parts = [(g.reshape(-1, g.shape[-1]), slice(starts[i], starts[i + 1]))
                 for i, g in enumerate(grads) if g is not None]  # fmt: skip
        d_hidden = d_weight = d_bias = None
        if ctx.needs_input_grad[0] and parts:
            (first, block), *rest = parts
            d_hidden = first @ weight[block]
            for grad, block in rest:
                d_hidden.addmm_(grad, weight[block])
            d_hidden = d_hidden.view(hidden.shape)
        if ctx.needs_input_grad[1]:
            d_weight = weight.new_zeros(weight.shape) if len(parts) < len(grads) else torch.empty_like(weight)
            for grad, block in parts:
                torch.mm(grad.T, rows, out=d_weight[block])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = weight.new_zeros(weight.shape[0])
            for grad, block in parts:
                d_bias[block] = grad.sum(0)
        return d_hidden, d_weight, d_bias, None


def _conv_weight(conv: nn.Conv1d) -> Tensor:
    return conv.weight[:, 0, :]  # (C, 1, K) -> (C, K)


class Mamba1Mixer(nn.Module):
    """Mamba-1 selective SSM: per-channel decays, dt from a low-rank projection, output gated by z."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        d_inner, d_state, dt_rank = config.d_inner, config.d_state, config.dt_rank
        self.in_proj = Linear(config.d_model, 2 * d_inner, bias=config.bias)
        # The weight layout of nn.Conv1d (depthwise) keeps checkpoints interchangeable; we never call it.
        self.conv1d = nn.Conv1d(d_inner, d_inner, config.d_conv, groups=d_inner, bias=config.conv_bias)
        self.x_proj = Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = Linear(d_inner, config.d_model, bias=config.bias)

    def forward(
        self,
        hidden: Tensor,
        state: LayerState | None,
        return_state: bool,
        cu_seqlens: Tensor | None = None,
        residual: Tensor | None = None,
    ) -> tuple[Tensor, LayerState | None]:
        """(B, L, D) -> (B, L, D): the mixer's output, plus ``residual`` (consumed: see ``ops.linear``) if given."""
        d_inner, d_state, dt_rank = self.config.d_inner, self.config.d_state, self.config.dt_rank
        if torch.is_grad_enabled() and not torch.is_autocast_enabled(hidden.device.type):
            x, z = _ProjectAndSplit.apply(hidden, self.in_proj.weight, self.in_proj.bias, d_inner)  # (B, L, Di) each
        else:
            x, z = self.in_proj(hidden).split(d_inner, dim=-1)
        conv_out = ops.causal_conv1d(
            x, _conv_weight(self.conv1d), self.conv1d.bias,
            initial_state=None if state is None else state.conv, activation="silu", return_final_state=return_state,
            cu_seqlens=cu_seqlens,
        )  # fmt: skip
        x, conv_state = conv_out if return_state else (conv_out, None)
        dt, B, C = self.x_proj(x).split([dt_rank, d_state, d_state], dim=-1)  # (B, L, R), (B, L, N), (B, L, N)
        dt = ops.linear(dt, self.dt_proj.weight)  # (B, L, Di); the bias is added inside the scan
        A, D, dt_bias = self._scan_parameters()
        scan_out = ops.selective_scan(
            x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True,
            initial_state=None if state is None else state.ssm, return_final_state=return_state, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        y, ssm_state = scan_out if return_state else (scan_out, None)
        out = self.out_proj(y, residual)  # (B, L, D)
        return out, (LayerState(conv_state, ssm_state) if return_state else None)

    def _scan_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """A (Di, N), negative so that the state decays, D and dt's bias (Di,), all fp32; at inference made
        once per weight (``ops.weight_cache``), not once per call."""
        if torch.is_grad_enabled():
            return -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()
        return (
            cached(self.A_log, "A", lambda a: -torch.exp(a.float())),
            cached(self.D, "fp32", Tensor.float),
            cached(self.dt_proj.bias, "fp32", Tensor.float),
        )

    def reset_parameters(self, generator: torch.Generator | None, n_layer: int) -> None:
        cfg = self.config
        for linear in (self.in_proj, self.x_proj, self.out_proj):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.out_proj.weight /= math.sqrt(n_layer)
        nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5), generator=generator)
        if self.conv1d.bias is not None:
            nn.init.uniform_(self.conv1d.bias, -0.5, 0.5, generator=generator)
        std = cfg.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std, generator=generator)
        self.dt_proj.bias.copy_(_inverse_softplus_dt(cfg.d_inner, generator))
        # S4D-real initialisation: A = -(1, 2, ..., N) for every channel.
        self.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(cfg.d_inner, 1))
        self.D.fill_(1.0)


class Mamba2Mixer(nn.Module):
    """Mamba-2 SSD mixer: one scalar decay per head, B and C shared within groups, gated RMSNorm."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        d_inner, nheads = config.d_inner, config.nheads
        self.in_proj = Linear(config.d_model, d_inner + config.conv_dim + nheads, bias=config.bias)
        self.conv1d = nn.Conv1d(
            config.conv_dim, config.conv_dim, config.d_conv, groups=config.conv_dim, bias=config.conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.ones(nheads))
        self.norm = GatedRMSNorm(d_inner, groups=config.norm_groups, eps=config.norm_eps)
        self.out_proj = Linear(d_inner, config.d_model, bias=config.bias)

    def forward(
        self,
        hidden: Tensor,
        state: LayerState | None,
        return_state: bool,
        cu_seqlens: Tensor | None = None,
        residual: Tensor | None = None,
    ) -> tuple[Tensor, LayerState | None]:
        """(B, L, D) -> (B, L, D): the mixer's output, plus ``residual`` (consumed: see ``ops.linear``) if given."""
        cfg = self.config
        sizes = [cfg.d_inner, cfg.conv_dim, cfg.nheads]
        # z, xBC, dt: (B, L, Di), (B, L, conv_dim), (B, L, H), strided views of one (B, L, Di + conv_dim + H) tensor
        if torch.is_grad_enabled() and not torch.is_autocast_enabled(hidden.device.type):
            z, xBC, dt = _ProjectAndSplit.apply(hidden, self.in_proj.weight, self.in_proj.bias, sizes)
        else:
            z, xBC, dt = self.in_proj(hidden).split(sizes, dim=-1)
        conv_out = ops.causal_conv1d(
            xBC, _conv_weight(self.conv1d), self.conv1d.bias,
            initial_state=None if state is None else state.conv, activation="silu", return_final_state=return_state,
            cu_seqlens=cu_seqlens,
        )  # fmt: skip
        xBC, conv_state = conv_out if return_state else (conv_out, None)
        x, B, C = xBC.split([cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        A, D, dt_bias = self._scan_parameters()
        # Splitting the last dim only: x, B and C stay views of the convolution's output, dt and z of in_proj's
        # (the Triton kernels read them through their strides; the PyTorch paths make what copies they need).
        scan_out = ops.ssd_scan(
            x.unflatten(-1, (cfg.nheads, cfg.headdim)),  # (B, L, H, P)
            dt,  # (B, L, H)
            A,  # (H,)
            B.unflatten(-1, (cfg.ngroups, cfg.d_state)),  # (B, L, G, N)
            C.unflatten(-1, (cfg.ngroups, cfg.d_state)),
            D, dt_bias=dt_bias, dt_softplus=True, dt_limit=cfg.dt_limit,
            initial_state=None if state is None else state.ssm, return_final_state=return_state, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        y, ssm_state = scan_out if return_state else (scan_out, None)
        out = self.out_proj(self.norm(y.flatten(-2), z), residual)  # (B, L, H, P) -> (B, L, Di) -> (B, L, D)
        return out, (LayerState(conv_state, ssm_state) if return_state else None)

    def _scan_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """A (H,), negative so that the state decays, D and dt's bias (H,), all fp32; at inference made once
        per weight (``ops.weight_cache``), not once per call."""
        if torch.is_grad_enabled():
            return -torch.exp(self.A_log.float()), self.D.float(), self.dt_bias.float()
        return (
            cached(self.A_log, "A", lambda a: -torch.exp(a.float())),
            cached(self.D, "fp32", Tensor.float),
            cached(self.dt_bias, "fp32", Tensor.float),
        )

    def reset_parameters(self, generator: torch.Generator | None, n_layer: int) -> None:
        cfg = self.config
        for linear in (self.in_proj, self.out_proj):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.out_proj.weight /= math.sqrt(n_layer)
        nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5), generator=generator)
        if self.conv1d.bias is not None:
            nn.init.uniform_(self.conv1d.bias, -0.5, 0.5, generator=generator)
        self.dt_bias.copy_(_inverse_softplus_dt(cfg.nheads, generator))
        self.A_log.copy_(torch.log(torch.empty(cfg.nheads).uniform_(1, 16, generator=generator)))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)


def _inverse_softplus_dt(size: int, generator: torch.Generator | None, dt_min=1e-3, dt_max=0.1) -> Tensor:
    """Biases whose softplus is log-uniform in [dt_min, dt_max], as mamba_ssm initialises dt."""
    u = torch.rand(size, generator=generator)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))

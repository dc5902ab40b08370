"""Small building blocks shared by the Step3 pieces: RMSNorm, RoPE, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afd import envs
from afd.quantization import BlockScales, fp8_round_trip
from attn_worker.kernels.fp8_linear import fp8_linear
from attn_worker.kernels.rms_norm import add_rms_norm, rms_norm
from attn_worker.kernels.rope import rope_qk

# On CUDA, norms, RoPE, the router's top-k and the KV-cache write run as fused Triton kernels
# (attn_worker/kernels/)
# unless AFD_TORCH_ELEMENTWISE=1; benchmarks flip this to time both paths in one run.
FUSED_KERNELS = not envs.TORCH_ELEMENTWISE


def use_fused(*tensors: torch.Tensor) -> bool:
    """Whether the fused Triton kernels take these tensors (CUDA, not switched off)."""
    return FUSED_KERNELS and all(t.is_cuda for t in tensors)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x) and x.dim() == 2 and x.dtype == self.weight.dtype and x.stride(1) == 1:
            return rms_norm(x, self.weight, self.eps)
        # fp32 statistics, as every Step3 implementation does, then back to the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight

    def add(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A residual add and this norm: (h + delta, norm(h + delta)), one kernel on CUDA."""
        fusable = h.dim() == 2 and delta.shape == h.shape and h.stride(1) == delta.stride(1) == 1
        if use_fused(h, delta) and fusable and h.dtype == delta.dtype == self.weight.dtype:
            return add_rms_norm(h, delta, self.weight, self.eps)
        h = h + delta
        return h, self(h)


class Rope:
    """Rotate-half RoPE over the full head dim; cos/sin are computed in fp32 per call."""

    def __init__(self, head_dim: int, theta: float) -> None:
        # built on the CPU explicitly: modules may be constructed under a meta-device context
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim
        self.inv_freq = (1.0 / theta**exponent).float()  # [D/2]
        self._on: dict[torch.device, torch.Tensor] = {}  # inv_freq per device

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one copy per device, made on first use: a copy per call would be a host-to-device
        # transfer inside every captured CUDA graph
        inv = self._on.get(positions.device)
        if inv is None:
            inv = self._on[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos(), emb.sin()

    @staticmethod
    def apply_qk(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q [T, Hq, D] and k [T, Hk, D]: one kernel for both on CUDA."""
        if use_fused(q, k, cos, sin) and q.stride(-1) == k.stride(-1) == 1:
            return rope_qk(q, k, cos.contiguous(), sin.contiguous())
        return Rope.apply(q, cos, sin), Rope.apply(k, cos, sin)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D]; cos/sin: [T, D]."""
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, scales: BlockScales | None) -> torch.Tensor:
    """x Wᵀ for a 16-bit weight (scales None) or an e4m3 one with its scales: the Triton
    fp8_linear kernel on CUDA (x per row to e4m3, products on fp8 tensor cores); on the CPU
    the weight dequantized and x rounded through e4m3 per row as the kernel does, so that
    both devices compute the same numbers."""
    if scales is None:
        return F.linear(x, weight)
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1:
        return fp8_linear(x, weight, scales)
    return F.linear(fp8_round_trip(x), scales.dequantize(weight, x.dtype))


class Fp8Linear(nn.Module):
    """A bias-free linear layer with its weight [out, in] in e4m3 and fp32 block scales: a
    block-FP8 checkpoint's projection as stored, or one quantized at load with a scale per
    output channel (--fp8-attention). The weight keeps its checkpoint name."""

    def __init__(self, weight: torch.Tensor, scales: BlockScales) -> None:
        super().__init__()
        assert weight.dtype == torch.float8_e4m3fn and weight.dim() == 2
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scales.scale)
        self.block = scales.block

    @property
    def scales(self) -> BlockScales:
        """Read from the buffer each time, so that it follows the module when it moves."""
        return BlockScales(self.weight_scale, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.scales)


def swiglu(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); weights in [out, in] layout as in the checkpoint."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

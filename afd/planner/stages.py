"""Per-layer stage times of one micro-batch (PLANNER.md §3): from datasheet peaks or a profile."""

from __future__ import annotations

from dataclasses import dataclass

from afd.planner.hardware import Hardware
from afd.planner.models import ModelSpec
from afd.planner.profile import Profile

F2A_BYTES = 2  # FFN results return in BF16


@dataclass(frozen=True)
class Layout:
    """Attention instances are data parallel (MFA's single KV head forbids TP); the FFN
    instances together form one expert pool that every attention rank sends each token to."""

    attn_hw: Hardware
    num_attn_instances: int
    attn_instance_size: int
    ffn_hw: Hardware
    num_ffn_instances: int
    ffn_instance_size: int

    @property
    def attn_ranks(self) -> int:
        return self.num_attn_instances * self.attn_instance_size

    @property
    def ffn_ranks(self) -> int:
        return self.num_ffn_instances * self.ffn_instance_size

    @property
    def num_gpus(self) -> int:
        return self.attn_ranks + self.ffn_ranks

    @property
    def price_per_hour(self) -> float:
        ffn = self.ffn_ranks * self.ffn_hw.price_per_hour
        return self.attn_ranks * self.attn_hw.price_per_hour + ffn

    @property
    def a2f_bytes(self) -> int:
        """FP8 activations only when both sides have FP8 tensor cores."""
        return 1 if self.attn_hw.has_fp8 and self.ffn_hw.has_fp8 else 2

    def transfer_tokens(self, batch: int) -> float:
        """Tokens over the busier NIC: an attention rank sends its micro-batch to every FFN
        instance; an FFN rank receives its 1/size share of all attention ranks' tokens."""
        ffn_side = self.attn_ranks * batch / self.ffn_instance_size
        return max(self.num_ffn_instances * batch, ffn_side)


@dataclass(frozen=True)
class Stages:
    """Seconds per layer for one micro-batch."""

    attention: float
    ffn_dense: float
    ffn_moe: float
    a2f: float
    f2a: float


@dataclass(frozen=True)
class Efficiency:
    attention: float = 1.0
    ffn: float = 1.0


class StageModel:
    """Datasheet roofline (max of bytes/bandwidth and FLOPs/peak, over an efficiency factor),
    replaced by measured times for the roles that run on the profiled hardware."""

    def __init__(
        self,
        spec: ModelSpec,
        context: int,
        kv_bytes: float = 1.0,
        efficiency: Efficiency | None = None,
        profile: Profile | None = None,
        profile_hw: Hardware | None = None,
    ) -> None:
        self.spec, self.context, self.kv_bytes = spec, context, kv_bytes
        self.eff = efficiency or Efficiency()
        self.profile, self.profile_hw = profile, profile_hw

    def calibrated(self, hw: Hardware) -> bool:
        return self.profile is not None and self.profile_hw == hw

    def weight_bytes(self, hw: Hardware) -> int:
        """Bytes per weight on `hw`: the profile's where its times stand in, so that memory
        and time describe one deployment; elsewhere FP8 where `hw` has it (PLANNER.md §1)."""
        if self.profile is not None and self.calibrated(hw):
            return self.profile.weight_bytes
        return hw.weight_bytes

    def stages(self, layout: Layout, batch: int, network_gbps: float) -> Stages:
        tokens = layout.attn_ranks * batch
        dense, moe = self.ffn(layout.ffn_hw, tokens, layout.ffn_ranks)
        a2f, f2a = self.transfer(layout, batch, network_gbps)
        return Stages(self.attention(layout.attn_hw, batch), dense, moe, a2f, f2a)

    def attention(self, hw: Hardware, batch: int) -> float:
        if self.profile is not None and self.calibrated(hw):
            return self.profile.attention_us(batch, self.context) * 1e-6
        s, ctx = self.spec, batch * self.context
        core = max(
            ctx * s.kv_elems * self.kv_bytes / hw.mem_bandwidth,
            ctx * s.attn_flops_per_ctx_layer / hw.peak_flops,
        )
        linear = _roofline(
            hw, s.attn_linear_params * hw.weight_bytes, batch * 2 * s.attn_linear_params
        )
        return (core + linear) / self.eff.attention

    def ffn(self, hw: Hardware, tokens: int, ranks: int) -> tuple[float, float]:
        """(dense layer, MoE layer) seconds on one of `ranks` FFN devices sharing the work."""
        if self.profile is not None and self.calibrated(hw):
            t = self.profile.ffn_us(tokens) * 1e-6 / ranks
            return t, t
        s, wb = self.spec, hw.weight_bytes
        dense = _roofline(
            hw, s.dense_ffn_params * wb / ranks, tokens * 2 * s.dense_ffn_params / ranks
        )
        touched = s.num_experts * (1.0 - (1.0 - s.top_k / s.num_experts) ** tokens)
        moe_bytes = (touched * s.expert_params + s.shared_params) * wb / ranks
        moe = _roofline(hw, moe_bytes, tokens * 2 * s.moe_active_params / ranks)
        return dense / self.eff.ffn, moe / self.eff.ffn

    def transfer(self, layout: Layout, batch: int, network_gbps: float) -> tuple[float, float]:
        tokens, a2f_bytes = layout.transfer_tokens(batch), layout.a2f_bytes
        if self.profile is not None and self.calibrated(layout.attn_hw):
            round_trip = self.profile.transfer_us(tokens) * 1e-6
            return _split(round_trip, a2f_bytes)
        per_token = self.spec.hidden_size / (network_gbps * 1e9 / 8)
        return tokens * a2f_bytes * per_token, tokens * F2A_BYTES * per_token


def _roofline(hw: Hardware, num_bytes: float, flops: float) -> float:
    return max(num_bytes / hw.mem_bandwidth, flops / hw.peak_flops)


def _split(round_trip: float, a2f_bytes: int) -> tuple[float, float]:
    """A measured round trip shared between the two directions by their payload sizes."""
    a2f = round_trip * a2f_bytes / (a2f_bytes + F2A_BYTES)
    return a2f, round_trip - a2f

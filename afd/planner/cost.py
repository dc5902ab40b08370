"""Per-token decode cost (PLANNER.md §1): bytes and FLOPs per token, USD per 1M output tokens."""

from __future__ import annotations

from dataclasses import dataclass

from afd.planner.hardware import Hardware
from afd.planner.models import ModelSpec

SECONDS_PER_HOUR = 3600.0
TOKENS_PER_MTOK = 1e6


@dataclass(frozen=True)
class TokenCost:
    """What one generated token costs at a context of `context` tokens, summed over layers."""

    model: str
    context: int
    kv_bytes: float
    attn_flops: float
    linear_flops: float
    ffn_flops: float


@dataclass(frozen=True)
class RoleCost:
    hardware: str
    attention: float  # USD per 1M output tokens
    ffn: float

    @property
    def total(self) -> float:
        return self.attention + self.ffn


def token_cost(spec: ModelSpec, context: int, kv_bytes_per_elem: float = 1.0) -> TokenCost:
    layers = spec.num_layers
    moe_flops = spec.num_moe_layers * 2 * spec.moe_active_params
    return TokenCost(
        model=spec.name,
        context=context,
        kv_bytes=float(spec.kv_elems * kv_bytes_per_elem * layers * context),
        attn_flops=float(spec.attn_flops_per_ctx_layer * layers * context),
        linear_flops=float(2 * spec.attn_linear_params * layers),
        ffn_flops=float(spec.num_dense_layers * 2 * spec.dense_ffn_params + moe_flops),
    )


def role_cost(tc: TokenCost, hw: Hardware) -> RoleCost:
    usd_per_second = hw.price_per_hour / SECONDS_PER_HOUR
    u_flop = usd_per_second / hw.peak_flops
    u_byte = usd_per_second / hw.mem_bandwidth
    attention = max(tc.attn_flops * u_flop, tc.kv_bytes * u_byte) + tc.linear_flops * u_flop
    ffn = tc.ffn_flops * u_flop
    return RoleCost(hw.name, attention * TOKENS_PER_MTOK, ffn * TOKENS_PER_MTOK)


def cost_table(tc: TokenCost, hardware: list[Hardware]) -> list[RoleCost]:
    return [role_cost(tc, hw) for hw in hardware]


def best_colocated(costs: list[RoleCost]) -> RoleCost:
    """Without AFD both roles share one device kind."""
    return min(costs, key=lambda c: c.total)


def best_afd(costs: list[RoleCost]) -> tuple[RoleCost, RoleCost]:
    """With AFD each role picks its own cheapest kind: (attention's, FFN's)."""
    return min(costs, key=lambda c: c.attention), min(costs, key=lambda c: c.ffn)

"""Deployment search (PLANNER.md §3): layouts, micro-batches and batch under TPOT and memory."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from afd.planner.cost import SECONDS_PER_HOUR, TOKENS_PER_MTOK
from afd.planner.hardware import Hardware
from afd.planner.stages import Layout, StageModel, Stages

Shape = tuple[int, int]  # (instances, devices per instance)


@dataclass(frozen=True)
class Limits:
    tpot_s: float
    mem_util: float = 0.9  # the rest is runtime, activations and fragmentation
    max_batch: int = 16384  # sequences per attention rank per micro-batch


@dataclass(frozen=True)
class Space:
    attn_hw: tuple[Hardware, ...]
    ffn_hw: tuple[Hardware, ...]
    attn_shapes: tuple[Shape, ...]
    ffn_shapes: tuple[Shape, ...]
    micro_batches: tuple[int, ...] = (1, 2, 3, 4)
    network_gbps: tuple[float, ...] = (400.0,)
    max_gpus: int = 64


@dataclass(frozen=True)
class Plan:
    layout: Layout
    micro_batches: int
    batch: int  # sequences per attention rank per micro-batch
    network_gbps: float
    stages: Stages
    tpot_s: float
    attn_mem_bytes: float
    ffn_mem_bytes: float
    binding: str
    calibrated: bool

    @property
    def tokens_per_s(self) -> float:
        return self.layout.attn_ranks * self.micro_batches * self.batch / self.tpot_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.layout.num_gpus

    @property
    def cost_per_mtok(self) -> float:
        return self.layout.price_per_hour / SECONDS_PER_HOUR / self.tokens_per_s * TOKENS_PER_MTOK

    @property
    def ratio(self) -> Fraction:
        return Fraction(self.layout.attn_ranks, self.layout.ffn_ranks)


def default_shapes(sizes: Iterable[int] = (1, 2, 4, 8), counts: int = 8) -> tuple[Shape, ...]:
    return tuple((n, g) for g in sizes for n in range(1, counts + 1))


def layer_time(tf: float, st: Stages, m: int) -> tuple[float, str]:
    """One layer with m micro-batches: each resource serves m of them, and one micro-batch's
    round trip A -> F -> A must close before its next layer (m >= 2(1 + transfer/compute))."""
    terms = {
        "attention stage": m * st.attention,
        "FFN stage": m * tf,
        "A->F link": m * st.a2f,
        "F->A link": m * st.f2a,
        "pipeline depth": st.attention + st.a2f + tf + st.f2a,
    }
    name = max(terms, key=lambda k: terms[k])
    return terms[name], name


def _layer_seconds(tf: float, st: Stages, m: int) -> float:
    """layer_time without naming the binding term: the search's hot path."""
    return max(m * max(st.attention, tf, st.a2f, st.f2a), st.attention + st.a2f + tf + st.f2a)


class Planner:
    def __init__(self, model: StageModel, limits: Limits) -> None:
        self.model, self.limits, self.spec = model, limits, model.spec

    def tpot(self, st: Stages, m: int) -> tuple[float, str]:
        dense, _ = layer_time(st.ffn_dense, st, m)
        moe, binding = layer_time(st.ffn_moe, st, m)
        if self.spec.num_moe_layers == 0:
            binding = layer_time(st.ffn_dense, st, m)[1]
        return self.spec.num_dense_layers * dense + self.spec.num_moe_layers * moe, binding

    def attn_weights_bytes(self, hw: Hardware) -> float:
        s = self.spec
        weights = s.attn_linear_params * s.num_layers * self.model.weight_bytes(hw)
        return weights + s.embedding_params * 2

    def kv_bytes_per_seq(self) -> float:
        s, m = self.spec, self.model
        return s.kv_elems * m.kv_bytes * s.num_layers * m.context

    def ffn_mem_bytes(self, layout: Layout) -> float:
        weights = self.spec.ffn_total_params * self.model.weight_bytes(layout.ffn_hw)
        return weights / layout.ffn_ranks

    def memory_batch(self, hw: Hardware, m: int) -> int:
        """Largest per-micro-batch batch whose KV (all m micro-batches) fits beside weights."""
        free = hw.memory_bytes * self.limits.mem_util - self.attn_weights_bytes(hw)
        return max(0, int(free // (m * self.kv_bytes_per_seq())))

    def plan(self, layout: Layout, m: int, gbps: float) -> Plan | None:
        if self.ffn_mem_bytes(layout) > layout.ffn_hw.memory_bytes * self.limits.mem_util:
            return None
        b_mem = self.memory_batch(layout.attn_hw, m)
        hi = min(b_mem, self.limits.max_batch)
        if hi < 1 or not self.fits_tpot(layout, 1, m, gbps):
            return None
        lo = hi if self.fits_tpot(layout, hi, m, gbps) else 1  # memory often binds first
        while lo < hi:  # largest b meeting the TPOT target; time grows with b
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.fits_tpot(layout, mid, m, gbps) else (lo, mid - 1)
        best = self.best_batch(layout, lo, m, gbps)
        return self.build(layout, best, m, gbps, b_mem, peak=best < lo)

    def tpot_s(self, layout: Layout, b: int, m: int, gbps: float) -> float:
        st = self.model.stages(layout, b, gbps)
        dense, moe = _layer_seconds(st.ffn_dense, st, m), _layer_seconds(st.ffn_moe, st, m)
        return self.spec.num_dense_layers * dense + self.spec.num_moe_layers * moe

    def fits_tpot(self, layout: Layout, b: int, m: int, gbps: float) -> bool:
        return self.tpot_s(layout, b, m, gbps) <= self.limits.tpot_s

    def best_batch(self, layout: Layout, hi: int, m: int, gbps: float) -> int:
        """The batch in [1, hi] that serves the most tokens/s (b / TPOT). That is hi wherever
        TPOT grows no faster than the batch, as modelled and interpolated times do; a
        profile extended past its measured contexts can grow faster (its last segments'
        slopes add up), and then a smaller batch serves more, so a looser TPOT target would
        otherwise give fewer tokens/s. Geometric candidates from hi down, then a local
        refinement; ties keep the larger batch."""

        def rate(b: int) -> float:
            return b / self.tpot_s(layout, b, m, gbps)

        candidates, b = [hi], hi
        while b > 1:
            b = max(1, min(b - 1, int(b * 0.9)))
            candidates.append(b)
        best = max(candidates, key=rate)  # the first (largest) of equals
        step = max(1, best // 20)
        while step:
            better = [
                c for c in (best + step, best - step) if 1 <= c <= hi and rate(c) > rate(best)
            ]
            if better:
                best = better[0]
            else:
                step //= 2
        return best

    def build(
        self, layout: Layout, b: int, m: int, gbps: float, b_mem: int, peak: bool = False
    ) -> Plan:
        st = self.model.stages(layout, b, gbps)
        tpot, binding = self.tpot(st, m)
        if peak:  # a larger batch fits the target but serves fewer tokens/s
            binding = "throughput peak"
        elif b == b_mem:
            binding = "attention memory"
        elif b == self.limits.max_batch:
            binding = "batch cap"
        attn_mem = self.attn_weights_bytes(layout.attn_hw) + m * b * self.kv_bytes_per_seq()
        calibrated = self.model.calibrated(layout.attn_hw) or self.model.calibrated(layout.ffn_hw)
        return Plan(
            layout, m, b, gbps, st, tpot, attn_mem, self.ffn_mem_bytes(layout), binding, calibrated
        )

    def search(self, space: Space) -> list[Plan]:
        plans = []
        for layout in layouts(space):
            for m in space.micro_batches:
                for gbps in space.network_gbps:
                    plan = self.plan(layout, m, gbps)
                    if plan is not None:
                        plans.append(plan)
        return plans


def layouts(space: Space) -> Iterable[Layout]:
    # Attention ranks are interchangeable data-parallel ranks: only their total matters, so
    # keep one shape per total (the fewest, largest instances).
    by_total: dict[int, Shape] = {}
    for n, g in sorted(space.attn_shapes, key=lambda s: s[1]):
        by_total[n * g] = (n, g)
    for na, ga in by_total.values():
        for nf, gf in _ffn_shapes(na * ga, space.ffn_shapes):
            if na * ga + nf * gf > space.max_gpus:
                continue
            for ahw in space.attn_hw:
                for fhw in space.ffn_hw:
                    yield Layout(ahw, na, ga, fhw, nf, gf)


def _ffn_shapes(attn_ranks: int, shapes: tuple[Shape, ...]) -> list[Shape]:
    """Per FFN device count, the shape with the least traffic on the busier NIC (see
    Layout.transfer_tokens); the others give the same plan with slower transfers."""
    best: dict[int, Shape] = {}
    for n, g in sorted(shapes, key=lambda s: (max(s[0], attn_ranks / s[1]), s[0])):
        best.setdefault(n * g, (n, g))
    return list(best.values())


def rank(plans: list[Plan], by: str) -> list[Plan]:
    if by == "cost":
        return sorted(plans, key=lambda p: (p.cost_per_mtok, p.layout.num_gpus))
    return sorted(plans, key=lambda p: (-p.tokens_per_s_per_gpu, p.layout.num_gpus))


def best_per_ratio(plans: list[Plan], by: str) -> list[Plan]:
    """The best plan at each attention:FFN device ratio, by ratio."""
    best: dict[Fraction, Plan] = {}
    for plan in rank(plans, by):
        best.setdefault(plan.ratio, plan)
    return [best[r] for r in sorted(best)]

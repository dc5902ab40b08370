"""Engine-side Prometheus metrics (vLLM's names with an `afd:` prefix), fed from the
coordinator's per-step EngineStats in the API server process and served by /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from afd.server.messages import EngineStats

_STEP_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.06,
    0.08,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
)


class EngineMetrics:
    def __init__(self) -> None:
        self.running = Gauge("afd:num_requests_running", "Sequences running on attention ranks.")
        self.waiting = Gauge("afd:num_requests_waiting", "Sequences waiting for admission.")
        self.kv_usage = Gauge("afd:kv_cache_usage_perc", "Fraction of KV blocks in use.", ["rank"])
        self.preemptions = Counter("afd:num_preemptions", "Sequences preempted (recompute).")
        self.prefix_queries = Counter("afd:prefix_cache_queries", "Prompt tokens looked up.")
        self.prefix_hits = Counter("afd:prefix_cache_hits", "Prompt tokens found cached.")
        self.step_phase = Histogram(
            "afd:step_phase_seconds", "Time per step by phase.", ["phase"], buckets=_STEP_BUCKETS
        )
        self.predicted = Gauge("afd:predicted_step_seconds", "Step-time model's last prediction.")
        self._last = EngineStats()

    def update(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        for rank, usage in enumerate(stats.kv_usage):
            self.kv_usage.labels(str(rank)).set(usage)
        self.preemptions.inc(max(0, stats.num_preemptions - self._last.num_preemptions))
        self.prefix_queries.inc(max(0, stats.prefix_queries - self._last.prefix_queries))
        self.prefix_hits.inc(max(0, stats.prefix_hits - self._last.prefix_hits))
        for phase, seconds in stats.step_phases.items():
            self.step_phase.labels(phase).observe(seconds)
        self.predicted.set(stats.predicted_step_s)
        self._last = stats

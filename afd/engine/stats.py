"""A snapshot of the engine for metrics: queue sizes, KV usage per rank, last step's phases."""

from __future__ import annotations

from afd.engine.engine_core import EngineCore
from afd.server.messages import EngineStats


def engine_stats(engine: EngineCore) -> EngineStats:
    sched = engine.scheduler
    phases = {"schedule": engine.last_schedule_s}
    if engine.last_results:
        # the step waits for the slowest attention rank, so report each phase's maximum
        for name in ("attention", "ffn", "ffn_wait", "sampling", "total"):
            phases[name] = max(getattr(r.timings, name) for r in engine.last_results)
    return EngineStats(
        num_running=sched.num_running,
        num_waiting=len(sched.waiting),
        kv_usage=[b.usage for b in sched.blocks],
        num_preemptions=sched.num_preemptions,
        prefix_queries=sum(b.num_queries for b in sched.blocks),
        prefix_hits=sum(b.num_hits for b in sched.blocks),
        step_phases=phases,
        predicted_step_s=engine.last_predicted_s,
    )

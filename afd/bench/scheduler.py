"""`afd-bench scheduler [--json]`: the coordinator's own cost per step (schedule + plan
encoding) with N running sequences per attention rank, on the CPU with a fake executor."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from afd.arg_types import positive_int, positive_ints
from afd.engine.admission import TPOTAdmission
from afd.engine.engine_core import EngineCore
from afd.engine.executor import Executor
from afd.engine.messages import SampledToken, StepResult
from afd.engine.scheduler import Scheduler, SchedulerConfig
from afd.engine.sequence import Sequence
from afd.engine.step_time import StepTimeModel
from afd.sampling_params import SamplingParams
from attn_worker.messages import StepPlan
from transport.codec import encode


class _InstantExecutor(Executor):
    """Returns one sampled token per sampling chunk, instantly."""

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        return [
            StepResult(p.step, r, [SampledToken(i, 11) for i in _sampling_ids(p)])
            for r, p in enumerate(plans)
        ]

    def shutdown(self) -> None:
        self.num_ranks = 0


def _sampling_ids(plan: StepPlan) -> list[int]:
    return [c.seq_id for c in plan.chunks if c.sample] + plan.decode_seq_ids


def running_engine(num_seqs: int, num_ranks: int, prompt_len: int) -> EngineCore:
    """An engine whose ranks each hold num_seqs sequences in steady decode."""
    block = 16
    blocks = num_seqs * (-(-(prompt_len + 4096) // block))
    config = SchedulerConfig(
        num_ranks=num_ranks,
        num_kv_blocks=blocks,
        block_size=block,
        max_num_batched_tokens=1 << 30,
        max_num_seqs=num_seqs,
        num_micro_batches=3,
        max_model_len=1 << 20,
    )
    model = StepTimeModel(prior=(0.0, 0.0, 0.0, 0.0))  # admit everything: we time the loop
    engine = EngineCore(
        Scheduler(config, TPOTAdmission(model, 1.0)),
        _InstantExecutor(num_ranks),
        (),
        1 << 20,
        model,
    )
    params = SamplingParams(max_tokens=None, ignore_eos=True)
    for i in range(num_seqs * num_ranks):
        prompt = [(i * 7 + j) % 1000 for j in range(prompt_len)]
        engine.add(Sequence(i, str(i), 0, prompt, params))
    while engine.scheduler.waiting or any(s.num_remaining_tokens > 1 for s in engine.seqs.values()):
        engine.step()
    return engine


def time_steps(engine: EngineCore, steps: int) -> list[float]:
    """Seconds per step of schedule() + encoding every plan (the coordinator's cost)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = engine.scheduler.schedule()
        for plan in out.plans:
            encode(plan)
        times.append(time.perf_counter() - t0)
        engine.update(out, engine.executor.execute(out.plans))
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="afd-bench scheduler", description=__doc__)
    parser.add_argument(
        "--sizes", type=positive_ints, default=[256, 1024, 4096], help="running sequences per rank"
    )
    parser.add_argument("--ranks", type=positive_int, default=1, help="attention ranks")
    parser.add_argument("--steps", type=positive_int, default=50)
    parser.add_argument("--prompt-len", type=positive_int, default=64)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    results = []
    for size in args.sizes:
        engine = running_engine(size, args.ranks, args.prompt_len)
        times = time_steps(engine, args.steps)
        results.append(
            {
                "running_seqs": size,
                "ms_per_step": 1e3 * float(np.median(times)),
                "p90_ms": 1e3 * float(np.percentile(times, 90)),
                "ranks": args.ranks,
            }
        )
    if args.json:
        meta = {
            "command": "afd-bench scheduler " + " ".join(argv),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        }
        print(json.dumps({"results": results, **meta}))
    else:
        print(f"{'running seqs/rank':>18} {'ms/step (median)':>17} {'p90 ms':>8}")
        for r in results:
            print(f"{r['running_seqs']:>18} {r['ms_per_step']:>17.3f} {r['p90_ms']:>8.3f}")
    return 0

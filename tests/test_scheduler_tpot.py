"""TPOT-aware admission against a target-blind FCFS policy and static batch caps, with a fake
executor whose step time is a known function of the batch (virtual clock)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest

from afd.engine.admission import Admission, AdmitAll, TPOTAdmission
from afd.engine.engine_core import EngineCore
from afd.engine.scheduler import Scheduler, SchedulerConfig
from afd.engine.sequence import Sequence
from afd.engine.step_time import StepTimeModel
from afd.sampling_params import SamplingParams
from tests.fake_executor import FakeExecutor, VirtualClock

TARGET_S = 0.050
HORIZON_S = 12.0
RANKS = 2


@dataclass
class Result:
    p99_tpot: float
    throughput: float  # output tokens per second over the horizon


def simulate(
    admission: Admission,
    model: StepTimeModel,
    max_num_seqs: int,
    max_batched: int,
    rate: float = 60.0,
    seed: int = 0,
) -> Result:
    rng = random.Random(seed)
    clock = VirtualClock()
    config = SchedulerConfig(
        num_ranks=RANKS,
        num_kv_blocks=20000,
        block_size=16,
        max_num_batched_tokens=max_batched,
        max_num_seqs=max_num_seqs,
        max_model_len=8192,
    )
    engine = EngineCore(
        Scheduler(config, admission), FakeExecutor(RANKS, clock), (), 8192, model, clock.now
    )
    arrivals, t = [], 0.0
    while t < HORIZON_S:  # Poisson arrivals, well above what the fake cluster can serve
        t += rng.expovariate(rate)
        arrivals.append(t)
    params = SamplingParams(max_tokens=96, ignore_eos=True, temperature=0.0)
    seqs: list[Sequence] = []
    while clock.t < HORIZON_S:
        while arrivals and arrivals[0] <= clock.t:
            prompt = [rng.randrange(1000) for _ in range(rng.randint(64, 512))]
            seq = Sequence(len(seqs), str(len(seqs)), 0, prompt, params)
            seq.arrival_time = arrivals.pop(0)
            seqs.append(seq)
            engine.add(seq)
        if engine.has_work():
            engine.step()
        elif arrivals:
            clock.t = arrivals[0]
    return measure(seqs)


def measure(seqs: list[Sequence]) -> Result:
    tpots = [
        (s.last_token_time - s.first_token_time) / (len(s.output_token_ids) - 1)
        for s in seqs
        if len(s.output_token_ids) >= 2
    ]
    tokens = sum(len(s.output_token_ids) for s in seqs)
    return Result(float(np.percentile(tpots, 99)), tokens / HORIZON_S)


def tpot_policy() -> tuple[Admission, StepTimeModel]:
    model = StepTimeModel()
    return TPOTAdmission(model, TARGET_S), model


@pytest.fixture(scope="module")
def tpot_aware() -> Result:
    admission, model = tpot_policy()
    return simulate(admission, model, max_num_seqs=1024, max_batched=2048)


def test_tpot_admission_keeps_p99_within_target_where_fcfs_breaks_it(tpot_aware):
    blind = simulate(AdmitAll(), StepTimeModel(), max_num_seqs=1024, max_batched=2048)
    assert tpot_aware.p99_tpot <= TARGET_S
    assert blind.p99_tpot > TARGET_S * 1.5


def test_throughput_close_to_best_static_cap(tpot_aware):
    best = 0.0
    for cap in (64, 128, 192, 256, 320):
        for tokens in (64, 256):
            r = simulate(AdmitAll(), StepTimeModel(), max_num_seqs=cap, max_batched=tokens)
            if r.p99_tpot <= TARGET_S:
                best = max(best, r.throughput)
    assert best > 0
    assert tpot_aware.throughput >= 0.85 * best, (tpot_aware.throughput, best)


def test_step_time_model_learns_the_true_function():
    admission, model = tpot_policy()
    simulate(admission, model, max_num_seqs=1024, max_batched=2048)
    errors = [abs(model.predict_features(x) - y) / y for x, y in list(model.samples)[-100:]]
    assert np.median(errors) < 0.05

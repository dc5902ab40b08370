"""--restart-on-failure in the coordinator, with fake executors: when a rank fails, requests
that had started fail with the error, the engine is rebuilt from its settings, requests that
were still waiting run on the new ranks, and the API server hears EngineRestarted."""

from __future__ import annotations

import pytest
import zmq

from afd.engine import coordinator as coordinator_module
from afd.engine.builder import EngineSettings
from afd.engine.coordinator import Coordinator
from afd.engine.engine_core import EngineCore
from afd.engine.executor import Executor, ExecutorError
from afd.engine.messages import AddRequest, StepResult
from afd.engine.scheduler import Scheduler, SchedulerConfig
from afd.sampling_params import SamplingParams
from afd.server.messages import EngineRestarted, StepOutputs
from attn_worker.messages import StepPlan
from tests.fake_executor import FakeExecutor, VirtualClock
from transport.codec import decode


class DeadRank(Executor):
    num_ranks = 1

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        raise ExecutorError("step 1: rank f0 (Ray actor) exited with code 1")

    def shutdown(self) -> None:
        pass


def engine(executor: Executor) -> EngineCore:
    # one sequence at a time: the first request runs, the second waits
    config = SchedulerConfig(num_ranks=1, num_kv_blocks=64, block_size=4, max_num_seqs=1)
    return EngineCore(Scheduler(config), executor, (), 256)


def request(request_id: str) -> AddRequest:
    params = SamplingParams(n=1, max_tokens=3, temperature=0.0, ignore_eos=True)
    return AddRequest(request_id, [5, 6, 7], params)


@pytest.fixture
def sockets():
    ctx = zmq.Context()
    outbox, api = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    api.bind("inproc://api")
    outbox.connect("inproc://api")
    yield outbox, api
    outbox.close(0)
    api.close(0)
    ctx.term()


def received(api: zmq.Socket) -> list[object]:
    msgs = []
    while api.poll(100):
        msgs.append(decode(api.recv()))
    return msgs


def test_failed_rank_fails_started_requests_and_requeues_waiting_ones(sockets, monkeypatch):
    outbox, api = sockets
    settings = EngineSettings(model="unused", colocated=False, restart_on_failure=True)
    fresh = engine(FakeExecutor(1, VirtualClock()))
    monkeypatch.setattr(coordinator_module, "build_engine", lambda s: fresh)
    coord = Coordinator(engine(DeadRank()), None, outbox, restart_with=settings)
    coord._add(request("started"))
    coord._add(request("waiting"))
    coord._step()

    failed, restarted = received(api)
    assert isinstance(failed, StepOutputs) and "rank f0" in failed.engine_error
    assert [(u.request_id, u.finish_reason) for u in failed.updates] == [("started", "error")]
    assert isinstance(restarted, EngineRestarted) and "attention 1x1" in restarted.layout
    assert coord.error is None and coord.engine is fresh
    assert list(coord.by_request) == ["waiting"]

    while coord.engine.has_work():
        coord._step()
    done = [u for m in received(api) for u in m.updates if u.finish_reason]
    assert [(u.request_id, u.finish_reason) for u in done] == [("waiting", "length")]


def test_without_restart_the_engine_stays_down(sockets):
    outbox, api = sockets
    coord = Coordinator(engine(DeadRank()), None, outbox)
    coord._add(request("started"))
    coord._add(request("waiting"))
    coord._step()
    [failed] = received(api)
    assert sorted(u.request_id for u in failed.updates) == ["started", "waiting"]
    assert coord.error is not None  # the loop steps no more; new requests get the error

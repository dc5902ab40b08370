"""Executors run a step's plans on the attention ranks and return their results. One interface,
two implementations: colocated (in this process) and disaggregated (afd/launch/local.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from afd.engine.messages import StepResult
from attn_worker.messages import StepPlan
from attn_worker.model_runner import AttnRunner


class ExecutorError(RuntimeError):
    """A rank failed or stopped answering; the message names the rank."""


class Executor(ABC):
    num_ranks: int

    @abstractmethod
    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        """Runs plans[r] on attention rank r; returns one result per rank."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stops every rank this executor started."""

    def check(self) -> None:  # noqa: B027 - optional: in-process executors have none
        """Raises ExecutorError if a rank died or went silent; called while no step runs, so
        a failure shows without waiting for the next request. Nothing to check in-process."""


class ColocatedExecutor(Executor):
    """Attention and FFN in one process: the reference the disaggregated path must match."""

    num_ranks = 1

    def __init__(self, runner: AttnRunner) -> None:
        self.runner = runner

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        return [self.runner.execute(plans[0])]

    def shutdown(self) -> None:
        self.runner = None  # nothing else to stop: no processes, no sockets

"""How an attention rank reaches the FFN side: submit one (layer, micro-batch) and wait for the
summed partial outputs later. Colocated mode computes in place; disaggregated mode sends."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from afd.engine.stage_clock import StageClock
from afd.models.step3 import FFNSide
from ffn_worker.graphs import FFNGraphs

Routing = tuple[torch.Tensor, torch.Tensor] | None  # (expert ids [T, k], weights [T, k])


class PendingFFN(ABC):
    @abstractmethod
    def wait(self) -> torch.Tensor:
        """The FFN output [T, H] of the submitted rows, summed over FFN ranks."""


class FFNClient(ABC):
    @abstractmethod
    def submit(
        self, step: int, layer: int, micro_batch: int, x: torch.Tensor, routing: Routing
    ) -> PendingFFN: ...

    @abstractmethod
    def settle(self) -> None:
        """Block until every transfer of this step has completed; TransportTimeout if one
        does not in time (a dead or stuck peer)."""

    def take_compute_s(self) -> float:
        """FFN compute seconds done in this process since the last call (remote: none)."""
        return 0.0


class _Ready(PendingFFN):
    def __init__(self, out: torch.Tensor) -> None:
        self.out = out

    def wait(self) -> torch.Tensor:
        return self.out


class LocalFFN(FFNClient):
    """Colocated: the whole FFN side lives in this process."""

    def __init__(self, side: FFNSide, graphs: FFNGraphs | None = None) -> None:
        """graphs: replay layers at captured token counts (None: all eager)."""
        self.side, self.graphs = side, graphs
        self.clock = StageClock(next(side.parameters()).device)

    def submit(
        self, step: int, layer: int, micro_batch: int, x: torch.Tensor, routing: Routing
    ) -> PendingFFN:
        ids, weights = routing if routing is not None else (None, None)
        with self.clock.span():
            out = None
            if self.graphs is not None:
                lists = (None, None) if routing is None else ([ids], [weights])
                out = self.graphs.run(layer, [x], *lists)
            if out is None:
                out = self.side(layer, x, ids, weights)
        return _Ready(out)

    def settle(self) -> None:
        """Nothing in flight: the work is queued in order on this device."""

    def take_compute_s(self) -> float:
        return self.clock.take_s()

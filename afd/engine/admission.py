"""Admission policies: how many prefill tokens of a waiting sequence to admit this step."""

from __future__ import annotations

from abc import ABC, abstractmethod

from afd.engine.sequence import Sequence


class Admission(ABC):
    @abstractmethod
    def admit(
        self,
        rank: int,
        seq: Sequence,
        num_tokens: int,
        running: list[Sequence],
        scheduled: dict[int, int],
    ) -> int:
        """Tokens of `seq` to admit on `rank` this step (0: not now)."""


class AdmitAll(Admission):
    """FCFS under the token budget only: blind to the TPOT target."""

    def admit(
        self,
        rank: int,
        seq: Sequence,
        num_tokens: int,
        running: list[Sequence],
        scheduled: dict[int, int],
    ) -> int:
        return num_tokens

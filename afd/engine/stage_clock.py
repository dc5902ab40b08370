"""Time spent in a stage of a step, as the device saw it. On a GPU the host only queues work,
so host clocks around a stage measure launches; CUDA events recorded on the current stream
measure the stage itself (and, around a stream-ordered wait, how long the stream stalled)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageClock:
    """Sums the time spent inside `span()` blocks until `take_s()` reads and resets it."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._host_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._free: list[torch.cuda.Event] = []  # read events, recorded again next step

    @contextmanager
    def span(self) -> Iterator[None]:
        if not self.cuda:
            start = time.perf_counter()
            yield
            self._host_s += time.perf_counter() - start
            return
        begin, end = self._event(), self._event()
        begin.record()
        yield
        end.record()
        self._events.append((begin, end))

    def take_s(self) -> float:
        """Seconds so far, then zero. On a GPU this waits for the last recorded span to end."""
        seconds, self._host_s = self._host_s, 0.0
        if self._events:
            self._events[-1][1].synchronize()
            seconds += sum(b.elapsed_time(e) for b, e in self._events) / 1e3
            self._free += [event for pair in self._events for event in pair]
            self._events = []
        return seconds

    def _event(self) -> torch.cuda.Event:
        # reused: a step records a few hundred of these, one per stage boundary
        return self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)

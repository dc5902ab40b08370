"""Timing one decode step of the real pipeline, shared by `afd-bench e2e` and `sweep`: the
whole step (wall clock around it, device synced), and the steady per-layer time between the
starts of layer 1 and layer L-1 on the attention rank's stream. The steady time leaves out
the pipeline's fill and drain, a cost per step rather than per layer: a model of L' layers
takes about step + (L' - L) x steady."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from attn_worker.model_runner import AttnRunner


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _mark(device: str) -> float | torch.cuda.Event:
    """A point in time on the device's current stream (host clock off a GPU)."""
    if not device.startswith("cuda"):
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_s(a: float | torch.cuda.Event, b: float | torch.cuda.Event) -> float:
    return b - a if isinstance(a, float) else a.elapsed_time(b) / 1e3


def time_steps(
    runner: AttnRunner,
    run: Callable[[], object],
    device: str,
    warm: int,
    timed: int,
    before_timed: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """(median ms per step, median steady µs per layer) over `timed` runs of `run()` after
    `warm` (`before_timed()` in between); with fewer than 3 layers the steady time is the
    step's average per layer."""
    layers = runner.side.cfg.num_hidden_layers
    marks: list = []
    runner.on_layer = lambda layer: marks.append(_mark(device))
    steps, steady = [], []
    try:
        for i in range(warm + timed):
            if i == warm and before_timed is not None:
                before_timed()
            marks.clear()
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            if i >= warm:
                steps.append(time.perf_counter() - start)
                if layers >= 3:
                    steady.append(_elapsed_s(marks[1], marks[-1]) / (layers - 2))
    finally:
        runner.on_layer = None
    per_layer = statistics.median(steady) if steady else statistics.median(steps) / layers
    return 1e3 * statistics.median(steps), 1e6 * per_layer


def scaled_step_ms(step_ms: float, steady_us: float, layers: int, full_layers: int) -> float:
    """A `full_layers` step from an L-layer one: the missing layers at the steady rate."""
    return step_ms + (full_layers - layers) * steady_us / 1e3

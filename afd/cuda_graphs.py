"""CUDA graphs at captured sizes, shared by attention and FFN ranks (decode steps).

A step's work at a given size is captured once per layer and replayed with its inputs copied
into static buffers; a smaller batch replays the smallest captured size that holds it, its
extra rows computing on placeholders that are thrown away. This removes the host cost of
launching ~20 kernels per layer and micro-batch (eager: ~0.75 ms per attention block on an
H200, replay: tens of µs). Off a GPU, `GraphRunner.capture` returns the function itself, so
the static-buffer and padding logic is the same code in CPU tests."""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

# The sizes captured up to a maximum: fine steps where padding would cost most, then ~1.5x.
_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def capture_sizes(max_size: int) -> list[int]:
    """The ladder up to `max_size`, which is always included."""
    if max_size < 1:
        raise ValueError(f"the largest CUDA-graph size must be >= 1, got {max_size}")
    return sorted({s for s in _LADDER if s < max_size} | {max_size})


def size_for(sizes: list[int], n: int) -> int | None:
    """The smallest captured size holding n rows; None if n exceeds the largest."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class GraphRunner:
    """Captures functions that read and write only static buffers into one memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Run `fn` once eagerly (Triton compiles, cuBLAS picks its kernels), capture it, and
        return the replay. The graphs share the pool: they are replayed one at a time on one
        stream and keep no intermediate alive, so their scratch memory can alias."""
        if not self.cuda:
            return fn
        with torch.inference_mode():
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                fn()
            torch.cuda.current_stream().wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the NCCL watchdog thread may query events while this captures
            with torch.cuda.graph(
                graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
            ):
                fn()
        return graph.replay

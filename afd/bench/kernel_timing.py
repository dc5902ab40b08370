"""Timing helpers shared by the kernel benchmarks: median ms (graph replay where capture is
possible), input rotation past the L2, relative error, and the measured ceilings."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from triton.testing import do_bench, do_bench_cudagraph


def ms_of(fn: Callable[[], object], rep: int = 150, graph: bool = True) -> float:
    """Median ms. CUDA-graph replay where the code allows capture (no host sync), so that
    launch overhead, which serving hides the same way, stays out of kernel numbers."""
    if graph:
        return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def rotate(make: Callable[[], dict], nbytes: int) -> list[dict]:
    """Enough input sets that one pass over all of them is at least 4x the L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return [make() for _ in range(min(8, max(1, math.ceil(4 * l2 / nbytes))))]


def cycle(fns: list[Callable]) -> Callable:
    step = itertools.count()
    return lambda: fns[next(step) % len(fns)]()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def ceilings() -> dict[str, float]:
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB, far over L2
    dst = torch.empty_like(src)
    copy_ms = ms_of(lambda: dst.copy_(src), graph=False)
    copy_bw = 2 * src.numel() * src.element_size() / (copy_ms * 1e-3)  # read + write
    read_ms = ms_of(lambda: src.sum(dtype=torch.float32), graph=False)  # read-only, for reference
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = ms_of(lambda: a @ b, graph=False)
    return {
        "copy_bytes_per_s": copy_bw,
        "read_bytes_per_s": src.numel() * src.element_size() / (read_ms * 1e-3),
        "matmul_flop_per_s": 2 * n**3 / (mm_ms * 1e-3),
    }

"""How fast can any kernel stream the KV bytes of the small decode shapes? Pure reads of 128
and 256 MB (B=32 / B=64 at L=4K) by a Triton read-and-sum kernel at several grid sizes, and a
torch copy and sum of the same bytes, under graph replay, as fractions of the copy ceiling.

    python bench/experiments/read_bound_probe.py --out $OUT/read_bound.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from afd.bench.kernel_timing import ceilings, cycle, ms_of, rotate  # noqa: E402

CONFIGS = ((4096, 4, 3), (8192, 8, 3), (16384, 8, 2), (2048, 4, 4))  # block, warps, stages


@triton.jit
def _read(x_ptr, out_ptr, chunk, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, chunk, BLOCK):
        acc += tl.load(x_ptr + base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def _launch(x: torch.Tensor, out: torch.Tensor, programs: int, block: int, warps: int, stages):
    _read[(programs,)](x, out, x.numel() // programs, BLOCK=block, num_warps=warps,
                       num_stages=stages)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("read_bound.json"))
    args = parser.parse_args()
    result = {"ceilings": ceilings()}
    copy_bw = result["ceilings"]["copy_bytes_per_s"]
    for nbytes in (128 << 20, 256 << 20):
        n = nbytes // 2
        xs = [s["x"] for s in rotate(lambda n=n: {"x": torch.randn(n, device="cuda").bfloat16()},
                                     nbytes)]  # fmt: skip

        def frac(fns, graph=True, nbytes=nbytes) -> float:
            return nbytes / (ms_of(cycle(fns), graph=graph) * 1e-3) / copy_bw

        row = {}
        for programs in (128, 132, 256, 264, 512, 1024):
            out = torch.empty(programs, device="cuda")
            for block, warps, stages in CONFIGS:
                if n % programs or (n // programs) % block:
                    continue
                config = (out, programs, block, warps, stages)
                row[f"p{programs}_b{block}_w{warps}_s{stages}"] = frac(
                    [functools.partial(_launch, x, *config) for x in xs]
                )
        halves = [(x[: n // 2], torch.empty(n // 2, device="cuda").bfloat16()) for x in xs]
        copies = [functools.partial(torch.Tensor.copy_, d, s) for s, d in halves]
        row["torch_copy_graph"] = frac(copies)
        row["torch_copy_nograph"] = frac(copies, graph=False)
        row["torch_sum_graph"] = frac([functools.partial(torch.sum, x, dtype=torch.float32)
                                       for x in xs])  # fmt: skip
        result[str(nbytes)] = row
        print(nbytes >> 20, "MB", json.dumps({k: round(v, 3) for k, v in row.items()}))
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

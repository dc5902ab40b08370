"""Build the CUDA MFA decode experiment (mfa_decode_sm90.cu), check it against the fp32 torch
reference at ragged lengths, then time its variants beside the serving Triton kernel.

    python bench/experiments/mfa_decode_sm90_probe.py --out $OUT/mfa_sm90_probe.json

Needs an sm_90 GPU and nvcc (the device machines have both). Variants: splits (the cluster
size), tile (32 or 64 tokens), fixed or dynamic tile ranges, and `skip` (consumers skip the
math: what the copies and the merge alone take)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

from torch.utils.cpp_extension import load  # noqa: E402

from afd.bench.kernel_timing import ceilings, cycle, ms_of, rel_err, rotate  # noqa: E402
from attn_worker.kernels.decode_attention import paged_decode_attention_triton  # noqa: E402
from attn_worker.kernels.decode_attention_ref import paged_decode_attention_ref  # noqa: E402

SCALE = 256**-0.5
CASES = [  # (sequence lengths, KV block size): short, ragged, page edges, one long
    ([1], 64),
    ([5, 64, 65, 100], 64),
    ([31, 2049, 4096, 7, 1000], 64),
    ([300, 17], 32),
    ([4096] * 3, 128),
    ([33, 129], 32),
    ([8192, 1], 64),
]
SHAPES = [(32, 4096), (128, 4096), (64, 8192)]


def build():
    t = time.time()
    src = Path(__file__).with_name("mfa_decode_sm90.cu")
    flags = ["-O3", "--use_fast_math", "-std=c++17"]
    ext = load(name="afd_mfa_decode_sm90", sources=[str(src)], extra_cuda_cflags=flags)
    print(f"build {time.time() - t:.1f} s", flush=True)
    return ext


def inputs(lens: list[int], page: int = 64, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    batch, per_seq = len(lens), -(-max(lens) // page)
    blocks = batch * per_seq + 3
    kv = dict(device="cuda", dtype=dtype)
    table = torch.randperm(blocks, device="cuda", dtype=torch.int32)[: batch * per_seq]
    return {
        "q": torch.randn(batch, 64, 256, **kv),
        "k": torch.randn(blocks, page, 256, **kv),
        "v": torch.randn(blocks, page, 256, **kv),
        "bt": table.view(batch, per_seq).contiguous(),
        "lens": torch.tensor(lens, device="cuda", dtype=torch.int32),
    }


def check(ext) -> list[dict]:
    rows = []
    for lens, page in CASES:
        for dtype in (torch.bfloat16, torch.float16):
            x = inputs(lens, page, dtype)
            ref = paged_decode_attention_ref(x["q"], x["k"], x["v"], x["bt"], x["lens"], SCALE)
            for tile in (32, 64):
                for splits in (1, 2, 4, 8):
                    for dynamic in (False, True):
                        if page % tile:
                            continue
                        out = torch.full_like(x["q"], float("nan"))  # unwritten shows
                        args = (x["q"], x["k"], x["v"], x["bt"], x["lens"], out, SCALE)
                        ext.mfa_decode(*args, splits, tile, dynamic, 0)
                        err = rel_err(out.float(), ref.float())
                        rows.append(dict(lens=lens, page=page, dtype=str(dtype), tile=tile,
                                         splits=splits, dynamic=dynamic, err=err))  # fmt: skip
    return rows


def _triton(s: dict, out: torch.Tensor, seq_len: int) -> None:
    paged_decode_attention_triton(
        s["q"], s["k"], s["v"], s["bt"], s["lens"], SCALE, seq_len, out=out
    )


def _cuda(s: dict, out: torch.Tensor, ext, splits: int, tile: int, dynamic: bool, skip: int):
    ext.mfa_decode(s["q"], s["k"], s["v"], s["bt"], s["lens"], out, SCALE, splits, tile, dynamic,
                   skip)  # fmt: skip


def timing(ext, copy_bw: float) -> list[dict]:
    rows = []
    for batch, seq_len in SHAPES:
        kv_bytes = 2 * batch * seq_len * 256 * 2
        sets = rotate(lambda b=batch, n=seq_len: inputs([n] * b), kv_bytes)
        pairs = [(s, torch.empty_like(s["q"])) for s in sets]
        row = {"B": batch, "L": seq_len}

        def frac(call, *config, nbytes=kv_bytes, pairs=pairs) -> float:
            fns = [functools.partial(call, s, o, *config) for s, o in pairs]
            return nbytes / (ms_of(cycle(fns)) * 1e-3) / copy_bw

        row["triton"] = frac(_triton, seq_len)
        for tile in (32, 64):
            for skip in (0, 1):
                for dynamic in (False, True):
                    for splits in (1, 2, 4, 8):
                        if splits * batch > 264 and splits > 1:
                            continue
                        key = f"s{splits}_t{tile}_{'dyn' if dynamic else 'fix'}_skip{skip}"
                        row[key] = frac(_cuda, ext, splits, tile, dynamic, skip)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("mfa_sm90_probe.json"))
    args = parser.parse_args()
    ext = build()
    torch.manual_seed(0)
    checks = check(ext)
    bad = [c for c in checks if not c["err"] < 1e-2]  # NaN fails too
    print(f"checks: {len(checks) - len(bad)} of {len(checks)} within 1e-2", flush=True)
    result = {"checks": checks}
    if not bad:
        result["ceilings"] = ceilings()
        result["timing"] = timing(ext, result["ceilings"]["copy_bytes_per_s"])
    args.out.write_text(json.dumps(result, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""fp8_linear's served tiles (no K split, columns by rows) against the rule before them (a K
split while the grid is short of the SMs, fp32 atomics) and fixed unsplit tiles of 16-128
columns, at Step3's attention projections with block and per-channel scales, bf16 x per row
to e4m3 as served. Per tile choice: whether the first m of 2048 rows come out the same bits
alone (batch invariance), and the time by graph replay at each row count. One run, JSON.

    python bench/experiments/fp8_linear_tiles_probe.py --out $OUT/fp8_linear_tiles_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from afd.bench.kernel_timing import cycle, ms_of, rotate  # noqa: E402
from afd.quantization import quantize_fp8_blocks, quantize_fp8_rows  # noqa: E402
from attn_worker.kernels.fp8_linear import LinearConfig, default_config, fp8_linear  # noqa: E402

PROJECTIONS = {"o_proj": (7168, 16384), "wq": (16384, 2048), "qkv": (2560, 7168)}
ROWS = [1, 8, 64, 128, 256, 512, 2048]
FIXED = {f"n{bn}": LinearConfig(64, bn, 128, 4, 4) for bn in (16, 32, 64, 128)}
FIXED["n32s6"] = LinearConfig(64, 32, 128, 4, 6)


def grid_split(m: int, n: int, k: int, sms: int = 132) -> LinearConfig:
    """The rule before batch invariance: 64 x 128 tiles (64 x 64 under 4096 columns), K split
    while the grid is short of one program an SM."""
    block_n = 128 if n >= 4096 else 64
    tiles, splits = triton.cdiv(n, block_n) * triton.cdiv(m, 64), 1
    while splits < 8 and k >= 8 * splits * 128 and tiles * splits < sms:
        splits *= 2
    return LinearConfig(64, block_n, 128, 4, 4, splits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fp8_linear_tiles.json"))
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"device": torch.cuda.get_device_name(), "invariance": [], "times_us": []}
    for name, (n, k) in PROJECTIONS.items():

        def weights(n=n, k=k) -> dict:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            return {"blocks": quantize_fp8_blocks(w, (128, 128)), "channel": quantize_fp8_rows(w)}

        sets = rotate(weights, 2 * n * k)  # past the L2
        x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
        for kind in ("blocks", "channel"):
            w8, scales = sets[0][kind]
            choices = {
                "served": lambda m: None,
                "grid_split": lambda m, n=n, k=k: grid_split(m, n, k, sms),
                **{label: lambda m, c=c: c for label, c in FIXED.items()},
            }
            same = {}
            for label, config in choices.items():
                full = fp8_linear(x, w8, scales, config(2048))
                same[label] = {
                    m: torch.equal(fp8_linear(x[:m], w8, scales, config(m)), full[:m])
                    for m in (1, 3, 64, 65, 300, 1000)
                }
            # across tile shapes: unsplit 16-64 columns against 128, all 2048 rows
            ref = fp8_linear(x, w8, scales, FIXED["n128"])
            same["unsplit_vs_n128"] = {
                label: torch.equal(fp8_linear(x, w8, scales, FIXED[label]), ref)
                for label in ("n16", "n32", "n64", "n32s6")
            }
            result["invariance"].append({"name": name, "kind": kind, "same": same})
            print(name, kind, json.dumps(same), flush=True)
            for m in ROWS:
                xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"name": name, "kind": kind, "M": m}
                for label, config in choices.items():
                    c = config(m)
                    fns = [lambda s=s, c=c, x=xm, kd=kind: fp8_linear(x, *s[kd], c) for s in sets]
                    row[label] = ms_of(cycle(fns)) * 1e3
                row["served_again"] = (
                    ms_of(cycle([lambda s=s, x=xm, kd=kind: fp8_linear(x, *s[kd]) for s in sets]))
                    * 1e3
                )
                row["served_config"] = str(default_config(m, n, k, sms, scales))
                result["times_us"].append(row)
                print(json.dumps(row), flush=True)
                args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

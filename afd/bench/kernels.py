"""`afd-bench kernels`: ceilings, MFA paged decode attention and the MoE layer on one GPU, each
variant checked against a reference first, then timed beside its baseline in this process
(attention: afd/bench/kernels_attention.py, MoE: afd/bench/kernels_moe.py)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import triton

from afd.bench.kernel_timing import ceilings
from afd.bench.kernels_attention import attention, attention_fp8, prefill
from afd.bench.kernels_linear import projections
from afd.bench.kernels_moe import moe


def _table(results: dict) -> str:
    lines = [
        "MFA decode (Hq=64, D=256, bf16, page 64): ms and fraction of copy bandwidth",
        f"{'B':>4} {'L':>6} {'sdpa ms':>8} {'frac':>5} {'triton ms':>9} {'frac':>5} err",
    ]
    for r in results.get("attention", []):
        lines.append(
            f"{r['B']:>4} {r['L']:>6} {r['sdpa_ms']:8.3f} {r['sdpa_frac_copy']:5.2f} "
            f"{r['triton_ms']:9.3f} {r['triton_frac_copy']:5.2f} {r['err']:.1e}"
        )
    for r in results.get("attention_fp8", []):
        lines.append(
            f"{r['B']:>4} {r['L']:>6} fp8 KV (e4m3 + a scale a token): "
            f"{r['triton_ms']:9.3f} ms {r['triton_frac_copy']:5.2f} {r['err']:.1e}"
        )
    lines.append("prefill attention (n new tokens of L, causal): ms and fraction of matmul peak")
    for r in results.get("prefill", []):
        lines.append(
            f"  n={r['n']:>5} L={r['L']:>5}: masked {r['masked_ms']:8.3f} "
            f"({r['masked_frac_matmul']:.2f}), afd {r['attend_ms']:7.3f} "
            f"({r['attend_frac_matmul']:.2f}) err {r['err_vs_masked']:.1e}"
        )
    lines.append(
        "MoE (48 experts top-3, 7168->5120, bf16; triton_fp8: e4m3 experts, a scale per output"
        " channel; triton_fp8_blocks: per 128x128 block; fractions of their bytes): ms / frac"
        " copy / frac matmul"
    )
    lines.append(
        "attention projections, bf16 x (fp8: e4m3 weights, 128x128 blocks, as served): ms,"
        " fraction of copy over the weight bytes"
    )
    for r in results.get("projections", []):
        timed = [v for v in r["variants"][1:] if "ms" in v]
        bf16, fp8 = r["variants"][0], min(timed, key=lambda v: v["ms"])
        lines.append(
            f"  {r['name']:>6} M={r['M']:>5}: bf16 {r['bf16_ms']:.4f} ({bf16['frac_copy']:.2f})"
            f", fp8 served {r['fp8_blocks_served_ms']:.4f}, best {fp8['name']} {fp8['ms']:.4f}"
        )
    for r in results.get("moe", []):
        cells = [f"T={r['T']:>5}"] + [
            f"{k} {c['ms']:.3f} {c['frac_copy']:.2f} {c['frac_matmul']:.2f}" if c else f"{k} n/a"
            for k, c in (
                (k, r.get(k))
                for k in ("loop", "grouped_mm", "triton", "triton_fp8", "triton_fp8_blocks")
            )
        ]
        lines.append(" | ".join(cells))
    return "\n".join(lines)  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="afd-bench kernels", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["attention", "moe", "projections"]
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("afd-bench kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name().lower()
    tag = next((g for g in ("h100", "h200", "a100", "b200") if g in name), "gpu")
    out_path = args.out or Path(f"bench/results/kernels_{tag}.json")
    results: dict = {
        "command": "afd-bench kernels " + " ".join(argv),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    torch.manual_seed(0)
    results["ceilings"] = peaks = ceilings()
    print("ceilings", peaks, flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # JSON after each part: a crash keeps what was measured
    for part in ("attention", "projections", "moe"):
        if part == "attention" and part not in args.skip:
            attention(peaks["copy_bytes_per_s"], results)
            attention_fp8(peaks["copy_bytes_per_s"], results)
            prefill(peaks, results)
        elif part == "projections" and part not in args.skip:
            projections(peaks, results)
        elif part == "moe" and part not in args.skip:
            moe(peaks, results, args.tokens)
        out_path.write_text(json.dumps(results, indent=1, default=str))
    copy_tb, mm_tf = peaks["copy_bytes_per_s"] / 1e12, peaks["matmul_flop_per_s"] / 1e12
    print(f"copy {copy_tb:.2f} TB/s, matmul {mm_tf:.0f} TFLOP/s on {results['device']}")
    print(_table(results))
    return 0 if math.isfinite(peaks["copy_bytes_per_s"]) else 1

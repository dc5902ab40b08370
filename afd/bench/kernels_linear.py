"""`afd-bench kernels`, projections part: the attention side's projections at Step3's widths
with e4m3 weights (attn_worker/kernels/fp8_linear.py; 128 x 128 block scales as Step3's FP8
checkpoint stores them, and one per output channel as --quantization fp8 makes them), weights
widened and with fp8 activations, against cuBLAS on the bf16 weights, by rows M (a decode
batch, or a prefill chunk)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from afd.bench.kernel_timing import cycle, ms_of, rel_err, rotate
from afd.quantization import quantize_fp8_blocks, quantize_fp8_rows
from attn_worker.kernels import fp8_linear as fl

# name -> (N, K): [out, in] of the weight
PROJECTIONS = {"o_proj": (7168, 16384), "wq": (16384, 2048), "qkv": (2560, 7168)}
ROWS = [1, 8, 32, 64, 128, 256, 512, 2048]


def _weights(n: int, k: int) -> dict:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    blocks, channel = quantize_fp8_blocks(w, (128, 128)), quantize_fp8_rows(w)
    return {"bf16": w, "blocks": blocks, "channel": channel}


def projections(peaks: dict, results: dict, rows: list[int] = ROWS) -> None:
    out = results.setdefault("projections", [])
    for name, (n, k) in PROJECTIONS.items():
        sets = rotate(lambda n=n, k=k: _weights(n, k), 2 * n * k)  # past the L2
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"name": name, "M": m, "N": n, "K": k, "variants": []}
            first = sets[0]
            exact = {  # float64 over the dequantized weights
                kind: x.double() @ first[kind][1].dequantize(first[kind][0], torch.float64).T
                for kind in ("blocks", "channel")
            }
            variants: list[tuple[str, Callable, str | None]] = [
                ("bf16 cuBLAS", lambda s, x=x: F.linear(x, s["bf16"]), None)
            ]
            for kind in ("blocks", "channel"):
                for a8 in (False, True):
                    label = f"fp8 {kind} {'fp8 x' if a8 else 'widened'}"
                    variants.append((label, _fp8(kind, x, {"fp8_activations": a8}), kind))
            for label, fn, kind in variants:
                try:
                    ms = ms_of(cycle([lambda s=s, f=fn: f(s) for s in sets]))
                except Exception as exc:  # noqa: BLE001 - a config that fails is a result
                    row["variants"].append({"name": label, "error": repr(exc)[:200]})
                    continue
                nbytes = n * k * (2 if kind is None else 1)
                entry = {
                    "name": label,
                    "ms": ms,
                    "frac_copy": nbytes / (ms * 1e-3) / peaks["copy_bytes_per_s"],
                    "frac_matmul": 2 * m * n * k / (ms * 1e-3) / peaks["matmul_flop_per_s"],
                    "err": rel_err(fn(first), exact[kind or "blocks"]),
                }
                row["variants"].append(entry)
            row["bf16_ms"] = row["variants"][0]["ms"]
            row["fp8_blocks_served_ms"] = row["variants"][2].get("ms")  # fp8 x, 128x128 blocks
            print("projection", name, m, row["variants"], flush=True)
            out.append(row)
        del sets
        torch.cuda.empty_cache()


def _fp8(kind: str, x: torch.Tensor, kw: dict) -> Callable[[dict], torch.Tensor]:
    return lambda s: fl.fp8_linear(x, s[kind][0], s[kind][1], **kw)


# the tile sweep (`python -m afd.bench.kernels_linear OUT.json`): decode rows widen the
# weights, more rows take fp8 activations; every config at K splits 1-8
WIDENED_TILES = [(64, 128, 4, 4), (128, 128, 4, 4), (64, 128, 4, 5), (32, 128, 4, 4)]
A8_TILES = [(64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 128, 128, 8, 4),
            (128, 256, 128, 8, 3), (64, 64, 128, 4, 4)]  # fmt: skip
SWEEP_ROWS = {"widened": [1, 16, 32, 64, 128], "fp8 x": [32, 64, 128, 256, 512, 2048]}


def sweep(peaks: dict) -> list[dict]:
    """Every candidate tile at every K split, 128 x 128 block scales, per projection and M."""
    found = []
    for name, (n, k) in PROJECTIONS.items():
        sets = rotate(lambda n=n, k=k: _weights(n, k), 2 * n * k)
        for path, rows in SWEEP_ROWS.items():
            for m in rows:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                configs = (
                    [fl.LinearConfig(max(16, triton_pow2(m)), *t) for t in WIDENED_TILES]
                    if path == "widened"
                    else [fl.LinearConfig(*t) for t in A8_TILES]
                )
                for cfg in configs:
                    for splits in (1, 2, 4, 8):
                        kw = {
                            "config": replace(cfg, splits=splits),
                            "fp8_activations": path != "widened",
                        }
                        fn = _fp8("blocks", x, kw)
                        try:
                            ms = ms_of(cycle([lambda s=s, f=fn: f(s) for s in sets]))
                        except Exception as exc:  # noqa: BLE001 - a config that fails is a result
                            found.append(
                                {
                                    "name": name,
                                    "M": m,
                                    "path": path,
                                    "cfg": str(kw["config"]),
                                    "error": repr(exc)[:120],
                                }
                            )
                            continue
                        found.append(
                            {
                                "name": name,
                                "M": m,
                                "path": path,
                                "cfg": str(kw["config"]),
                                "ms": ms,
                                "frac_copy": n * k / (ms * 1e-3) / peaks["copy_bytes_per_s"],
                            }
                        )
                best = min(
                    (
                        f
                        for f in found
                        if f["name"] == name and f["M"] == m and f["path"] == path and "ms" in f
                    ),
                    key=lambda f: f["ms"],
                )
                print("sweep", name, path, m, best["cfg"], f"{best['ms'] * 1e3:.1f} us", flush=True)
        del sets
        torch.cuda.empty_cache()
    return found


def triton_pow2(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


if __name__ == "__main__":
    import json
    import sys

    from afd.bench.kernel_timing import ceilings

    peaks = ceilings()
    result = {"ceilings": peaks, "device": torch.cuda.get_device_name(), "sweep": sweep(peaks)}
    projections(peaks, result)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1, default=str)

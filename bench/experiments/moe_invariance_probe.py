"""Is a token's MoE output the same whichever tokens share the call? The fused MoE at Step3's
widths (48 experts top-3, 7168 -> 5120), bf16 and e4m3 (per channel, and 128 x 128 blocks, fp8
activations as served): the first m of 4096 tokens alone against their rows in the full call,
bitwise and by max |difference|, and the full call twice (the down kernel's fp32 atomics sum a
token's 3 experts in the programs' order). Also with an explicit config at every m, so that
only the atomics can differ. One run, JSON. Its first run (`moe_invariance_h100.json`) found
the served e4m3 configs differing run to run: the alignment placed an expert's pairs in atomic
order, and a pair's tile (short or full) changes its e4m3 sums; since in pair order,
`moe_invariance_ordered_h100.json` (NOTES-kernels version 20).

    python bench/experiments/moe_invariance_probe.py --out $OUT/moe_invariance_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from afd.bench.kernels_moe import _moe_inputs, _weights  # noqa: E402
from afd.quantization import quantize_fp8_blocks, quantize_fp8_rows  # noqa: E402
from ffn_worker.kernels.moe_gemm import default_config, fused_moe_triton  # noqa: E402

COUNTS = (1, 8, 64, 300, 1000)
FULL = 4096


def compare(run, x, ids, weights) -> dict:
    full = run(x, ids, weights)
    found = {"full_again_equal": torch.equal(run(x, ids, weights), full)}
    for m in COUNTS:
        part = run(x[:m], ids[:m], weights[:m])
        found[m] = {
            "equal": torch.equal(part, full[:m]),
            "max_abs": float((part.float() - full[:m].float()).abs().max()),
            "scale": float(full[:m].float().abs().max()),
        }
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/moe_invariance.json"))
    args = parser.parse_args()
    w = _weights()
    q = [quantize_fp8_rows(t) for t in w]
    qb = [quantize_fp8_blocks(t, (128, 128)) for t in w]
    kinds = {
        "bf16": (w, None),
        "fp8_channel": ([t for t, _ in q], tuple(s for _, s in q)),
        "fp8_blocks": ([t for t, _ in qb], tuple(s for _, s in qb)),
    }
    torch.manual_seed(0)
    x, ids, weights = _moe_inputs(FULL)
    fixed = default_config(300 * 3, 48)  # one tile config at every m: only atomics differ
    result = {"device": torch.cuda.get_device_name(), "fixed_config": str(fixed)}
    for name, (ws, scales) in kinds.items():
        for label, cfg in (("served", None), ("fixed", fixed)):

            def run(xx, ii, ww, ws=ws, scales=scales, cfg=cfg):
                return fused_moe_triton(xx, *ws, ii, ww, 0, cfg, scales, model_experts=48)

            result[f"{name}_{label}"] = found = compare(run, x, ids, weights)
            print(name, label, json.dumps(found), flush=True)
            args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

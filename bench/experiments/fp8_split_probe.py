"""Which fp8 part makes a token's numbers depend on the micro-batch split? Colocated on one GPU,
a Step3-width random checkpoint of 2 layers (`afd-bench e2e`'s), 4 prompts, 8 greedy tokens,
eager: 1 micro-batch against 3, and 1 again, for bf16, fp8 experts (--quantization fp8), fp8
projections (--fp8-attention) and both. JSON: each run's tokens and logprobs, and a summary.
`--activation-scales exact` quantizes the fp8 GEMMs' activation rows with exact scales (the
largest element to 448, by torch) instead of the served power-of-two ones.

    python bench/experiments/fp8_split_probe.py --out $OUT/fp8_split_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from afd.bench.e2e import generate, write_checkpoint  # noqa: E402

MODES = {
    "bf16": {},
    "experts": {"quantization": "fp8"},
    "attention": {"fp8_attention": True},
    "both": {"quantization": "fp8", "fp8_attention": True},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fp8_split_probe.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/afd-split"))
    parser.add_argument("--activation-scales", choices=("pow2", "exact"), default="pow2")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    args = parser.parse_args()
    if args.activation_scales == "exact":
        import attn_worker.kernels.fp8_linear as linear
        import ffn_worker.kernels.moe_gemm as moe
        from afd.quantization import quantize_fp8

        linear.quantize_rows = moe.quantize_rows = quantize_fp8
    model = write_checkpoint(args.workdir / "step3w", layers=2, moe_layers="1")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 511, (n,), generator=g).tolist() for n in (7, 19, 33, 64)]
    result = {}
    for name in args.modes.split(","):
        flags = MODES[name]
        runs = {}
        for key, m in (("m1", 1), ("m3", 3), ("m1_again", 1)):
            runs[key] = generate(
                model, prompts, 8, colocated=True, micro_batches=m, cuda_graph_max_batch=0,
                **flags,
            )  # fmt: skip
        summary = {}
        for key in ("m3", "m1_again"):
            pairs = list(zip(runs["m1"], runs[key], strict=True))
            summary[key] = {
                "same_tokens": [a["tokens"] == b["tokens"] for a, b in pairs],
                "first_step_max_diff": max(
                    abs(a["logprobs"][0] - b["logprobs"][0]) for a, b in pairs
                ),
            }
        result[name] = {"summary": summary, "runs": runs, "scales": args.activation_scales}
        print(name, json.dumps(summary), flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

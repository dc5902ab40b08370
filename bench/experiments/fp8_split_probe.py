"""Which fp8 part makes a token's numbers depend on the micro-batch split? Colocated on one GPU,
a Step3-width random checkpoint of 2 layers (`afd-bench e2e`'s), 4 prompts, 8 greedy tokens,
eager: 1 micro-batch against 3, and 1 again, for bf16, fp8 experts (--quantization fp8), fp8
projections (--fp8-attention) and both. JSON: each run's tokens and logprobs, and a summary.

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
    args = parser.parse_args()
    model = write_checkpoint(args.workdir / "step3w", layers=2, moe_layers="1")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 511, (n,), generator=g).tolist() for n in (7, 19, 33, 64)]
    result = {}
    for name, flags in MODES.items():
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
        result[name] = {"summary": summary, "runs": runs}
        print(name, json.dumps(summary), flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

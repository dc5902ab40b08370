"""fp8 experts (a scale per output channel, or per 128 x 128 block as a block-FP8 checkpoint
stores them), fp8 activations, Step3 widths, one GPU: the serving tiles beside K tiles of 128
(three stage and warp counts), ms and error against the dequantized weights, as JSON.

    python bench/experiments/moe_block_tiles_probe.py --out $OUT/moe_block_tiles_probe.json

Each variant is passed to fused_moe_triton as its config, which it runs as given (K tiles
cut to the scale blocks): "default" is `default_config` by rows per expert, K tiles of 64 at
T >= 1024; serving adds K tiles of 128 for fp8 activations ("bk128_s4", mg.tile_config) since
the two runs in `bench/results/moe_block_tiles_probe*_h100.json` (NOTES-kernels version 18;
in the first, "default" for blocks was at K 64, in the second at 128).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from afd.bench.kernel_timing import ceilings, ms_of, rel_err  # noqa: E402
from afd.bench.kernels_moe import DTYPE, NUM_EXPERTS, TOPK, _moe_inputs, _weights  # noqa: E402
from afd.quantization import quantize_fp8_blocks, quantize_fp8_rows  # noqa: E402
from ffn_worker.kernels import moe_gemm as mg  # noqa: E402
from ffn_worker.kernels.fused_moe import fused_moe_ref  # noqa: E402


def variants(base: mg.MoeConfig, tokens: int) -> dict[str, mg.MoeConfig]:
    def k128(**knobs) -> mg.MoeConfig:
        return replace(base, gate_up=replace(base.gate_up, block_k=128, **knobs),
                       down=replace(base.down, block_k=128, **knobs))  # fmt: skip

    cfgs = {"default": base}
    if tokens >= 256:
        cfgs |= {"bk128": k128(num_stages=3), "bk128_s4": k128(),
                 "bk128_w8": k128(num_warps=8, num_stages=3)}  # fmt: skip
    return cfgs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/moe_block_tiles_probe.json"))
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "ceilings": ceilings(), "rows": []}
    w = _weights()
    per_channel = [quantize_fp8_rows(t) for t in w]
    blocks = [quantize_fp8_blocks(t, (128, 128)) for t in w]
    del w
    for tokens in (64, 256, 1024, 4096):
        x, ids, weights = _moe_inputs(tokens)
        cfgs = variants(mg.default_config(tokens * TOPK, NUM_EXPERTS), tokens)
        deq = [sc.dequantize(t, DTYPE) for t, sc in blocks]
        exact = fused_moe_ref(x, *deq, ids, weights, 0).float()
        del deq
        for kind, quantized in (("per_channel", per_channel), ("blocks", blocks)):
            for name, cfg in cfgs.items():
                if kind == "per_channel" and name not in ("default", "bk128_s4"):
                    continue
                q, scales = (t for t, _ in quantized), tuple(s for _, s in quantized)
                fn = partial(mg.fused_moe_triton, x, *q, ids, weights, 0, cfg, scales=scales)
                row = {"T": tokens, "weights": kind, "cfg": name}
                try:
                    row["err_vs_blocks_deq"] = rel_err(fn(), exact) if kind == "blocks" else None
                    row["ms"] = ms_of(fn)
                except Exception as exc:  # noqa: BLE001 - a config that fails is a result
                    row["error"] = repr(exc)[:300]
                result["rows"].append(row)
                print(row, flush=True)
                args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

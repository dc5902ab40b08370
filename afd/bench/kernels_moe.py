"""`afd-bench kernels`, MoE part: the fused MoE layer (Triton, tiles per token count) against
the per-expert loop and `torch._grouped_mm`, as fractions of copy bandwidth and matmul peak."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch

from afd.bench.kernel_timing import ms_of, rel_err
from afd.quantization import quantize_fp8_blocks, quantize_fp8_rows
from ffn_worker.kernels import moe_gemm as mg
from ffn_worker.kernels.fused_moe import (
    fused_moe_grouped_mm,
    fused_moe_ref,
    has_grouped_mm,
)

NUM_EXPERTS, TOPK, HIDDEN, INTER = 48, 3, 7168, 5120
FP8_CHECKPOINT_BLOCK = (128, 128)  # Step3's published FP8 checkpoint (STEP3.md)
DEVICE, DTYPE = "cuda", torch.bfloat16
G, M = mg.GemmConfig, mg.MoeConfig
# Timed beside the default per token count (rows per expert = 3T/48): the runners-up of the
# tile sweep (`python -m afd.bench.kernels_moe OUT.json`), so the table shows the margin.
CANDIDATES: dict[int, list[mg.MoeConfig]] = {
    1024: [M(128, G(128, 64, 8, 3, True), G(256, 64, 8, 3, True), 64)],
    4096: [
        M(128, G(128, 64, 8, 4), G(256, 64, 8, 4), 32),
        M(128, G(128, 64, 8, 4, True), G(256, 64, 8, 4, True), 32),
        M(128, G(128, 64, 8, 4), G(256, 64, 8, 4, True), 16),
    ],
}


def _moe_inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE)
    probs = torch.softmax(torch.randn(tokens, NUM_EXPERTS, device=DEVICE), dim=-1)
    weights, ids = probs.topk(TOPK, dim=-1)  # Step3: not renormalised
    return x, ids.to(torch.int32), weights.to(DTYPE)


def _weights() -> list[torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape_gu, shape_d = (NUM_EXPERTS, INTER, HIDDEN), (NUM_EXPERTS, HIDDEN, INTER)
    return [torch.randn(s, device=DEVICE, dtype=DTYPE, generator=g) * 0.02
            for s in (shape_gu, shape_gu, shape_d)]  # fmt: skip


def mma_rows(tiles: mg.ExpertTiles, small_m: int) -> int:
    """Rows the tensor cores compute (tiles rounded up to their size) vs T*k real rows."""
    meta = tiles.tile_meta.cpu()
    meta = meta[meta[:, 0] < NUM_EXPERTS]
    local = torch.arange(len(meta)) - meta[:, 1]  # tile index in its expert
    rows = (meta[:, 3] - local * tiles.block_m).clamp(max=tiles.block_m)
    small = (rows <= small_m) if small_m else torch.zeros_like(rows, dtype=torch.bool)
    return int(torch.where(small, small_m, tiles.block_m).sum())


def moe(peaks: dict[str, float], results: dict, token_counts: list[int]) -> None:
    w = _weights()
    w32 = [t.float() for t in w]  # fp32 weights for the reference: 21 GB, fits in 80
    # --quantization fp8: e4m3 experts with a scale per output channel (quantized at load),
    # or per 128 x 128 block (a block-FP8 checkpoint's, as Step3's published one stores them)
    w8 = [quantize_fp8_rows(t) for t in w]
    w8_blocks = [quantize_fp8_blocks(t, FP8_CHECKPOINT_BLOCK) for t in w]
    rows = results.setdefault("moe", [])
    for tokens in token_counts:
        x, ids, weights = _moe_inputs(tokens)
        args = (x, *w, ids, weights, 0)
        ref = fused_moe_ref(x.float(), *w32, ids, weights.float(), 0)  # [T, H] fp32 math
        touched = int(torch.unique(ids).numel())
        nbytes = touched * 3 * INTER * HIDDEN * 2
        flops = 2 * tokens * TOPK * 3 * INTER * HIDDEN
        row: dict = {"T": tokens, "touched_experts": touched, "weight_bytes": nbytes,
                     "flops": flops, "configs": []}  # fmt: skip
        loop = ("loop", lambda a=args: fused_moe_ref(*a), None)  # host syncs: no graph
        variants: list[tuple[str, Callable, mg.MoeConfig | None]] = [loop]
        if has_grouped_mm():
            variants.append(("grouped_mm", lambda a=args: fused_moe_grouped_mm(*a), None))
        default = mg.default_config(tokens * TOPK, NUM_EXPERTS)
        for cfg in [default] + CANDIDATES.get(tokens, []):
            tag = "triton_default" if cfg is default else "triton"
            variants.append((f"{tag} {cfg}", lambda a=args, c=cfg: mg.fused_moe_triton(*a, c), cfg))
        for name, fn, cfg in variants:
            try:
                err = rel_err(fn(), ref)
                ms = ms_of(fn, graph=name != "loop")
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result
                row["configs"].append({"name": name, "error": repr(exc)[:200]})
                continue
            entry = {"name": name, "ms": ms, "err": err, "cfg": cfg,
                     "frac_copy": nbytes / (ms * 1e-3) / peaks["copy_bytes_per_s"],
                     "frac_matmul": flops / (ms * 1e-3) / peaks["matmul_flop_per_s"]}  # fmt: skip
            row["configs"].append(entry)
            print("moe", tokens, entry, flush=True)
        good = [c for c in row["configs"] if "ms" in c and c["err"] < 1e-2]
        for kind in ("loop", "grouped_mm", "triton"):
            cands = [c for c in good if c["name"].startswith(kind)]
            if cands:
                row[kind] = min(cands, key=lambda c: c["ms"])
        if row.get("triton", {}).get("cfg"):
            row["triton_breakdown_ms"] = _moe_breakdown(x, w, ids, weights, row["triton"]["cfg"])
        served = True  # fused_moe's fp8 experts take fp8 activations at every T
        for name, quantized in (("triton_fp8", w8), ("triton_fp8_blocks", w8_blocks)):
            row[name + "_variants"] = [  # weights widened in registers, fp8 products
                _fp8_entry(peaks, x, quantized, ids, weights, nbytes, flops, ref, a8)
                for a8 in (False, True)
            ]
            row[name] = row[name + "_variants"][int(served)]
            print("moe", name, tokens, row[name + "_variants"], flush=True)
        rows.append(row)


def _fp8_entry(peaks: dict, x, w8: list, ids, weights, nbytes, flops, ref, a8: bool) -> dict:
    """fp8 experts on the tiles fused_moe serves (`a8`: fp8 activations too; mg.tile_config):
    time, bandwidth over the fp8 bytes (half the 16-bit ones), error against the dequantized
    weights (with 16-bit activations) and against the 16-bit layer."""
    scales = tuple(sc for _, sc in w8)
    q = (t for t, _ in w8)
    fn = partial(
        mg.fused_moe_triton, x, *q, ids, weights, 0, None, scales=scales, fp8_activations=a8
    )
    cfg = mg.tile_config(None, ids.numel(), NUM_EXPERTS, x.dtype, scales, a8)
    deq = [sc.dequantize(t, DTYPE) for t, sc in w8]  # made here: 10 GB, one set at a time
    exact = fused_moe_ref(x, *deq, ids, weights, 0)  # bf16 per-expert loop, same weights
    del deq
    ms = ms_of(fn)
    return {
        "cfg": cfg,
        "fp8_activations": a8,
        "ms": ms,
        "err_vs_dequantized": rel_err(fn(), exact.float()),
        "err_vs_bf16_weights": rel_err(fn(), ref),
        "frac_copy": nbytes / 2 / (ms * 1e-3) / peaks["copy_bytes_per_s"],
        "frac_matmul": flops / (ms * 1e-3) / peaks["matmul_flop_per_s"],
    }


def _moe_breakdown(x, w: list, ids, weights, cfg: mg.MoeConfig) -> dict[str, float]:
    """The fused path's stages timed alone: where the time over the weight-streaming floor goes."""
    tiles = mg.align_by_expert(ids, 0, NUM_EXPERTS, cfg.block_m)
    act = mg.moe_gate_up(x, w[0], w[1], tiles, TOPK, cfg.gate_up, cfg.small_m)  # [P, I]
    return {
        "mma_rows": float(mma_rows(tiles, cfg.small_m)),  # vs T*k real rows
        "real_rows": float(ids.numel()),
        "align": ms_of(lambda: mg.align_by_expert(ids, 0, NUM_EXPERTS, cfg.block_m)),
        "gate_up": ms_of(
            lambda: mg.moe_gate_up(x, w[0], w[1], tiles, TOPK, cfg.gate_up, cfg.small_m)
        ),
        "down": ms_of(lambda: mg.moe_down(act, w[2], tiles, weights, cfg.down, cfg.small_m)),
    }


# Tile sweep, per token count: (block_m, small_m, tile) for gate-up and for down, each timed
# alone (graph replay) and checked through the whole layer against the fp32 reference; then
# whole layers, each timed twice in alternation (run-to-run spread).
SWEEP: dict[int, tuple[list, list, list]] = {
    4096: (
        [(128, 16, G(128, 64, 8, 4)), (128, 32, G(128, 64, 8, 4))],
        [(128, 16, G(256, 64, 8, 4)), (128, 32, G(256, 64, 8, 4))],
        [M(128, G(128, 64, 8, 4), G(256, 64, 8, 4), 32),
         M(128, G(128, 64, 8, 4), G(256, 64, 8, 4, True), 32),
         M(128, G(128, 64, 8, 3), G(256, 64, 8, 4), 64),
         M(128, G(128, 64, 8, 4), G(256, 64, 8, 4), 16)],
    ),
    1024: ([], [], [M(64, G(64, 128, 4, 4), G(256, 64, 8, 3), 16),
                    M(128, G(128, 64, 8, 3, True), G(256, 64, 8, 3, True), 64)]),
    256: ([], [], [M(32, G(128, 128, 4, 3), G(128, 128, 4, 3), 16)]),
    64: ([], [], [M(16, G(64, 256, 4, 3), G(64, 256, 4, 3))]),
}  # fmt: skip


def _sweep_entry(entry: dict, run: Callable, check: Callable, ref: torch.Tensor) -> dict:
    try:
        entry["err"] = rel_err(check(), ref)
        entry["ms"] = ms_of(run, rep=60)
    except Exception as exc:  # noqa: BLE001 - a config that fails is a result
        entry["error"] = repr(exc)[:300]
    print(entry, flush=True)
    return entry


def _sweep_tokens(tokens: int, w: list, w32: list, log: list, deadline: float) -> None:
    x, ids, weights = _moe_inputs(tokens)
    ref = fused_moe_ref(x.float(), *w32, ids, weights.float(), 0)
    gmm = ms_of(partial(fused_moe_grouped_mm, x, *w, ids, weights, 0), rep=60)
    log.append({"T": tokens, "kernel": "grouped_mm", "ms": gmm})
    tiles = {bm: mg.align_by_expert(ids, 0, NUM_EXPERTS, bm) for bm in (16, 32, 64, 128)}
    for bm in (16, 128):
        align = partial(mg.align_by_expert, ids, 0, NUM_EXPERTS, bm)
        log.append({"T": tokens, "kernel": "align", "block_m": bm, "ms": ms_of(align, rep=60)})
    gu_list, dn_list, layers = SWEEP[tokens]
    base = layers[0]
    act0 = mg.moe_gate_up(x, w[0], w[1], tiles[base.block_m], TOPK, base.gate_up, base.small_m)
    for kind, items in (("gate_up", gu_list), ("down", dn_list)):
        for bm, sm, cfg in items:
            entry = {"T": tokens, "kernel": kind, "block_m": bm, "small_m": sm,
                     "cfg": cfg.__dict__, "mma_rows": mma_rows(tiles[bm], sm)}  # fmt: skip
            if kind == "gate_up":
                run = partial(mg.moe_gate_up, x, w[0], w[1], tiles[bm], TOPK, cfg, sm)
                tb, cb, sb = tiles[base.block_m], base.down, base.small_m
                down = partial(mg.moe_down, w_down=w[2], tiles=tb, topk_weights=weights, cfg=cb,
                               small_m=sb)  # fmt: skip
                check = partial(lambda r, d: d(r()), run, down)
            else:
                run = check = partial(mg.moe_down, act0, w[2], tiles[bm], weights, cfg, sm)
            log.append(_sweep_entry(entry, run, check, ref))
    for round_ in range(2):
        for cfg in layers:
            if time.time() > deadline:
                return
            run = partial(mg.fused_moe_triton, x, *w, ids, weights, 0, cfg)
            entry = {"T": tokens, "kernel": f"layer{round_}", "cfg": str(cfg)}
            log.append(_sweep_entry(entry, run, run, ref))


def sweep(token_counts: list[int], log: list, budget_s: float) -> None:
    """Every SWEEP tile at each token count; stops at the time budget (device time is scarce)."""
    deadline = time.time() + budget_s
    w = _weights()
    w32 = [t.float() for t in w]
    for tokens in token_counts:
        _sweep_tokens(tokens, w, w32, log, deadline)
        log.append({"T": tokens, "kernel": "clock", "ms": 0.0, "cfg": time.time()})


if __name__ == "__main__":  # the tile sweep: python -m afd.bench.kernels_moe OUT.json [T ...]
    import json
    import sys

    found: list = []
    try:
        sweep([int(t) for t in sys.argv[2:]] or [4096, 1024, 256, 64], found, budget_s=200)
    finally:
        with open(sys.argv[1], "w") as f:
            json.dump(found, f, indent=1, default=str)
    for e in found:
        if "ms" in e:
            cells = [e["T"], e["kernel"], e.get("block_m", ""), e.get("small_m", ""), e.get("cfg")]
            print(*cells, e.get("mma_rows", ""), f"{e['ms']:.3f}", f"{e.get('err', 0):.1e}")

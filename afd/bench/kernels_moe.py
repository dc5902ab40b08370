"""`afd-bench kernels`, MoE part: the fused MoE layer (Triton, tuned per token count) against
the per-expert loop and `torch._grouped_mm`, as fractions of copy bandwidth and matmul peak."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from afd.bench.kernel_timing import ms_of, rel_err
from ffn_worker.kernels import moe_gemm as mg
from ffn_worker.kernels.fused_moe import fused_moe_grouped_mm, fused_moe_ref, has_grouped_mm

NUM_EXPERTS, TOPK, HIDDEN, INTER = 48, 3, 7168, 5120
GEMM_SWEEP = [mg.GemmConfig(*c) for c in (
    (64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (128, 64, 4, 5), (128, 128, 8, 4),
    (256, 64, 8, 3), (128, 64, 8, 3), (64, 64, 4, 4), (256, 64, 8, 4),
)]  # fmt: skip


def _moe_inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    probs = torch.softmax(torch.randn(tokens, NUM_EXPERTS, device="cuda"), dim=-1)
    weights, ids = probs.topk(TOPK, dim=-1)  # Step3: not renormalised
    return x, ids.to(torch.int32), weights.to(torch.bfloat16)


def _best_gemm(run: Callable[[mg.GemmConfig], object], log: list, tag: str) -> mg.GemmConfig | None:
    best, best_ms = None, float("inf")
    for cfg in GEMM_SWEEP:
        try:
            ms = ms_of(lambda c=cfg: run(c), rep=40)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result
            log.append({"kernel": tag, "cfg": cfg.__dict__, "error": repr(exc)[:120]})
            continue
        log.append({"kernel": tag, "cfg": cfg.__dict__, "ms": ms})
        print("moe sweep", log[-1], flush=True)
        best, best_ms = (cfg, ms) if ms < best_ms else (best, best_ms)
    return best


def _tune_moe(x: torch.Tensor, w: list, ids: torch.Tensor, weights: torch.Tensor, log: list):
    """Per BLOCK_M, the fastest gate-up and the fastest down tile, each timed on its own."""
    rows = x.shape[0] * TOPK / NUM_EXPERTS
    block_ms = (
        [16] if rows <= 8 else [16, 32] if rows <= 24 else [32, 64] if rows <= 96 else [64, 128]
    )
    found: list[mg.MoeConfig] = []
    for bm in block_ms:
        sids, bexp = mg.align_by_expert(ids, 0, NUM_EXPERTS, bm)
        gu = _best_gemm(
            partial(mg.moe_gate_up, x, w[0], w[1], sids, bexp, TOPK, bm), log, f"gu{bm}"
        )
        if gu is None:
            continue
        act = mg.moe_gate_up(x, w[0], w[1], sids, bexp, TOPK, bm, gu)  # [P, I]
        dn = _best_gemm(partial(mg.moe_down, act, w[2], sids, bexp, weights, bm), log, f"down{bm}")
        if dn is not None:
            found.append(mg.MoeConfig(bm, gu, dn))
    return found


def moe(peaks: dict[str, float], results: dict, token_counts: list[int]) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    shape_gu, shape_d = (NUM_EXPERTS, INTER, HIDDEN), (NUM_EXPERTS, HIDDEN, INTER)
    w = [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
         for s in (shape_gu, shape_gu, shape_d)]  # fmt: skip
    w32 = [t.float() for t in w]  # fp32 weights for the reference: 21 GB, fits in 80
    rows = results.setdefault("moe", [])
    for tokens in token_counts:
        x, ids, weights = _moe_inputs(tokens)
        args = (x, *w, ids, weights, 0)
        ref = fused_moe_ref(x.float(), *w32, ids, weights.float(), 0)  # [T, H] fp32 math
        touched = int(torch.unique(ids).numel())
        nbytes = touched * 3 * INTER * HIDDEN * 2
        flops = 2 * tokens * TOPK * 3 * INTER * HIDDEN
        row: dict = {"T": tokens, "touched_experts": touched, "weight_bytes": nbytes,
                     "flops": flops, "configs": [], "sweep": []}  # fmt: skip
        loop = ("loop", lambda a=args: fused_moe_ref(*a), None)  # host syncs: no graph
        variants: list[tuple[str, Callable, mg.MoeConfig | None]] = [loop]
        if has_grouped_mm():
            variants.append(("grouped_mm", lambda a=args: fused_moe_grouped_mm(*a), None))
        variants.append(("triton_default", lambda a=args: mg.fused_moe_triton(*a), None))
        for cfg in _tune_moe(x, w, ids, weights, row["sweep"]):
            variants.append(
                (f"triton {cfg}", lambda a=args, c=cfg: mg.fused_moe_triton(*a, c), cfg)
            )
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
        rows.append(row)


def _moe_breakdown(x, w: list, ids, weights, cfg: mg.MoeConfig) -> dict[str, float]:
    """The fused path's stages timed alone: where the time over the weight-streaming floor goes."""
    sids, bexp = mg.align_by_expert(ids, 0, NUM_EXPERTS, cfg.block_m)
    act = mg.moe_gate_up(x, w[0], w[1], sids, bexp, TOPK, cfg.block_m, cfg.gate_up)  # [P, I]
    return {
        "padded_rows": float((bexp < NUM_EXPERTS).sum()) * cfg.block_m,  # vs T*k real rows
        "align": ms_of(lambda: mg.align_by_expert(ids, 0, NUM_EXPERTS, cfg.block_m)),
        "gate_up": ms_of(
            lambda: mg.moe_gate_up(x, w[0], w[1], sids, bexp, TOPK, cfg.block_m, cfg.gate_up)
        ),
        "down": ms_of(lambda: mg.moe_down(act, w[2], sids, bexp, weights, cfg.block_m, cfg.down)),
    }

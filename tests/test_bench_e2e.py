"""CPU smoke test of the e2e/layer benchmark logic: tiny shapes, gloo instead of NCCL."""

from __future__ import annotations

import torch

from afd.bench.e2e import budget_table
from afd.bench.e2e_pipeline import PipelineBench
from afd.bench.layer import step3_config
from afd.models.tiny import TINY_DIMS

TINY = TINY_DIMS


def test_pipeline_bench_runs_on_cpu_with_gloo() -> None:
    cfg = step3_config(num_layers=3, **TINY)  # 3: the steady per-layer time needs layer 1..L-1
    with PipelineBench(cfg, 6, 40, ("cpu", "cpu"), "gloo", torch.float32) as bench:
        colo = [bench.colocated(6), bench.colocated(6, graphs=True)]
        disagg = [bench.disaggregated(6, m, g) for g in (False, True) for m in (1, 3)]
        assert bench.rel_diff(6, 3)["disagg_vs_colocated"] < 1e-5
        diffs = bench.rel_diff(5, 2, graphs=True)  # 3 + 2 rows: padded to 4 and 2
        assert max(diffs.values()) < 1e-5, diffs
    for row in colo + disagg:
        assert row["layer_us"] > 0 and row["bound_us"] > 0
        assert row["step_ms_61"] > row["step_ms"]
        assert row["attn_busy_us"] > 0 and row["ffn_busy_us"] > 0
    assert [(r["m"], r["graphs"]) for r in disagg] == [(1, False), (3, False), (1, True), (3, True)]
    table = budget_table(colo, disagg, [1e9, 1e-9])
    assert table[0]["colocated"]["batch"] == 6 and table[1]["disaggregated"] is None


def test_pipeline_bench_fp8_weights_on_both_ranks() -> None:
    """--fp8: the FFN rank and the colocated FFN quantize the same draws the same way, and the
    attention side serves e4m3 projections, so disaggregated still computes colocated's
    numbers; and the weights really are e4m3 (a bench that dropped the flag on one side
    would differ by the quantization error, ~5 %)."""
    cfg = step3_config(num_layers=3, **TINY)
    with PipelineBench(cfg, 6, 40, ("cpu", "cpu"), "gloo", torch.float32, fp8=True) as bench:
        assert bench.rel_diff(6, 3)["disagg_vs_colocated"] < 1e-5
        moe = next(layer.moe for layer in bench.local.model.layers if layer.is_moe)
        assert moe.gate_proj.dtype == torch.float8_e4m3fn
        assert type(bench.side.layer(0).self_attn.o_proj).__name__ == "Fp8Linear"

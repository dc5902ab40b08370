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

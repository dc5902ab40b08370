"""CPU dry run of `afd-bench sweep`: K CPU rank processes over gloo, tiny shapes; checks the
JSON schema, that every split of K (and colocated) appears, and that the plot renders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afd.bench.sweep import layouts, main
from afd.planner.profile import load_profile

PROFILE = Path(__file__).resolve().parent.parent / "bench" / "results" / "profile_h200.json"


def test_layouts_cover_every_split() -> None:
    assert layouts(4) == [(1, 3), (2, 2), (3, 1), (4, 0)]
    assert len(layouts(8)) == 8


@pytest.mark.slow
def test_sweep_dry_run_writes_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    argv = ["--dry-run", "--gpus", "3", "--context", "40", "--batches", "2,4"]
    argv += ["--micro-batches", "1,2", "--tpot-ms", "1e7", "--out", str(out)]
    argv += ["--profile", str(PROFILE)]  # the planner's side of the comparison, from the H200
    assert main(argv) == 0
    result = json.loads(out.read_text())
    profile = load_profile(PROFILE)
    for key in ("command", "device", "torch", "gpus", "tpot_ms", "layer_budget_us", "splits"):
        assert key in result
    assert result["gpus"] == 3 and result["tpot_ms"] == [50.0, 1e7]
    names = [s["name"] for s in result["splits"]]
    assert names == ["1+2", "2+1", "colocated x3"]
    for s in result["splits"]:
        assert s["attn"] + s["ffn"] == 3
        assert {r["m"] for r in s["measurements"]} == ({1, 2} if s["ffn"] else {1})
        assert all(r["layer_us"] > 0 and r["tokens_per_s_per_gpu"] > 0 for r in s["measurements"])
        assert set(s["measured"]) == set(s["predicted"]) == {"50", "1e+07"}
        assert s["measured"]["1e+07"] is not None  # everything fits a 1e7 ms budget
        # CPU steps are far slower than 820 us per layer: nothing fits, and the JSON says so
        assert s["measured"]["50"] is None
        # the planner's layer time at every measured point; colocated: the two profiled stages
        for r in s["measurements"]:
            assert r["planner_layer_us"] > 0
            if not s["ffn"]:
                both = profile.attention_us(r["batch"], 40) + profile.ffn_us(r["batch"])
                assert r["planner_layer_us"] == pytest.approx(both)
    from PIL import Image

    with Image.open(out.with_suffix(".png")) as png:
        assert png.size == (800, 500)

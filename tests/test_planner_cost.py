"""`afd-plan cost`: the JSON schema and USD per 1M tokens derived by hand (PLANNER.md §1)."""

from __future__ import annotations

import json

import pytest

from afd.planner.cli import main

# The Step3 report's hardware (PLANNER.md table): USD/hour, peak used (FP8, else BF16), B/s
REPORT = {
    "H800": (2.00, 1.98e15, 3.35e12),
    "H20": (0.80, 2.96e14, 4.00e12),
    "A800": (0.75, 3.12e14, 2.00e12),  # no FP8: BF16 peak
    "910B": (0.67, 2.80e14, 1.60e12),  # no FP8: BF16 peak
}

# Per token, summed over layers, by hand (see test_planner_models.py for the derivations)
STEP3 = {
    "kv": 512 * 61,  # bytes per context token
    "attn": 2 * 64 * 512 * 61,  # FLOPs per context token
    "linear": 2 * 169_345_024 * 61,
    "ffn": 5 * 2 * 3 * 7168 * 18432 + 56 * 2 * 4 * 3 * 7168 * 5120,
}
DSV3 = {
    "kv": 576 * 61,
    "attn": 2 * 128 * 1152 * 61,
    "linear": 2 * 187_105_280 * 61,
    "ffn": 3 * 2 * 3 * 7168 * 18432 + 58 * 2 * 9 * 3 * 7168 * 2048,
}
QWEN3 = {
    "kv": 1024 * 94,
    "attn": 2 * 64 * 256 * 94,
    "linear": 2 * (4096 * 8192 * 2 + 2 * 4096 * 512) * 94,
    "ffn": 94 * 2 * 8 * 3 * 4096 * 1536,
}
MODELS = {"step3": STEP3, "deepseek-v3": DSV3, "qwen3-235b-a22b": QWEN3}


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one object on one line
    return json.loads(out)


def by_hand(fig: dict, context: int, hw: str) -> tuple[float, float]:
    price, peak, bw = REPORT[hw]
    u_flop = price / 3600 / peak
    u_byte = price / 3600 / bw
    kv, attn = fig["kv"] * context, fig["attn"] * context
    attention = max(attn * u_flop, kv * u_byte) + fig["linear"] * u_flop
    return attention * 1e6, fig["ffn"] * u_flop * 1e6


def test_json_schema(capsys: pytest.CaptureFixture) -> None:
    out = run_json(capsys, "cost", "--model", "step3", "--context", "4096", "--json")
    assert set(out) == {
        "model",
        "context",
        "kv_bytes",
        "attn_flops",
        "linear_flops",
        "ffn_flops",
        "cost_per_mtok",
        "best_colocated",
        "best_afd",
    }
    assert out["model"] == "step3" and out["context"] == 4096
    assert {"H800", "H20", "A800", "910B", "H100", "H200", "B200", "L20", "L40S"} <= set(
        out["cost_per_mtok"]
    )
    for costs in out["cost_per_mtok"].values():
        assert set(costs) == {"attention", "ffn"}
        assert costs["attention"] > 0 and costs["ffn"] > 0
    assert set(out["best_colocated"]) == {"hardware", "total"}
    assert set(out["best_afd"]) == {"attention_hw", "ffn_hw", "total"}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("context", [4096, 32768])
def test_figures_and_costs_by_hand(capsys: pytest.CaptureFixture, model: str, context: int) -> None:
    out = run_json(capsys, "cost", "--model", model, "--context", str(context), "--json")
    fig = MODELS[model]
    assert out["kv_bytes"] == fig["kv"] * context
    assert out["attn_flops"] == fig["attn"] * context
    assert out["linear_flops"] == fig["linear"]
    assert out["ffn_flops"] == fig["ffn"]
    for hw in REPORT:
        attention, ffn = by_hand(fig, context, hw)
        assert out["cost_per_mtok"][hw]["attention"] == pytest.approx(attention, rel=1e-12)
        assert out["cost_per_mtok"][hw]["ffn"] == pytest.approx(ffn, rel=1e-12)


def test_step3_at_4k_on_h800_by_hand(capsys: pytest.CaptureFixture) -> None:
    out = run_json(capsys, "cost", "--model", "step3", "--context", "4096", "--json")
    # KV reads: 31,232 B x 4096 = 127.9 MB at $2/h over 3.35 TB/s = $2.121e-8 per token;
    # linears: 20.66 GFLOP at $2/h over 1.98 PFLOP/s = $5.797e-9; together $0.02701 per 1M.
    assert out["cost_per_mtok"]["H800"]["attention"] == pytest.approx(0.027012, abs=1e-6)
    # FFN: 53.29 GFLOP at $2/h over 1.98 PFLOP/s = $0.014952 per 1M
    assert out["cost_per_mtok"]["H800"]["ffn"] == pytest.approx(0.014952, abs=1e-6)


def test_best_choices_on_the_report_hardware(capsys: pytest.CaptureFixture) -> None:
    hw = "H800,H20,A800,910B"
    out = run_json(
        capsys, "cost", "--model", "step3", "--context", "8192", "--hardware", hw, "--json"
    )
    assert set(out["cost_per_mtok"]) == set(REPORT)
    costs = {h: by_hand(STEP3, 8192, h) for h in REPORT}
    # At 8K, H20's bandwidth per dollar makes it the cheapest attention device and H800's FP8
    # FLOPs per dollar the cheapest FFN device, so AFD beats every single-kind deployment.
    assert (out["best_afd"]["attention_hw"], out["best_afd"]["ffn_hw"]) == ("H20", "H800")
    assert out["best_afd"]["total"] == pytest.approx(costs["H20"][0] + costs["H800"][1])
    colocated = min(costs, key=lambda h: sum(costs[h]))
    assert out["best_colocated"]["hardware"] == colocated == "H800"
    assert out["best_colocated"]["total"] == pytest.approx(sum(costs["H800"]))
    assert out["best_afd"]["total"] < out["best_colocated"]["total"]


def test_best_choices_are_the_minima(capsys: pytest.CaptureFixture) -> None:
    out = run_json(capsys, "cost", "--model", "deepseek-v3", "--context", "4096", "--json")
    table = out["cost_per_mtok"]
    totals = {h: c["attention"] + c["ffn"] for h, c in table.items()}
    assert out["best_colocated"]["total"] == pytest.approx(min(totals.values()))
    attn = min(c["attention"] for c in table.values())
    ffn = min(c["ffn"] for c in table.values())
    assert out["best_afd"]["total"] == pytest.approx(attn + ffn)


def test_text_output_and_kv_dtype(capsys: pytest.CaptureFixture) -> None:
    assert main(["cost", "--model", "step3", "--context", "4096"]) == 0
    text = capsys.readouterr().out
    assert "best colocated" in text and "best AFD" in text and "H800" in text
    out = run_json(
        capsys, "cost", "--model", "step3", "--context", "4096", "--kv-bytes", "2", "--json"
    )
    assert out["kv_bytes"] == 1024 * 61 * 4096  # BF16 KV: 1 KiB per token per layer


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["cost", "--model", "step3", "--context", "0"]) == 2
    assert main(["cost", "--model", "nope", "--context", "4096"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["cost", "--model", "step3", "--context", "4096", "--hardware", "TPU9"]) == 2
    assert "unknown hardware 'TPU9'" in capsys.readouterr().err

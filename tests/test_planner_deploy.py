"""`afd-plan deploy`: plans under TPOT and memory limits, checked by hand (PLANNER.md §3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afd.planner.cli import main
from afd.planner.hardware import PRESETS
from afd.planner.models import load_model
from afd.planner.search import Limits, Planner
from afd.planner.stages import Layout, StageModel

H800 = ["--attn-hw", "H800", "--ffn-hw", "H800"]
STEP3_4K = ["deploy", "--model", "step3", "--context", "4096", "--tpot-ms", "50"]
BW, FP8, CAP = 3.35e12, 1.98e15, 0.9 * 80e9  # H800 bytes/s, FLOP/s, usable bytes


def deploy_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_acceptance_command_gives_a_plan(capsys: pytest.CaptureFixture) -> None:
    assert main([*STEP3_4K, *H800]) == 0
    text = capsys.readouterr().out
    assert "tok/s/GPU" in text and "H800" in text and "binding" in text
    out = deploy_json(capsys, *STEP3_4K, *H800)
    assert out["plans"]
    for p in out["plans"]:
        assert p["tpot_ms"] <= 50
        assert p["attention_mem_gb"] * 1e9 <= CAP and p["ffn_mem_gb"] * 1e9 <= CAP
        attn = p["attention_instances"] * p["attention_instance_size"]
        ffn = p["ffn_instances"] * p["ffn_instance_size"]
        assert p["num_gpus"] == attn + ffn <= 64
        rate = attn * p["sequences_per_attention_rank"] / (p["tpot_ms"] * 1e-3)
        assert p["tokens_per_s_per_gpu"] == pytest.approx(rate / (attn + ffn))
        usd_per_s = 2.00 / 3600 * (attn + ffn)
        assert p["cost_per_mtok"] == pytest.approx(usd_per_s / rate * 1e6)
    costs = [p["cost_per_mtok"] for p in out["plans"]]
    assert costs == sorted(costs)


def test_step3_2a2f_by_hand(capsys: pytest.CaptureFixture) -> None:
    out = deploy_json(
        capsys, *STEP3_4K, *H800, "--attn", "2x8", "--ffn", "2x8", "--micro-batches", "3"
    )
    (p,) = out["plans"]
    # Attention rank memory: FP8 attention linears of 61 layers + BF16 embedding and LM head,
    # plus 3 micro-batches of b sequences x 4096 tokens x 31,232 KV bytes.
    weights = 61 * 169_345_024 * 1 + 2 * 128815 * 7168 * 2
    b = int((CAP - weights) // (3 * 4096 * 512 * 61))
    assert b == 151 and p["batch_per_micro_batch"] == b
    assert p["binding"] == "attention memory"
    # stages per layer and micro-batch, seconds
    attn = b * 4096 * 512 / BW + max(169_345_024 / BW, b * 2 * 169_345_024 / FP8)
    tokens = 16 * b  # every FFN rank shares the work of all 16 attention ranks' tokens
    expert = 3 * 7168 * 5120
    touched = 48 * (1 - (1 - 3 / 48) ** tokens)  # = 48.0: every expert is hit
    moe = max((touched + 1) * expert / 16 / BW, tokens * 2 * 4 * expert / 16 / FP8)
    dense = max(3 * 7168 * 18432 / 16 / BW, tokens * 2 * 3 * 7168 * 18432 / 16 / FP8)
    # an attention rank sends b tokens to each of 2 FFN instances; an FFN rank receives
    # 16 b / 8: both 2 b tokens of 7168, FP8 out and BF16 back, at 400 Gbit/s
    a2f = 2 * b * 7168 * 1 / 50e9
    f2a = 2 * b * 7168 * 2 / 50e9

    def layer(ffn: float) -> float:
        return max(3 * attn, 3 * ffn, 3 * a2f, 3 * f2a, attn + a2f + ffn + f2a)

    tpot = 5 * layer(dense) + 56 * layer(moe)
    assert p["stage_us"]["attention"] == pytest.approx(attn * 1e6)
    assert p["stage_us"]["ffn_moe"] == pytest.approx(moe * 1e6)
    assert p["stage_us"]["a2f"] == pytest.approx(a2f * 1e6)
    assert p["tpot_ms"] == pytest.approx(tpot * 1e3)
    assert p["tokens_per_s_per_gpu"] == pytest.approx(16 * 3 * b / tpot / 32)


def test_tight_tpot_binds_and_batch_is_maximal(capsys: pytest.CaptureFixture) -> None:
    out = deploy_json(
        capsys,
        "deploy",
        "--model",
        "step3",
        "--context",
        "4096",
        "--tpot-ms",
        "12",
        *H800,
        "--attn",
        "2x8",
        "--ffn",
        "2x8",
        "--micro-batches",
        "3",
    )
    (p,) = out["plans"]
    assert p["tpot_ms"] <= 12 and p["binding"] != "attention memory"
    spec, h800 = load_model("step3"), PRESETS["H800"]
    planner = Planner(StageModel(spec, 4096), Limits(12e-3))
    layout = Layout(h800, 2, 8, h800, 2, 8)
    b = p["batch_per_micro_batch"]
    assert planner.fits_tpot(layout, b, 3, 400.0)
    assert not planner.fits_tpot(layout, b + 1, 3, 400.0)


def test_one_micro_batch_has_no_overlap(capsys: pytest.CaptureFixture) -> None:
    out = deploy_json(
        capsys,
        "deploy",
        "--model",
        "step3",
        "--context",
        "32768",
        "--tpot-ms",
        "20",
        *H800,
        "--micro-batches",
        "1",
    )
    for p in out["plans"]:
        st = p["stage_us"]
        chain = st["attention"] + st["a2f"] + st["ffn_moe"] + st["f2a"]
        dense = st["attention"] + st["a2f"] + st["ffn_dense"] + st["f2a"]
        assert p["tpot_ms"] == pytest.approx((56 * chain + 5 * dense) * 1e-3)


def test_efficiency_scales_stage_times(capsys: pytest.CaptureFixture) -> None:
    pinned = [*STEP3_4K, *H800, "--attn", "2x8", "--ffn", "2x8", "--micro-batches", "3"]
    ideal = deploy_json(capsys, *pinned)["plans"][0]
    half = deploy_json(capsys, *pinned, "--attn-efficiency", "0.5")["plans"][0]
    b = half["batch_per_micro_batch"]
    attn = b * 4096 * 512 / BW + max(169_345_024 / BW, b * 2 * 169_345_024 / FP8)
    assert half["stage_us"]["attention"] == pytest.approx(attn / 0.5 * 1e6)
    assert half["tokens_per_s_per_gpu"] <= ideal["tokens_per_s_per_gpu"]


@pytest.mark.parametrize("model", ["deepseek-v3", "qwen3-235b-a22b"])
def test_other_presets_plan_and_respect_ffn_memory(
    capsys: pytest.CaptureFixture, model: str
) -> None:
    out = deploy_json(
        capsys,
        "deploy",
        "--model",
        model,
        "--context",
        "4096",
        "--tpot-ms",
        "50",
        *H800,
        "--rank-by",
        "throughput",
    )
    spec = load_model(model)
    assert out["plans"]
    rates = [p["tokens_per_s_per_gpu"] for p in out["plans"]]
    assert rates == sorted(rates, reverse=True)
    for p in out["plans"]:
        ranks = p["ffn_instances"] * p["ffn_instance_size"]
        assert spec.ffn_total_params / ranks <= CAP  # FP8 experts split over FFN ranks
    if model == "deepseek-v3":  # 657.8B FFN params at 1 byte need at least 10 x 72 GB
        assert spec.ffn_total_params == 3 * 3 * 7168 * 18432 + 58 * (
            256 * 3 * 7168 * 2048 + 3 * 7168 * 2048 + 256 * 7168
        )
        assert min(p["ffn_instances"] * p["ffn_instance_size"] for p in out["plans"]) >= 10


def test_plot_renders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import matplotlib.image

    png = tmp_path / "ratio.png"
    assert main([*STEP3_4K, *H800, "--plot", str(png)]) == 0
    image = matplotlib.image.imread(str(png))
    assert image.shape[:2] == (450, 800)  # 8 x 4.5 inches at 100 dpi
    assert image[..., :3].std() > 0.05  # not blank
    assert main([*STEP3_4K, *H800, "--plot", str(tmp_path / "missing" / "x.png")]) == 2
    assert "missing/x.png: cannot write the plot" in capsys.readouterr().err


def test_impossible_target_and_bad_flags(capsys: pytest.CaptureFixture) -> None:
    argv = ["deploy", "--model", "step3", "--context", "4096", *H800]
    assert main([*argv, "--tpot-ms", "0.5"]) == 1
    assert "no plan meets" in capsys.readouterr().out
    assert main([*argv, "--tpot-ms", "-3"]) == 2
    assert main([*argv, "--tpot-ms", "50", "--attn", "2y8"]) == 2
    assert "--attn" in capsys.readouterr().err


def test_network_and_micro_batch_flags(capsys: pytest.CaptureFixture) -> None:
    flags = "--network-gbps 25 400 --micro-batches 2 4 --top 1000".split()
    out = deploy_json(capsys, *STEP3_4K, *H800, *flags)
    plans = out["plans"]
    assert {p["network_gbps"] for p in plans} == {25.0, 400.0}
    assert {p["micro_batches"] for p in plans} <= {2, 4}

    def best(gbps: float) -> float:
        return max(p["tokens_per_s_per_gpu"] for p in plans if p["network_gbps"] == gbps)

    assert best(25.0) < best(400.0)  # a slow link must cost throughput somewhere


def test_console_entry_point_reports_errors_without_traceback() -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "afd.planner.cli", "cost", "--model", "gpt-9", "--context", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    assert proc.stderr.startswith("afd-plan: error: unknown model 'gpt-9'")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--profile-hw", "H100"], "--profile-hw names the hardware of a --profile"),
        (["--attn", "9x8", "--ffn", "2x8"], "is 88 GPUs, more than --max-gpus 64"),
        (["--plot", "plot.txt"], "--plot plot.txt: needs an image file suffix"),
        (["--plot", "plot"], "--plot plot: needs an image file suffix"),
    ],
)
def test_flags_that_would_be_ignored_or_rule_out_every_plan(
    tmp_path, capsys: pytest.CaptureFixture, monkeypatch, flags: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*STEP3_4K, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--mem-util", "--tpot-ms", "--network-gbps"])
def test_non_finite_numbers_are_usage_errors(capsys: pytest.CaptureFixture, flag: str) -> None:
    assert main([*STEP3_4K, flag, "nan"]) == 2
    assert "expected a positive float, got 'nan'" in capsys.readouterr().err

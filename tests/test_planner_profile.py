"""Calibrated planning: the profile reader, its interpolation and its use by `deploy`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from afd.config import ConfigError
from afd.planner.cli import main
from afd.planner.models import load_model
from afd.planner.profile import interpolate, load_profile


def attn_us(batch: float, context: float) -> float:
    return 20.0 + 5e-4 * batch * context  # bilinear, so interpolation must reproduce it


def ffn_us(tokens: float) -> float:
    return 150.0 + 0.05 * tokens


def transfer_us(tokens: float) -> float:
    return 30.0 + 0.2 * tokens


def profile_dict(**overrides: Any) -> dict[str, Any]:
    raw = {
        "device": "NVIDIA H100 80GB HBM3",
        "model": "step3",
        "hidden_size": 7168,
        "dtype": "bfloat16",
        "attention": [
            {"batch": b, "context": c, "us_per_layer": attn_us(b, c)}
            for c in (2048, 8192)
            for b in (32, 128, 512)
        ],
        "ffn": [{"tokens": t, "us_per_layer": ffn_us(t)} for t in (64, 512, 4096, 16384)],
        "transfer": [{"tokens": t, "us_round_trip": transfer_us(t)} for t in (32, 512, 2048)],
    }
    return {**raw, **overrides}


def write(tmp_path: Path, raw: Any, name: str = "profile.json") -> str:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return str(path)


def test_interpolation_rules() -> None:
    points = ((10.0, 100.0), (20.0, 200.0), (40.0, 260.0))
    assert interpolate(points, 15) == pytest.approx(150.0)
    assert interpolate(points, 30) == pytest.approx(230.0)
    assert interpolate(points, 5) == 100.0  # below: the smallest measurement
    assert interpolate(points, 60) == pytest.approx(320.0)  # above: last slope 3/token
    assert interpolate(((10.0, 100.0),), 30) == pytest.approx(300.0)  # one point: proportional
    falling = ((10.0, 100.0), (20.0, 90.0))
    assert interpolate(falling, 50) == 90.0  # never extrapolate a speed-up


def test_profile_reproduces_measurements(tmp_path: Path) -> None:
    prof = load_profile(write(tmp_path, profile_dict()))
    for b, c in [(64, 4096), (200, 5000), (512, 2048), (1024, 8192), (700, 16384)]:
        assert prof.attention_us(b, c) == pytest.approx(attn_us(b, c))
    assert prof.attention_us(8, 4096) == pytest.approx(attn_us(32, 4096))  # clamped batch
    for t in (100, 3000, 20000):
        assert prof.ffn_us(t) == pytest.approx(ffn_us(t))
    assert prof.transfer_us(1000) == pytest.approx(transfer_us(1000))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"ffn": None}, "'ffn' must be a non-empty list"),
        ({"ffn": []}, "'ffn' must be a non-empty list"),
        ({"device": 3}, "'device' must be a non-empty string"),
        ({"hidden_size": "7168"}, "'hidden_size' must be a positive finite number"),
        ({"hidden_size": 7168.5}, "'hidden_size' must be a whole number"),
        ({"hidden_size": float("inf")}, "'hidden_size' must be a positive finite number"),
        (
            {"ffn": [{"tokens": 8, "us_per_layer": float("nan")}]},
            "'ffn[0].us_per_layer' must be a positive finite number",
        ),
        ({"attention": [{"batch": 1, "context": 2}]}, "'attention[0].us_per_layer'"),
        ({"transfer": [{"tokens": -1, "us_round_trip": 3}]}, "'transfer[0].tokens'"),
        ({"transfer": [7]}, "'transfer[0]' must be an object"),
        ({"dtype": "int4"}, "'dtype' must be one of bfloat16, float16, fp8, got 'int4'"),
        (
            {"ffn": [{"tokens": 8, "us_per_layer": 1}, {"tokens": 8, "us_per_layer": 2}]},
            "two measurements at tokens=8",
        ),
    ],
)
def test_invalid_profiles_name_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, key: str
) -> None:
    raw = {k: v for k, v in profile_dict(**change).items() if v is not None}
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError, match="profile.json") as info:
        load_profile(path)
    assert key in str(info.value)
    argv = ["deploy", "--model", "step3", "--context", "4096", "--tpot-ms", "50"]
    assert main([*argv, "--profile", path]) == 2
    err = capsys.readouterr().err
    assert key in err and path in err and "Traceback" not in err


def test_profile_must_fit_the_model_and_a_known_device(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["deploy", "--context", "4096", "--tpot-ms", "50", "--profile"]
    path = write(tmp_path, profile_dict())
    assert main([*argv, path, "--model", "qwen3-235b-a22b"]) == 2
    assert "'hidden_size' is 7168" in capsys.readouterr().err
    assert main([*argv, path, "--model", "deepseek-v3"]) == 2  # same hidden size, other model
    assert "key 'model' is 'step3' but the plan is for 'deepseek-v3'" in capsys.readouterr().err
    bench = write(tmp_path, profile_dict(model="step3-width (random weights)"), "bench.json")
    assert main([*argv, bench, "--model", "deepseek-v3"]) == 2  # afd-bench layer's name
    assert "is 'step3-width (random weights)' but the plan is for" in capsys.readouterr().err
    assert main([*argv, bench, "--model", "step3"]) == 0
    capsys.readouterr()
    odd = write(tmp_path, profile_dict(device="Mystery Accelerator"), "odd.json")
    assert main([*argv, odd, "--model", "step3"]) == 2
    err = capsys.readouterr().err
    assert "odd.json: key 'device'" in err and "--profile-hw" in err
    assert main([*argv, odd, "--model", "step3", "--profile-hw", "H100", "--json"]) == 0
    assert main([*argv, write(tmp_path, "{oops", "bad.json"), "--model", "step3"]) == 2
    assert "bad.json: profile is not valid JSON" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "none.json"), "--model", "step3"]) == 2


def test_deploy_uses_measured_times(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, profile_dict())
    argv = [
        "deploy",
        "--model",
        "step3",
        "--context",
        "4096",
        "--tpot-ms",
        "50",
        "--attn",
        "2x8",
        "--ffn",
        "2x8",
        "--micro-batches",
        "3",
        "--json",
    ]
    assert main([*argv, "--profile", path]) == 0
    out = json.loads(capsys.readouterr().out)
    (p,) = out["plans"]
    assert (p["attention_hw"], p["ffn_hw"], p["calibrated"]) == ("H100", "H100", True)
    b = p["batch_per_micro_batch"]
    st = p["stage_us"]
    assert st["attention"] == pytest.approx(attn_us(b, 4096))
    # the profile's FFN is a whole layer on one device; 16 FFN ranks share 16 b tokens' work
    assert st["ffn_moe"] == pytest.approx(ffn_us(16 * b) / 16)
    assert st["ffn_dense"] == pytest.approx(ffn_us(16 * b) / 16)
    # the busier NIC carries 2 b tokens; FP8 out (1 byte) and BF16 back (2) share the trip
    assert st["a2f"] + st["f2a"] == pytest.approx(transfer_us(2 * b))
    assert st["a2f"] == pytest.approx(transfer_us(2 * b) / 3)

    def layer(ffn: float) -> float:
        return max(
            3 * st["attention"],
            3 * ffn,
            3 * st["a2f"],
            3 * st["f2a"],
            st["attention"] + st["a2f"] + ffn + st["f2a"],
        )

    assert p["tpot_ms"] == pytest.approx(61 * layer(st["ffn_moe"]) * 1e-3)
    assert p["tpot_ms"] <= 50


def test_memory_follows_the_profiles_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Where a profile's times stand in, memory is sized for the weights they were measured
    with: 16-bit times with FP8-sized weights would plan a deployment that cannot exist."""
    argv = ["deploy", "--model", "step3", "--context", "4096", "--tpot-ms", "50", "--json"]
    argv += ["--attn", "2x8", "--ffn", "2x8", "--micro-batches", "3"]

    def plan(*extra: str) -> dict:
        assert main([*argv, *extra]) == 0
        (p,) = json.loads(capsys.readouterr().out)["plans"]
        return p

    bf16 = plan("--profile", write(tmp_path, profile_dict(), "bf16.json"))
    fp8 = plan("--profile", write(tmp_path, profile_dict(dtype="fp8"), "fp8.json"))
    datasheet = plan("--attn-hw", "H100", "--ffn-hw", "H100")  # FP8 tensor cores: FP8 weights
    assert bf16["ffn_mem_gb"] == pytest.approx(2 * fp8["ffn_mem_gb"])
    assert fp8["ffn_mem_gb"] == pytest.approx(datasheet["ffn_mem_gb"])
    # the times are the profile's either way
    b = bf16["batch_per_micro_batch"]
    assert bf16["stage_us"]["attention"] == pytest.approx(attn_us(b, 4096))
    # attention memory: the projections' weights at the profile's bytes, beside the KV
    spec = load_model("step3")
    kv_per_seq = spec.kv_elems * spec.num_layers * 4096  # --kv-bytes 1 (the default)

    def weights_gb(p: dict) -> float:
        return p["attention_mem_gb"] - 3 * p["batch_per_micro_batch"] * kv_per_seq / 1e9

    projections_gb = spec.attn_linear_params * spec.num_layers / 1e9  # one byte a weight
    assert weights_gb(bf16) - weights_gb(fp8) == pytest.approx(projections_gb)
    assert weights_gb(fp8) == pytest.approx(weights_gb(datasheet))
    # a role on other hardware than the profile's keeps its datasheet weights
    other = plan("--profile", write(tmp_path, profile_dict(), "bf16b.json"), "--ffn-hw", "H200")
    assert other["ffn_hw"] == "H200" and other["ffn_mem_gb"] == pytest.approx(fp8["ffn_mem_gb"])


def test_slower_profile_means_fewer_tokens(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fast, slow = profile_dict(), profile_dict()
    for row in slow["attention"]:
        row["us_per_layer"] *= 3
    argv = [
        "deploy",
        "--model",
        "step3",
        "--context",
        "8192",
        "--tpot-ms",
        "50",
        "--json",
        "--rank-by",
        "throughput",
        "--profile",
    ]
    rates = []
    for raw, name in ((fast, "fast.json"), (slow, "slow.json")):
        assert main([*argv, write(tmp_path, raw, name)]) == 0
        rates.append(json.loads(capsys.readouterr().out)["plans"][0]["tokens_per_s_per_gpu"])
    assert rates[1] < rates[0]


def test_layer_bench_profile_holds_graph_times(tmp_path: Path) -> None:
    """afd-bench layer writes the stage times afd serves decodes at (graph replay), falling
    back to eager only where a capture failed; the planner reads them back."""
    from afd.bench.layer import write_profile

    attn = [
        {"batch": 32, "context": 4096, "eager_us": 1132.0, "graph_us": 320.0},
        {"batch": 64, "context": 4096, "eager_us": 1163.0, "graph_us": float("nan")},
    ]
    ffn = [{"tokens": 32, "eager_us": 2025.0, "graph_us": 1993.0}]
    rt = [{"tokens": 32, "transport_us": 156.0}]
    env = {"device": "NVIDIA H200"}
    write_profile(tmp_path / "p.json", env, attn, ffn, rt)
    profile = load_profile(tmp_path / "p.json")
    assert profile.attention_us(32, 4096) == 320.0
    assert profile.attention_us(64, 4096) == 1163.0  # no graph: eager
    assert profile.ffn_us(32) == 1993.0 and profile.transfer_us(32) == 156.0
    assert profile.dtype == "bfloat16" and profile.weight_bytes == 2
    # the e4m3 columns (--quantization fp8 --fp8-attention) make the fp8 profile
    attn[0] |= {"fp8_eager_us": 1100.0, "fp8_graph_us": 290.0}
    attn[1] |= {"fp8_eager_us": 1150.0, "fp8_graph_us": float("nan")}
    ffn[0] |= {"fp8_eager_us": 1200.0, "fp8_graph_us": 1150.0}
    write_profile(tmp_path / "f.json", env, attn, ffn, rt, fp8=True)
    fp8 = load_profile(tmp_path / "f.json")
    assert (fp8.dtype, fp8.weight_bytes) == ("fp8", 1)
    assert fp8.attention_us(32, 4096) == 290.0 and fp8.attention_us(64, 4096) == 1150.0
    assert fp8.ffn_us(32) == 1150.0 and fp8.transfer_us(32) == 156.0


def test_a_looser_target_never_serves_fewer_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Attention measured at 1K and 2K context, planned at 8K: the extended lines add their
    slopes, so past 32 sequences attention time grows faster than the batch. The planner took
    the largest batch meeting the target, and a looser target served fewer tokens/s (60 ms:
    437 tok/s/GPU at 78 sequences, 150 ms: 403 at 181); now it takes the batch that serves the
    most (32: 559) whatever the target."""
    rows = {1024: (100, 120, 200), 2048: (110, 140, 400)}
    attention = [
        {"batch": b, "context": c, "us_per_layer": v}
        for c, values in rows.items()
        for b, v in zip((8, 32, 128), values, strict=True)
    ]
    path = write(tmp_path, profile_dict(attention=attention))
    pinned = ["--attn", "1x8", "--ffn", "2x8", "--micro-batches", "1", "--profile", path]
    rates = []
    for tpot in ("20", "60", "150", "500"):
        argv = ["deploy", "--model", "step3", "--context", "8192", "--tpot-ms", tpot]
        assert main([*argv, *pinned, "--json"]) == 0
        (p,) = json.loads(capsys.readouterr().out)["plans"]
        rates.append(p["tokens_per_s_per_gpu"])
    assert rates == sorted(rates) and rates[-1] > 550
    assert p["batch_per_micro_batch"] == 32 and p["binding"] == "throughput peak"

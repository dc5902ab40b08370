"""afd-plan hardware: presets with sources, user hardware files, device-name matching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afd.planner.cli import main
from afd.planner.hardware import PRESETS, match_device


def test_report_presets_are_exact() -> None:
    # PLANNER.md table: USD/hour, BF16, FP8, bandwidth
    table = {
        "H800": (2.00, 9.89e14, 1.98e15, 3.35e12),
        "H20": (0.80, 1.48e14, 2.96e14, 4.00e12),
        "A800": (0.75, 3.12e14, None, 2.00e12),
        "910B": (0.67, 2.80e14, None, 1.60e12),
    }
    for name, row in table.items():
        hw = PRESETS[name]
        assert (hw.price_per_hour, hw.bf16_flops, hw.fp8_flops, hw.mem_bandwidth) == row
    assert PRESETS["A800"].peak_flops == 3.12e14  # BF16 where there is no FP8
    assert PRESETS["H800"].peak_flops == 1.98e15


def test_every_preset_has_a_source_and_capacity() -> None:
    assert {"H800", "H20", "A800", "910B", "H100", "H200", "B200", "L20", "L40S"} <= set(PRESETS)
    for hw in PRESETS.values():
        assert len(hw.source) > 10
        assert 16e9 <= hw.memory_bytes <= 300e9
        assert hw.fp8_flops is None or hw.fp8_flops > hw.bf16_flops
    assert PRESETS["H200"].memory_bytes == 141e9 and PRESETS["B200"].memory_bytes == 180e9


def test_match_device() -> None:
    assert match_device("NVIDIA H100 80GB HBM3", PRESETS).name == "H100"
    assert match_device("NVIDIA H200", PRESETS).name == "H200"  # not H20
    assert match_device("NVIDIA H20", PRESETS).name == "H20"
    assert match_device("Ascend 910B3", PRESETS) is None  # 910B3 is not 910B by name
    assert match_device("Ascend 910B", PRESETS).name == "910B"
    assert match_device("AMD Instinct MI300X", PRESETS) is None


YAML = """\
MI300X:
  price_per_hour: 1.80
  bf16_flops: 1.307e15
  fp8_flops: 2.615e15
  mem_bandwidth: 5.3e12
  memory_gb: 192
  source: AMD Instinct MI300X datasheet
H800:
  price_per_hour: 1.00
  bf16_flops: 9.89e14
  fp8_flops: 1.98e15
  mem_bandwidth: 3.35e12
  memory_gb: 80
"""


def test_hardware_file_adds_and_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "hw.yaml"
    path.write_text(YAML)
    argv = ["cost", "--model", "step3", "--context", "4096", "--hardware-file", str(path)]
    assert main([*argv, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["cost_per_mtok"]
    u_flop = 1.80 / 3600 / 2.615e15
    u_byte = 1.80 / 3600 / 5.3e12
    kv, attn, linear = 512 * 61 * 4096, 65536 * 61 * 4096, 2 * 169_345_024 * 61
    expected = (max(attn * u_flop, kv * u_byte) + linear * u_flop) * 1e6
    assert table["MI300X"]["attention"] == pytest.approx(expected)
    # H800 at half the report's price: half the cost per token
    assert table["H800"]["ffn"] == pytest.approx(0.014952 / 2, rel=1e-4)
    json_path = tmp_path / "hw.json"
    json_path.write_text(
        json.dumps(
            {
                "X1": {
                    "price_per_hour": 1,
                    "bf16_flops": 1e14,
                    "mem_bandwidth": 1e12,
                    "memory_gb": 32,
                }
            }
        )
    )
    assert (
        main(
            [
                "cost",
                "--model",
                "step3",
                "--context",
                "64",
                "--hardware-file",
                str(json_path),
                "--hardware",
                "X1",
                "--json",
            ]
        )
        == 0
    )
    assert set(json.loads(capsys.readouterr().out)["cost_per_mtok"]) == {"X1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("MI300X:\n  price_per_hour: 1.8\n", "MI300X.bf16_flops must be a positive finite number"),
        ("MI300X: 3\n", "entry 'MI300X' must be a mapping"),
        (
            "X: {price_per_hour: .nan, bf16_flops: 1e15, mem_bandwidth: 1e12, memory_gb: 80}\n",
            "X.price_per_hour must be a positive finite number",
        ),
        ("\udcff: 1\n", "not valid YAML/JSON"),
        ("[1, 2]\n", "expected a mapping"),
        ("a: [unclosed\n", "not valid YAML/JSON"),
        (
            "H100,SXM: {price_per_hour: 2, bf16_flops: 1e15, mem_bandwidth: 3e12, memory_gb: 80}\n",
            "hardware name 'H100,SXM' cannot be chosen: rename it (no commas)",
        ),
    ],
)
def test_bad_hardware_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str, message: str
) -> None:
    path = tmp_path / "hw.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # \udcff: a 0xff byte
    assert (
        main(["cost", "--model", "step3", "--context", "4096", "--hardware-file", str(path)]) == 2
    )
    err = capsys.readouterr().err
    assert str(path) in err and message in err and "Traceback" not in err


def test_missing_hardware_file_and_unknown_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = str(tmp_path / "none.yaml")
    assert main(["hardware", "--hardware-file", missing]) == 2
    assert "none.yaml: hardware file not found" in capsys.readouterr().err
    argv = ["deploy", "--model", "step3", "--context", "4096", "--tpot-ms", "50"]
    assert main([*argv, "--attn-hw", "TPU9"]) == 2
    assert "unknown hardware 'TPU9'" in capsys.readouterr().err


def test_hardware_listing(capsys: pytest.CaptureFixture) -> None:
    assert main(["hardware"]) == 0
    out = capsys.readouterr().out
    for name, hw in PRESETS.items():
        assert name in out and hw.source in out

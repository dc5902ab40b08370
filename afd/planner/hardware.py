"""Accelerator presets (price, peak FLOP/s, memory bandwidth, capacity) and user hardware files."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from afd.config import ConfigError

_STEP3_REPORT = "Step3 system report, arXiv 2507.19427 (price, FLOP/s, bandwidth)"
# Prices outside the report are not published list prices; they are round rental-market
# figures so that every preset can be costed. Override them with --hardware-file.
_PRICE_NOTE = "price assumed (2025 rental market), override with --hardware-file"


@dataclass(frozen=True)
class Hardware:
    """One accelerator. FLOP/s are dense (no sparsity); bandwidth and capacity are per device."""

    name: str
    price_per_hour: float  # USD per device-hour
    bf16_flops: float
    fp8_flops: float | None  # None: no FP8 tensor cores
    mem_bandwidth: float  # bytes/s
    memory_bytes: float
    source: str

    @property
    def has_fp8(self) -> bool:
        return self.fp8_flops is not None

    @property
    def peak_flops(self) -> float:
        """PLANNER.md §1: FP8 peak where the device has FP8, otherwise BF16."""
        return self.fp8_flops if self.fp8_flops is not None else self.bf16_flops

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight element: FP8 checkpoints need FP8 tensor cores to pay off."""
        return 1 if self.has_fp8 else 2


def _gb(n: float) -> float:
    return n * 1e9


PRESETS: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        # The report's four (PLANNER.md table, exact numbers); capacities from vendor sheets.
        Hardware("H800", 2.00, 9.89e14, 1.98e15, 3.35e12, _gb(80), f"{_STEP3_REPORT}; 80 GB"),
        Hardware("H20", 0.80, 1.48e14, 2.96e14, 4.00e12, _gb(96), f"{_STEP3_REPORT}; 96 GB"),
        Hardware("A800", 0.75, 3.12e14, None, 2.00e12, _gb(80), f"{_STEP3_REPORT}; 80 GB"),
        Hardware("910B", 0.67, 2.80e14, None, 1.60e12, _gb(64), f"{_STEP3_REPORT}; 64 GB"),
        Hardware(
            "H100", 2.00, 9.89e14, 1.979e15, 3.35e12, _gb(80),
            f"NVIDIA H100 Tensor Core GPU datasheet (SXM5), nvidia.com/en-us/data-center/h100; "
            f"{_PRICE_NOTE}",
        ),
        Hardware(
            "H200", 2.50, 9.89e14, 1.979e15, 4.80e12, _gb(141),
            f"NVIDIA H200 Tensor Core GPU datasheet (SXM), nvidia.com/en-us/data-center/h200; "
            f"{_PRICE_NOTE}",
        ),
        Hardware(
            "B200", 4.00, 2.25e15, 4.5e15, 8.00e12, _gb(180),
            f"NVIDIA HGX B200 datasheet (per GPU, dense = half of sparse), "
            f"nvidia.com/en-us/data-center/hgx; {_PRICE_NOTE}",
        ),
        Hardware(
            "A100", 0.80, 3.12e14, None, 2.039e12, _gb(80),
            f"NVIDIA A100 Tensor Core GPU datasheet (80GB SXM), "
            f"nvidia.com/en-us/data-center/a100; {_PRICE_NOTE}",
        ),
        Hardware(
            "L20", 0.50, 1.195e14, 2.39e14, 8.64e11, _gb(48),
            f"NVIDIA L20 product brief (48 GB GDDR6, 864 GB/s); {_PRICE_NOTE}",
        ),
        Hardware(
            "L40S", 0.90, 3.6205e14, 7.33e14, 8.64e11, _gb(48),
            f"NVIDIA L40S datasheet, nvidia.com/en-us/data-center/l40s (dense); {_PRICE_NOTE}",
        ),
    )
}  # fmt: skip


def find_hardware(name: str, table: dict[str, Hardware]) -> Hardware:
    for key, hw in table.items():
        if key.lower() == name.lower():
            return hw
    raise ConfigError(f"unknown hardware {name!r}: expected one of {', '.join(table)}")


def match_device(device: str, table: dict[str, Hardware]) -> Hardware | None:
    """The preset named inside a device string such as 'NVIDIA H100 80GB HBM3'."""
    for key in sorted(table, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device, re.IGNORECASE):
            return table[key]
    return None


_FIELDS = ("price_per_hour", "bf16_flops", "mem_bandwidth", "memory_gb")


def load_hardware_file(path: str | Path) -> dict[str, Hardware]:
    """Read `{NAME: {price_per_hour, bf16_flops, fp8_flops?, mem_bandwidth, memory_gb,
    source?}}` from YAML or JSON."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: hardware file not found")
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML/JSON ({e})") from e
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of hardware name -> fields")
    return {str(name): _parse_entry(str(name), entry, path) for name, entry in raw.items()}


def _parse_entry(name: str, entry: Any, path: Path) -> Hardware:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: entry {name!r} must be a mapping of fields")
    if "," in name or not name.strip():  # --hardware and --attn-hw take comma lists of names
        raise ConfigError(f"{path}: hardware name {name!r} cannot be chosen: rename it (no commas)")
    values = {}
    for key in _FIELDS:
        values[key] = _positive(entry.get(key), f"{path}: {name}.{key}")
    fp8 = entry.get("fp8_flops")
    return Hardware(
        name=name,
        price_per_hour=values["price_per_hour"],
        bf16_flops=values["bf16_flops"],
        fp8_flops=None if fp8 is None else _positive(fp8, f"{path}: {name}.fp8_flops"),
        mem_bandwidth=values["mem_bandwidth"],
        memory_bytes=_gb(values["memory_gb"]),
        source=str(entry.get("source", f"user file {path}")),
    )


def _positive(value: Any, where: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1.3e15 (no exponent sign) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{where} must be a positive finite number, got {value!r}")
    return float(value)

"""Measured per-layer stage times (written by afd's GPU benchmarks), validated and interpolated."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afd.config import ConfigError

Point = tuple[float, float]  # (x, microseconds)
# A profile's "dtype": the weights its times were measured with, as bytes per weight. "fp8":
# the routed experts and the attention projections in e4m3, as `afd-serve --quantization fp8
# --fp8-attention` serves them (afd-bench layer's fp8 columns). The planner counts every FFN
# and projection weight at these bytes; the shared expert and dense layers, which afd keeps
# in 16 bits, are ~3 % of Step3's FFN weights (8 of 304 B parameters).
WEIGHT_BYTES = {"bfloat16": 2, "float16": 2, "fp8": 1}


@dataclass(frozen=True)
class Profile:
    """Times in microseconds. Attention: one rank, its whole batch, one layer. FFN: one device
    running a whole FFN layer for the tokens it receives. Transfer: A->F->A round trip.
    `dtype` names the weights the times were measured with (WEIGHT_BYTES)."""

    path: str
    device: str
    model: str
    hidden_size: int
    dtype: str
    attention: tuple[tuple[float, tuple[Point, ...]], ...]  # (context, batch line), by context
    ffn: tuple[Point, ...]
    transfer: tuple[Point, ...]

    def attention_us(self, batch: float, context: float) -> float:
        lines = self.attention
        contexts = [c for c, _ in lines]
        values = [interpolate(line, batch) for _, line in lines]
        return interpolate(tuple(zip(contexts, values, strict=True)), context)

    def ffn_us(self, tokens: float) -> float:
        return interpolate(self.ffn, tokens)

    def transfer_us(self, tokens: float) -> float:
        return interpolate(self.transfer, tokens)

    @property
    def weight_bytes(self) -> int:
        return WEIGHT_BYTES[self.dtype]


def interpolate(points: tuple[Point, ...], x: float) -> float:
    """Piecewise linear inside the measured range. Below it, the smallest measurement (weight
    reads and launch costs do not shrink with size); above it, the last segment extended (or
    proportional growth from a single point). Both choices err towards slower."""
    x0, y0 = points[0]
    if x <= x0:
        return y0
    for (xa, ya), (xb, yb) in zip(points, points[1:], strict=False):
        if x <= xb:
            return ya + (yb - ya) * (x - xa) / (xb - xa)
    if len(points) == 1:
        return y0 * x / x0
    (xa, ya), (xb, yb) = points[-2], points[-1]
    return yb + max(0.0, (yb - ya) / (xb - xa)) * (x - xb)


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: profile file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: profile is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: profile must be a JSON object")
    r = _Reader(raw, path)
    return Profile(
        path=str(path),
        device=r.text("device"),
        model=r.text("model"),
        hidden_size=r.whole(raw, "hidden_size"),
        dtype=r.choice("dtype", tuple(WEIGHT_BYTES)),
        attention=_attention_lines(r.rows("attention", ("batch", "context", "us_per_layer")), r),
        ffn=r.line("ffn", "tokens", "us_per_layer"),
        transfer=r.line("transfer", "tokens", "us_round_trip"),
    )


def _attention_lines(
    rows: list[tuple[float, ...]], r: _Reader
) -> tuple[tuple[float, tuple[Point, ...]], ...]:
    by_context: dict[float, list[Point]] = {}
    for batch, context, us in rows:
        by_context.setdefault(context, []).append((batch, us))
    return tuple(
        (c, r.sorted_unique(pts, f"attention (context={c:g})", "batch"))
        for c, pts in sorted(by_context.items())
    )


class _Reader:
    """Field access that names the file and the key path in every error."""

    def __init__(self, raw: dict[str, Any], path: Path) -> None:
        self.raw, self.path = raw, path

    def fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: key '{key}' {what}")

    def text(self, key: str) -> str:
        value = self.raw.get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.raw.get(key)
        if value not in allowed:
            raise self.fail(key, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def number(self, obj: dict[str, Any], key: str, where: str = "") -> float:
        value = obj.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)  # JSON's NaN, Infinity and 1e400
            or value <= 0
        ):
            raise self.fail(f"{where}{key}", f"must be a positive finite number, got {value!r}")
        return float(value)

    def whole(self, obj: dict[str, Any], key: str) -> int:
        value = self.number(obj, key)
        if value != int(value):
            raise self.fail(key, f"must be a whole number, got {obj.get(key)!r}")
        return int(value)

    def rows(self, key: str, fields: tuple[str, ...]) -> list[tuple[float, ...]]:
        entries = self.raw.get(key)
        if not isinstance(entries, list) or not entries:
            raise self.fail(key, "must be a non-empty list of measurements")
        rows = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise self.fail(f"{key}[{i}]", "must be an object")
            rows.append(tuple(self.number(entry, f, f"{key}[{i}].") for f in fields))
        return rows

    def line(self, key: str, x: str, y: str) -> tuple[Point, ...]:
        points = [(a, b) for a, b in self.rows(key, (x, y))]
        return self.sorted_unique(points, key, x)

    def sorted_unique(self, points: list[Point], key: str, x: str) -> tuple[Point, ...]:
        points = sorted(points)
        for (xa, _), (xb, _) in zip(points, points[1:], strict=False):
            if xa == xb:
                raise self.fail(key, f"has two measurements at {x}={xa:g}")
        return tuple(points)

"""argparse types for the command lines' flags (afd-serve, afd-bench): a bad value is a usage
error naming the flag (exit 2), never a traceback, a run that cannot end (`--iters 0` waited
forever) or a server that starts and then hangs every request (`--max-num-seqs 0`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def port(text: str) -> int:
    value = non_negative_int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [1, 65535], got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma list of positive integers."""
    return [positive_int(part) for part in text.split(",")]


def non_empty(text: str) -> str:
    """A path or key that must be given if the flag is (`--api-key ''` turned authentication
    off, `--model ''` served the tiny model)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty string")
    return text


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def output_file(text: str) -> str:
    """A file to write at the end of a run: checked first, so a long run is not lost to a
    missing folder or a directory in its place."""
    path = Path(text)
    if path.is_dir() or not path.parent.is_dir():
        why = "is a directory" if path.is_dir() else f"folder {str(path.parent)!r} does not exist"
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {why}")
    return text


def choices_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma list, each one of `allowed`."""

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",")]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {', '.join(allowed)}, got {bad[0]!r}"
            )
        return values

    return parse

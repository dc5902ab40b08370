"""`afd-bench SUBCOMMAND ...`: benchmarks (not tests). Each subcommand lives in its own module."""

from __future__ import annotations

import importlib
import sys

# subcommand -> module exposing `main(argv: list[str]) -> int`
SUBCOMMANDS: dict[str, str] = {
    "transport": "afd.bench.transport",
    "scheduler": "afd.bench.scheduler",
    "serve": "afd.bench.serve",
    "kernels": "afd.bench.kernels",
    "layer": "afd.bench.layer",
    "e2e": "afd.bench.e2e",
    "sweep": "afd.bench.sweep",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        names = ", ".join(SUBCOMMANDS)
        print(f"usage: afd-bench {{{names}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`afd-bench SUBCOMMAND ...`: benchmarks (not tests). Each subcommand lives in its own module."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import textwrap

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
        lines = [f"usage: afd-bench {{{names}}} [options]  (afd-bench SUBCOMMAND -h: its flags)"]
        lines += [f"  {name:<10} {_summary(module)}" for name, module in SUBCOMMANDS.items()]
        print("\n".join(lines), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


def _summary(module: str) -> str:
    """The first sentence of a subcommand module's docstring, read without importing it (the
    GPU ones import torch and Triton)."""
    spec = importlib.util.find_spec(module)
    source = spec.loader.get_source(module) if spec and spec.loader else ""
    doc = ast.get_docstring(ast.parse(source or "")) or ""
    first = " ".join(doc.split("\n\n")[0].split())  # the first paragraph, on one line
    return textwrap.shorten(first.split(": ", 1)[-1].split(". ")[0], 88, placeholder=" ...")


if __name__ == "__main__":
    sys.exit(main())

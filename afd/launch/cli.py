"""`afd`: utility commands (`afd make-tiny-model DIR`)."""

from __future__ import annotations

import argparse
import sys
import time

from afd.models.tiny import make_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afd", description="afd utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny-model", help="write a small random Step3 checkpoint")
    tiny.add_argument("dir", help="output folder (HF layout)")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = make_tiny_model(args.dir, seed=args.seed)
    print(f"wrote a tiny random Step3 checkpoint to {path} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

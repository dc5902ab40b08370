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
    tiny.add_argument(
        "--fp8-block",
        type=_block,
        default=None,
        metavar="ROWS,COLS",
        help="write it as a block-FP8 checkpoint (e4m3 projections, a weight_scale_inv per "
        "block), the layout of Step3's published FP8 checkpoint (128,128); e.g. 32,32",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = make_tiny_model(args.dir, seed=args.seed, fp8_block=args.fp8_block)
    kind = "block-FP8" if args.fp8_block else "random"
    print(f"wrote a tiny {kind} Step3 checkpoint to {path} in {time.perf_counter() - start:.1f}s")
    return 0


def _block(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWS,COLS, e.g. 32,32; got {text!r}") from None
    if rows <= 0 or cols <= 0:
        raise argparse.ArgumentTypeError(f"block sizes must be positive, got {text!r}")
    return rows, cols


if __name__ == "__main__":
    sys.exit(main())

"""`afd-bench sweep`: on one host with K devices, a Step3-width model with few layers run
disaggregated at every A:F split of K (1+K-1 ... K-1+1) and colocated on all K (K replicas).
Per layout, the decode step of the real micro-batch pipeline is timed over a batch grid (per
attention rank or replica) and micro-batch counts; per TPOT budget (scaled to 61 layers) the
largest batch on the grid that meets it gives tokens/s/GPU = decode tokens per second / K.
Writes JSON and a PNG of tokens/s/GPU against the ratio, with the planner's prediction
(`afd-plan deploy --profile`'s search pinned to each split) on the same axes.
`--dry-run`: tiny shapes, fp32, K CPU processes over gloo (the whole flow, no GPU)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

from afd.arg_types import existing_file, output_file
from afd.bench.layer import step3_config, versions
from afd.bench.step_timing import scaled_step_ms
from afd.bench.sweep_ranks import RankGroup, RankSetup
from afd.models.tiny import TINY_DIMS

FULL_LAYERS = 61
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"  # the repository's
TINY = TINY_DIMS


def layouts(k: int) -> list[tuple[int, int]]:
    """(attention, FFN) ranks of every split of k devices, then (k, 0): colocated on all."""
    return [(a, k - a) for a in range(1, k)] + [(k, 0)]


def label(a: int, f: int) -> str:
    return f"{a}+{f}" if f else f"colocated x{a}"


def tokens_row(a: int, f: int, row: dict, layers: int) -> dict:
    """Decode throughput of a measured step if it were the whole 61-layer model's step: the
    measured step plus the missing layers at the steady per-layer time."""
    tpot_s = scaled_step_ms(row["step_ms"], row["layer_us"], layers, FULL_LAYERS) * 1e-3
    tps = a * row["batch"] / tpot_s
    return row | {
        "tpot_ms": 1e3 * tpot_s,
        "tokens_per_s": tps,
        "tokens_per_s_per_gpu": tps / (a + f),
    }


def best(rows: list[dict], tpot_ms: float) -> dict | None:
    """The measured point with the most tokens/s/GPU within the TPOT (None: none)."""
    fits = [r for r in rows if r["tpot_ms"] <= tpot_ms]
    return max(fits, key=lambda r: r["tokens_per_s_per_gpu"], default=None)


def measure(group: RankGroup, a: int, f: int, args: argparse.Namespace, layers: int) -> list[dict]:
    """For each m, batches in increasing order until the step misses the loosest budget (time
    grows with the batch, so larger ones cannot fit either)."""
    rows = []
    for m in args.micro_batches if f else [1]:
        for batch in args.batches:
            if batch < m:
                continue
            step_ms, steady_us = group.step_ms(batch, m)
            row = {"batch": batch, "m": m, "step_ms": step_ms, "layer_us": steady_us}
            rows.append(tokens_row(a, f, row, layers))
            print(
                f"  {label(a, f)}: B={batch} m={m} {steady_us:.0f} us/layer, "
                f"61 layers {rows[-1]['tpot_ms']:.0f} ms",
                flush=True,
            )
            if rows[-1]["tpot_ms"] > max(args.tpot):
                break
    return rows


def planner_layer_us(args: argparse.Namespace, a: int, f: int, batch: int, m: int) -> float | None:
    """The planner's per-layer time (every layer MoE, as the swept model's) for a measured point:
    `batch` sequences per attention rank (or replica) in m micro-batches. Set beside the
    measured layer time, this tests the planner's stage model at the same point, where the
    best-plan comparison can pick batches beyond the swept grid."""
    from afd.planner.hardware import PRESETS, match_device
    from afd.planner.models import load_model
    from afd.planner.profile import load_profile
    from afd.planner.search import layer_time
    from afd.planner.stages import Layout, StageModel

    profile = load_profile(args.profile)
    hw = match_device(profile.device, PRESETS)
    if hw is None:
        return None
    if f == 0:  # a colocated replica runs both stages back to back
        return profile.attention_us(batch, args.context) + profile.ffn_us(batch)
    model = StageModel(load_model("step3"), args.context, 2, None, profile, hw)
    st = model.stages(Layout(hw, a, 1, hw, f, 1), max(1, round(batch / m)), 400.0)
    return 1e6 * layer_time(st.ffn_moe, st, m)[0]


def predict(args: argparse.Namespace, a: int, f: int, tpot_ms: float) -> dict | None:
    """The planner's best plan with `a` attention and `f` FFN ranks (one device each) on the
    profiled hardware; colocated: the profile's attention(B) + FFN(B) per layer, B maximal.
    Time only, like the measurement (few layers): device memory is taken as unlimited, and
    `fits_61_layers` says whether the planner finds a plan with the real memory."""
    from dataclasses import replace

    from afd.planner.hardware import PRESETS, match_device
    from afd.planner.models import load_model
    from afd.planner.profile import load_profile
    from afd.planner.search import Limits, Planner, Space, rank
    from afd.planner.stages import StageModel

    profile = load_profile(args.profile)
    hw = match_device(profile.device, PRESETS)
    if hw is None:
        return None
    if f == 0:
        budget = tpot_ms * 1e3 / FULL_LAYERS
        layer = lambda b: profile.attention_us(b, args.context) + profile.ffn_us(b)  # noqa: E731
        if layer(1) > budget:
            return None
        lo, hi = 1, 16384
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if layer(mid) <= budget else (lo, mid - 1)
        tps = lo / (layer(lo) * 1e-6 * FULL_LAYERS)
        return {"batch": lo, "m": 1, "tokens_per_s_per_gpu": tps, "fits_61_layers": False}
    found = []
    for kind in (replace(hw, memory_bytes=1e18), hw):  # unlimited memory, then the real one
        model = StageModel(load_model("step3"), args.context, 2, None, profile, kind)
        space = Space(
            (kind,), (kind,), ((a, 1),), ((f, 1),), tuple(args.micro_batches), max_gpus=a + f
        )
        found.append(rank(Planner(model, Limits(tpot_ms * 1e-3)).search(space), "throughput"))
    if not found[0]:
        return None
    p = found[0][0]
    return {
        "batch": p.micro_batches * p.batch,
        "m": p.micro_batches,
        "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
        "binding": p.binding,
        "fits_61_layers": bool(found[1]),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    splits = result["splits"]
    xs = list(range(len(splits)))
    fig, ax = plt.subplots(figsize=(8, 5))
    missing = []
    for i, tpot in enumerate(result["tpot_ms"]):
        key = f"{tpot:g}"
        for what, style in (("measured", "-o"), ("predicted", "--s")):
            pts = [(x, s[what][key]) for x, s in zip(xs, splits, strict=True)]
            got = [(x, r["tokens_per_s_per_gpu"]) for x, r in pts if r]
            missing += [f"{what} {splits[x]['name']} @ {key} ms" for x, r in pts if not r]
            if got:
                ax.plot(*zip(*got, strict=True), style, color=f"C{i}", label=f"{what}, {key} ms")
    ax.set_xticks(xs, [s["name"] for s in splits])
    ax.set_xlabel("attention + FFN devices (A:F ratio rising), then colocated")
    ax.set_ylabel("decode tokens/s per GPU")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    note = "no batch fits: " + ", ".join(missing) if missing else "every layout fits"
    ax.set_title(result["title"], fontsize=9)
    fig.text(0.01, 0.01, note[:300], fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv: list[str]) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    floats = lambda s: [float(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(prog="afd-bench sweep", description=__doc__)
    p.add_argument("--gpus", type=int, default=None, help="K (default: all visible)")
    p.add_argument("--layers", type=int, default=2, help="model layers (all MoE)")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument(
        "--tpot-ms",
        dest="tpot",
        type=floats,
        default=[50.0],
        help="TPOT targets for 61 layers (comma list; 50 is always reported)",
    )
    p.add_argument("--batches", type=ints, default=[32, 64, 128, 256, 512, 1024, 2048])
    p.add_argument("--micro-batches", type=ints, default=[1, 2])
    p.add_argument(
        "--cuda-graph-max-batch",
        type=int,
        default=256,
        help="decode micro-batches up to this many rows per attention rank replay CUDA graphs, "
        "as afd-serve does (0: eager)",
    )
    p.add_argument("--profile", default=str(RESULTS / "profile_h200.json"), type=existing_file)
    p.add_argument("--out", default=str(RESULTS / "sweep.json"), type=output_file)
    p.add_argument("--plot", default=None, type=output_file, help="PNG (default: --out, .png)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU ranks over gloo")
    args = p.parse_args(argv)
    args.tpot = sorted({50.0, *args.tpot})
    args.batches = sorted(set(args.batches))
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    k = args.gpus or (torch.cuda.device_count() if cuda else 2)
    if k < 2 or (cuda and k > torch.cuda.device_count()):
        print(f"afd-bench sweep: needs 2..{torch.cuda.device_count()} devices", file=sys.stderr)
        return 2
    if not cuda and not args.dry_run:
        print("afd-bench sweep needs CUDA GPUs (or --dry-run)", file=sys.stderr)
        return 2
    shrink = TINY if args.dry_run else {}
    cfg = step3_config(num_layers=args.layers, **shrink)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    devices = [f"cuda:{i}" if cuda else "cpu" for i in range(k)]
    start, splits = time.time(), []
    for a, f in layouts(k):
        backend = "nccl" if cuda else "gloo"
        setup = RankSetup(
            cfg, args.context, max(args.batches), backend, dtype, a, f, args.cuda_graph_max_batch
        )
        print(f"{label(a, f)}: starting {k} ranks", flush=True)
        with RankGroup(setup, devices) as group:
            rows = measure(group, a, f, args, args.layers)
        entry = {
            "name": label(a, f),
            "mode": "disaggregated" if f else "colocated",
            "attn": a,
            "ffn": f,
            "ratio": str(Fraction(a, f)) if f else None,
            "measurements": rows,
            "measured": {},
            "predicted": {},
        }
        for row in rows if args.profile else ():
            row["planner_layer_us"] = planner_layer_us(args, a, f, row["batch"], row["m"])
        for tpot in args.tpot:
            entry["measured"][f"{tpot:g}"] = best(rows, tpot)
            entry["predicted"][f"{tpot:g}"] = predict(args, a, f, tpot) if args.profile else None
        splits.append(entry)
    kind = "dry run, tiny fp32 shapes on CPU" if args.dry_run else "Step3 width bf16"
    result = {
        "command": "afd-bench sweep " + shlex.join(argv),
        **versions(),
        "gpus": k,
        "dry_run": args.dry_run,
        "devices": devices,
        "model": {"layers": args.layers, **{n: getattr(cfg, n) for n in TINY}},
        "context": args.context,
        "tpot_ms": args.tpot,
        "layer_budget_us": {f"{t:g}": t * 1e3 / FULL_LAYERS for t in args.tpot},
        "batches": args.batches,
        "micro_batches": args.micro_batches,
        "profile": args.profile,
        "title": f"afd-bench sweep, K={k}, {kind}, {args.layers} layers, context "
        f"{args.context}\nmeasured vs planner (profile {args.profile}, memory not limited)",
        "splits": splits,
        "seconds": time.time() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
    return 0


def print_table(result: dict) -> None:
    for tpot in result["tpot_ms"]:
        key = f"{tpot:g}"
        print(f"TPOT {key} ms (61 layers): {result['layer_budget_us'][key]:.0f} us per layer")
        for s in result["splits"]:
            m, p = s["measured"][key], s["predicted"][key]
            got = f"{m['tokens_per_s_per_gpu']:.0f} (B={m['batch']}, m={m['m']})" if m else "none"
            pred = f"{p['tokens_per_s_per_gpu']:.0f}" if p else "none"
            print(f"  {s['name']:>14}: measured {got}, planner {pred} tok/s/GPU")
    for s in result["splits"]:  # the stage model itself, at the measured points
        errs = [
            r["planner_layer_us"] / r["layer_us"] - 1
            for r in s["measurements"]
            if r.get("planner_layer_us")
        ]
        if errs:
            mid = sorted(errs)[len(errs) // 2]
            print(f"  {s['name']:>14}: planner layer time vs measured, median {mid:+.0%}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

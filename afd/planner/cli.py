"""`afd-plan {cost,deploy,hardware}`: capacity planning for AFD deployments (PLANNER.md)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from afd.config import ConfigError, RoleShape
from afd.planner.cost import cost_table, token_cost
from afd.planner.hardware import PRESETS, Hardware, find_hardware, load_hardware_file, match_device
from afd.planner.models import PRESET_CONFIGS, ModelSpec, load_model
from afd.planner.profile import Profile, load_profile
from afd.planner.report import cost_json, cost_text, deploy_text, plan_json, plot_ratio
from afd.planner.search import Limits, Planner, Space, best_per_ratio, default_shapes, rank
from afd.planner.stages import Efficiency, StageModel


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse reports usage errors itself (exit 2)
        return int(e.code or 0)
    try:
        return int(args.run(args))
    except ConfigError as e:
        print(f"afd-plan: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `afd-plan ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run_cost(args: argparse.Namespace) -> int:
    spec, table = load_model(args.model), hardware_table(args)
    names = [n.strip() for n in args.hardware.split(",") if n.strip()]
    kinds = [find_hardware(n, table) for n in names] if names else list(table.values())
    tc = token_cost(spec, args.context, args.kv_bytes)
    costs = cost_table(tc, kinds)
    print(json.dumps(cost_json(tc, costs)) if args.json else cost_text(tc, costs))
    return 0


def run_deploy(args: argparse.Namespace) -> int:
    check_deploy_flags(args)
    spec, table = load_model(args.model), hardware_table(args)
    profile = load_profile(args.profile) if args.profile else None
    profile_hw = check_profile(profile, spec, table, args.profile_hw) if profile else None
    eff = Efficiency(args.attn_efficiency, args.ffn_efficiency)
    model = StageModel(spec, args.context, args.kv_bytes, eff, profile, profile_hw)
    planner = Planner(model, Limits(args.tpot_ms * 1e-3, args.mem_util))
    plans = planner.search(build_space(args, table, profile_hw))
    ranked = rank(plans, args.rank_by)[: args.top]
    title = deploy_title(args, spec, profile, profile_hw)
    if args.plot and plans:
        plot_ratio(best_per_ratio(plans, args.rank_by), args.plot, title)
    if args.json:
        settings = {
            "model": spec.name,
            "context": args.context,
            "tpot_ms": args.tpot_ms,
            "rank_by": args.rank_by,
            "profile": args.profile,
        }
        print(json.dumps({**settings, "plans": [plan_json(p) for p in ranked]}))
    else:
        print(deploy_text(title, ranked))
    return 0 if plans else 1  # 1: no plan meets the target; the output says so


def run_hardware(args: argparse.Namespace) -> int:
    for hw in hardware_table(args).values():
        fp8 = f"{hw.fp8_flops:.3g}" if hw.fp8_flops else "none"
        print(
            f"{hw.name:<6} ${hw.price_per_hour:.2f}/h  BF16 {hw.bf16_flops:.3g}  FP8 {fp8}  "
            f"{hw.mem_bandwidth / 1e12:.2f} TB/s  {hw.memory_bytes / 1e9:.0f} GB  {hw.source}"
        )
    return 0


def hardware_table(args: argparse.Namespace) -> dict[str, Hardware]:
    table = dict(PRESETS)
    if args.hardware_file:
        table.update(load_hardware_file(args.hardware_file))
    return table


def check_deploy_flags(args: argparse.Namespace) -> None:
    """Flags that would be ignored or that rule out every plan before the search."""
    if args.profile_hw and not args.profile:
        raise ConfigError("--profile-hw names the hardware of a --profile; none was given")
    if args.attn and args.ffn:
        total = (
            RoleShape.parse(args.attn, "--attn").num_ranks
            + RoleShape.parse(args.ffn, "--ffn").num_ranks
        )
        if total > args.max_gpus:
            raise ConfigError(
                f"--attn {args.attn} --ffn {args.ffn} is {total} GPUs, more than --max-gpus "
                f"{args.max_gpus}"
            )
    if args.plot:
        from matplotlib.backend_bases import FigureCanvasBase

        suffix = Path(args.plot).suffix.lstrip(".").lower()
        if suffix not in FigureCanvasBase.get_supported_filetypes():
            raise ConfigError(
                f"--plot {args.plot}: needs an image file suffix (.png, .svg, .pdf, ...)"
            )


def check_profile(
    profile: Profile, spec: ModelSpec, table: dict[str, Hardware], name: str | None
) -> Hardware:
    """The hardware the profile was measured on; its times only fit the model they measured."""
    if profile.hidden_size != spec.hidden_size:
        raise ConfigError(
            f"{profile.path}: key 'hidden_size' is {profile.hidden_size} but model "
            f"{spec.name} has hidden size {spec.hidden_size}"
        )
    family = spec.name.split(":")[0]
    # the preset a profile's model names ("step3-width (random weights)" is step3); only
    # presets can be told apart: a config path names a family, not a model
    known = [p for p in PRESET_CONFIGS if profile.model.lower().startswith(p)]
    measured = max(known, key=len) if known else profile.model.lower()
    if measured != family and {measured, family} <= set(PRESET_CONFIGS):
        raise ConfigError(
            f"{profile.path}: key 'model' is {profile.model!r} but the plan is for {family!r}"
        )
    hw = find_hardware(name, table) if name else match_device(profile.device, table)
    if hw is None:
        raise ConfigError(
            f"{profile.path}: key 'device' ({profile.device!r}) names no known hardware; "
            f"pass --profile-hw with one of {', '.join(table)}"
        )
    return hw


def build_space(
    args: argparse.Namespace, table: dict[str, Hardware], profile_hw: Hardware | None
) -> Space:
    def kinds(flag: str | None) -> tuple[Hardware, ...]:
        if flag:
            return tuple(find_hardware(n.strip(), table) for n in flag.split(","))
        return (profile_hw,) if profile_hw else tuple(table.values())

    def shapes(flag: str | None, name: str) -> tuple[tuple[int, int], ...]:
        if not flag:
            return default_shapes()
        shape = RoleShape.parse(flag, name)
        return ((shape.num_instances, shape.devices_per_instance),)

    return Space(
        attn_hw=kinds(args.attn_hw),
        ffn_hw=kinds(args.ffn_hw),
        attn_shapes=shapes(args.attn, "--attn"),
        ffn_shapes=shapes(args.ffn, "--ffn"),
        micro_batches=tuple(args.micro_batches),
        network_gbps=tuple(args.network_gbps),
        max_gpus=args.max_gpus,
    )


def deploy_title(
    args: argparse.Namespace, spec: ModelSpec, profile: Profile | None, hw: Hardware | None
) -> str:
    """The settings a plan table answers; a profile's times stand in only on its hardware
    (each plan's JSON says whether it was calibrated)."""
    mode, scope = "datasheet peaks", ""
    if profile is not None and hw is not None:
        mode = (
            f"stage times of {profile.path} ({profile.dtype} weights) on {hw.name}, "
            "datasheet peaks on other hardware"
        )
        scope = " and network (other hardware only)"
    return (
        f"{spec.name}, context {args.context}, TPOT <= {args.tpot_ms:g} ms, {mode}, "
        f"efficiency attention {args.attn_efficiency:g} / FFN {args.ffn_efficiency:g}{scope}"
    )


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a value in (0, 1], got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset name or HF checkpoint folder/config")
    p.add_argument("--context", required=True, type=_positive(int), help="context tokens")
    p.add_argument(
        "--kv-bytes",
        type=int,
        choices=(1, 2),
        default=1,
        help="bytes per KV element (1: afd-serve --kv-cache-dtype fp8, 2: bf16)",
    )
    p.add_argument("--hardware-file", help="YAML/JSON with extra or overriding hardware")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afd-plan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cost = sub.add_parser("cost", help="per-token cost of a model on each hardware")
    _common(cost)
    cost.add_argument("--hardware", default="", help="only these kinds (comma list; default: all)")
    cost.set_defaults(run=run_cost)
    hw = sub.add_parser("hardware", help="list hardware presets and their sources")
    hw.add_argument("--hardware-file")
    hw.set_defaults(run=run_hardware)
    deploy = sub.add_parser("deploy", help="search AFD deployments under a TPOT target")
    _common(deploy)
    _deploy_flags(deploy)
    deploy.set_defaults(run=run_deploy)
    return parser


def _deploy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tpot-ms", required=True, type=_positive(float), help="TPOT target")
    p.add_argument("--attn-hw", help="attention hardware (comma list; default: all)")
    p.add_argument("--ffn-hw", help="FFN hardware (comma list; default: all)")
    p.add_argument("--attn", help="pin the attention layout, NxG (instances x devices)")
    p.add_argument("--ffn", help="pin the FFN layout, NxG")
    p.add_argument(
        "--network-gbps",
        type=_positive(float),
        nargs="+",
        default=[400.0],
        help="per-device network bandwidth, Gbit/s (several: searched)",
    )
    p.add_argument("--micro-batches", type=_positive(int), nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--max-gpus", type=_positive(int), default=64)
    p.add_argument("--mem-util", type=_fraction, default=0.9, help="usable share of memory")
    p.add_argument("--attn-efficiency", type=_fraction, default=1.0)
    p.add_argument("--ffn-efficiency", type=_fraction, default=1.0)
    p.add_argument("--profile", help="measured stage times (JSON from afd-bench)")
    p.add_argument("--profile-hw", help="hardware the profile ran on (default: from 'device')")
    p.add_argument("--rank-by", choices=("cost", "throughput"), default="cost")
    p.add_argument("--top", type=_positive(int), default=5, help="plans to print")
    p.add_argument("--plot", help="write throughput and cost vs A:F ratio to this PNG")


if __name__ == "__main__":
    sys.exit(main())

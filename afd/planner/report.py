"""Planner output: terminal tables, JSON objects and the throughput/cost-vs-ratio plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from afd.config import ConfigError
from afd.planner.cost import RoleCost, TokenCost, best_afd, best_colocated
from afd.planner.search import Plan

GB = 1e9


def cost_json(tc: TokenCost, costs: list[RoleCost]) -> dict[str, Any]:
    colocated = best_colocated(costs)
    attn, ffn = best_afd(costs)
    return {
        "model": tc.model,
        "context": tc.context,
        "kv_bytes": tc.kv_bytes,
        "attn_flops": tc.attn_flops,
        "linear_flops": tc.linear_flops,
        "ffn_flops": tc.ffn_flops,
        "cost_per_mtok": {c.hardware: {"attention": c.attention, "ffn": c.ffn} for c in costs},
        "best_colocated": {"hardware": colocated.hardware, "total": colocated.total},
        "best_afd": {
            "attention_hw": attn.hardware,
            "ffn_hw": ffn.hardware,
            "total": attn.attention + ffn.ffn,
        },
    }


def cost_text(tc: TokenCost, costs: list[RoleCost]) -> str:
    colocated = best_colocated(costs)
    attn, ffn = best_afd(costs)
    lines = [
        f"model {tc.model}, context {tc.context}: per generated token, all layers",
        f"  KV bytes {tc.kv_bytes:.4g}   attention FLOPs {tc.attn_flops:.4g}   "
        f"linear FLOPs {tc.linear_flops:.4g}   FFN FLOPs {tc.ffn_flops:.4g}",
        "",
        f"{'USD per 1M output tokens':<26}{'attention':>10}{'FFN':>10}{'total':>10}",
    ]
    lines += [
        f"  {c.hardware:<24}{c.attention:>10.4f}{c.ffn:>10.4f}{c.total:>10.4f}" for c in costs
    ]
    lines += [
        "",
        f"best colocated: {colocated.hardware}  ${colocated.total:.4f} per 1M tokens",
        f"best AFD: attention on {attn.hardware}, FFN on {ffn.hardware}  "
        f"${attn.attention + ffn.ffn:.4f} per 1M tokens",
    ]
    return "\n".join(lines)


def plan_json(p: Plan) -> dict[str, Any]:
    lay, st = p.layout, p.stages
    return {
        "attention_hw": lay.attn_hw.name,
        "attention_instances": lay.num_attn_instances,
        "attention_instance_size": lay.attn_instance_size,
        "ffn_hw": lay.ffn_hw.name,
        "ffn_instances": lay.num_ffn_instances,
        "ffn_instance_size": lay.ffn_instance_size,
        "num_gpus": lay.num_gpus,
        "attn_ffn_ratio": f"{p.ratio.numerator}:{p.ratio.denominator}",
        "micro_batches": p.micro_batches,
        "batch_per_micro_batch": p.batch,
        "sequences_per_attention_rank": p.batch * p.micro_batches,
        "network_gbps": p.network_gbps,
        "tokens_per_s": p.tokens_per_s,
        "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
        "tpot_ms": p.tpot_s * 1e3,
        "attention_mem_gb": p.attn_mem_bytes / GB,
        "ffn_mem_gb": p.ffn_mem_bytes / GB,
        "cost_per_mtok": p.cost_per_mtok,
        "binding": p.binding,
        "calibrated": p.calibrated,
        "stage_us": {
            "attention": st.attention * 1e6,
            "ffn_moe": st.ffn_moe * 1e6,
            "ffn_dense": st.ffn_dense * 1e6,
            "a2f": st.a2f * 1e6,
            "f2a": st.f2a * 1e6,
        },
    }


_HEADER = (
    f"{'attention':<12}{'FFN':<12}{'A:F':>6}{'m':>3}{'batch':>7}{'tok/s/GPU':>11}"
    f"{'TPOT ms':>9}{'attn GB':>9}{'FFN GB':>8}{'$/1M':>9}  {'stage us A/F/link':<19}binding"
)


def plan_row(p: Plan) -> str:
    lay, st = p.layout, p.stages
    attn = f"{lay.attn_hw.name} {lay.num_attn_instances}x{lay.attn_instance_size}"
    ffn = f"{lay.ffn_hw.name} {lay.num_ffn_instances}x{lay.ffn_instance_size}"
    ratio = f"{p.ratio.numerator}:{p.ratio.denominator}"
    stages = f"{st.attention * 1e6:.0f}/{st.ffn_moe * 1e6:.0f}/{(st.a2f + st.f2a) * 1e6:.0f}"
    return (
        f"{attn:<12}{ffn:<12}{ratio:>6}{p.micro_batches:>3}{p.batch:>7}"
        f"{p.tokens_per_s_per_gpu:>11.0f}{p.tpot_s * 1e3:>9.1f}{p.attn_mem_bytes / GB:>9.1f}"
        f"{p.ffn_mem_bytes / GB:>8.1f}{p.cost_per_mtok:>9.4f}  {stages:<19}{p.binding}"
    )


def deploy_text(title: str, plans: list[Plan]) -> str:
    if not plans:
        return f"{title}\nno plan meets the TPOT target within the memory limits"
    note = "batch = sequences per attention rank per micro-batch; A:F = device ratio"
    return "\n".join([title, note, "", _HEADER, *(plan_row(p) for p in plans)])


def plot_ratio(plans: list[Plan], path: str | Path, title: str) -> None:
    """Throughput per GPU and cost per 1M tokens of the best plan at each A:F ratio."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    # Ratios beyond 8:1 either way waste one role; showing them squashes the useful range.
    plans = [p for p in plans if 1 / 8 <= p.ratio <= 8] or plans
    x = [float(p.ratio) for p in plans]
    fig, left = plt.subplots(figsize=(8, 4.5), dpi=100)
    left.plot(x, [p.tokens_per_s_per_gpu for p in plans], "o", color="tab:blue", ms=4)
    left.set_xscale("log", base=2)
    left.set_xlabel("attention : FFN devices")
    left.set_ylabel("tokens/s per GPU", color="tab:blue")
    right = left.twinx()
    right.plot(x, [p.cost_per_mtok for p in plans], "s", color="tab:red", ms=3, alpha=0.7)
    right.set_yscale("log")
    right.set_ylabel("USD per 1M output tokens", color="tab:red")
    left.set_title(title, fontsize=9)
    left.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the plot ({e.strerror or e})") from e
    except ValueError as e:  # matplotlib: a suffix it has no writer for
        raise ConfigError(f"--plot {path}: {e}") from e
    finally:
        plt.close(fig)

"""`afd-bench layer`: one Step3-width layer's two stage times on one GPU, as the runner executes
them (graph replay, as afd serves decodes, and eager; medians): the attention rank's stage
(attention block + router, decode, batch B at context C) and the FFN rank's (MoE for T tokens).
Writes a table, a JSON of everything and two profiles for `afd-plan deploy --profile`: the
16-bit stages, and the same with `--quantization fp8 --fp8-attention` (dtype "fp8")."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from afd.config import ModelConfig
from afd.models import layers
from afd.models.layers import Rope
from afd.models.step3 import AttnLayer, FFNLayer, FFNShard, fuse_attention_projections
from afd.models.tiny import TINY_TEXT_CONFIG
from afd.planner.models import PRESET_CONFIGS
from afd.quantization import quantize_fp8_blocks
from attn_worker.attention import BatchAttention, SeqView
from attn_worker.kv_cache import KVCache

# Step3's widths from the planner's preset (one source); layer count, MoE layout and vocab
# are the caller's, since benches run few layers with a small vocabulary
_LAYOUT = ("num_hidden_layers", "moe_layers_enum", "vocab_size")
STEP3_WIDTH: dict[str, object] = {
    k: v for k, v in PRESET_CONFIGS["step3"]["text_config"].items() if k not in _LAYOUT
} | {"torch_dtype": "bfloat16"}


def step3_config(num_layers: int = 1, moe_layers: str | None = None, **overrides) -> ModelConfig:
    """A Step3-width config (every layer MoE unless told); `overrides` shrink it for CPU."""
    raw = {**TINY_TEXT_CONFIG, **STEP3_WIDTH, "vocab_size": 512, **overrides}
    raw["num_hidden_layers"] = num_layers
    raw["moe_layers_enum"] = moe_layers or ",".join(map(str, range(num_layers)))
    return ModelConfig.from_dict({"text_config": raw})


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Fills every parameter like afd.models.tiny.random_weights (norms near 1, weights
    ~1/sqrt(fan_in), a peaked router), but on the module's device: 10 GB per layer is quick."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                scale = 3.0 if name.endswith("moe.gate.weight") else 1.0
                p.copy_(noise * (scale / math.sqrt(p.shape[-1])))
    return module


def build(make: Callable[[], nn.Module], dtype: torch.dtype, device: str, seed: int) -> nn.Module:
    """Builds on the meta device (no host copy of the weights), then allocates on `device`."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            module = make()
    finally:
        torch.set_default_dtype(default)
    # q/k/v as one GEMM, as load_attention_side leaves a loaded model
    return fuse_attention_projections(randomise(module.to_empty(device=device), seed)).eval()


def decode_batch(
    cfg: ModelConfig, batch: int, context: int, layers: int, dtype: torch.dtype, device: str
) -> tuple[BatchAttention, torch.Tensor]:
    """A decode micro-batch of `batch` sequences at `context` tokens over a random paged KV
    cache (shuffled blocks); returns its attention and positions [B]."""
    bs = 16
    per_seq = -(-context // bs)
    cache = KVCache(layers, batch * per_seq, bs, cfg.head_dim, dtype, device)
    cache.k.normal_()
    cache.v.normal_()
    tables = torch.randperm(batch * per_seq, device=device).view(batch, per_seq)  # [B, nb]
    pos = context - 1
    slots = tables[:, pos // bs] * bs + pos % bs  # [B]
    views = [SeqView(i, 1, context, tables[i]) for i in range(batch)]
    attn = BatchAttention(cache, views, slots, cfg.head_dim**-0.5)
    return attn, torch.full((batch,), pos, dtype=torch.long, device=device)


def time_us(fn: Callable[[], object], graph: bool) -> float:
    """Median µs. Eager is what the runner does today; graph replay shows the launch cost."""
    if not torch.cuda.is_available():  # CPU smoke runs: wall clock, no graphs
        return float("nan") if graph else 1e6 * _wall_median(fn)
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        try:
            return 1e3 * float(do_bench_cudagraph(fn, rep=100, return_mode="median"))
        except Exception:  # noqa: BLE001
            return float("nan")  # capture failed (a host sync on the path); eager stands
    return 1e3 * float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _wall_median(fn: Callable[[], object], reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


@torch.inference_mode()
def attention_stage(
    layer: AttnLayer,
    cfg: ModelConfig,
    batch: int,
    context: int,
    dtype: torch.dtype,
    graph: bool = True,
    unfused: bool = True,
) -> dict[str, float]:
    """The stage's times as serving runs it, and (`unfused`) with every fusion off."""
    device = str(next(layer.parameters()).device)
    attn, positions = decode_batch(cfg, batch, context, 1, dtype, device)
    cos, sin = Rope(cfg.head_dim, cfg.rope_theta).cos_sin(positions)
    h = torch.randn(batch, cfg.hidden_size, dtype=dtype, device=device)  # [B, H]
    fn = lambda: layer(h, cos, sin, attn.at(0))  # noqa: E731
    kv_bytes = 2 * batch * context * cfg.head_dim * h.element_size()
    row = {"batch": batch, "context": context, "kv_bytes": kv_bytes}
    fused, qkv = layers.FUSED_KERNELS, layer.self_attn.qkv_weight
    try:  # unfused first (norms, RoPE and router top-k by torch ops, q/k/v as three GEMMs),
        # then as serving runs it
        for prefix, on in (("unfused_", False), ("", True))[0 if unfused else 1 :]:
            layers.FUSED_KERNELS = fused and on
            layer.self_attn.qkv_weight = qkv if on else None
            row[f"{prefix}graph_us"] = time_us(fn, True) if graph else float("nan")
            row[f"{prefix}eager_us"] = time_us(fn, False)
    finally:
        layers.FUSED_KERNELS, layer.self_attn.qkv_weight = fused, qkv
    return row


def quantize_attention_blocks(layer: AttnLayer, block: tuple[int, int] = (128, 128)) -> None:
    """The attention projections in e4m3 with a scale per 128 x 128 block, as Step3's FP8
    checkpoint stores them and --fp8-attention serves them (q/k/v still one GEMM)."""
    attn, stored = layer.self_attn, {}
    with torch.no_grad():
        for name in attn.PROJECTIONS:
            proj = getattr(attn, name)
            proj.weight.data, stored[name] = quantize_fp8_blocks(proj.weight.detach(), block)
    attn.quantize_projections_fp8(stored)


def routing(cfg: ModelConfig, tokens: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(3 * torch.randn(tokens, cfg.moe_num_experts, device=device), -1)
    weights, ids = torch.topk(probs, cfg.moe_top_k, dim=-1)  # [T, k]
    return ids.to(torch.int32), weights


@torch.inference_mode()
def ffn_stage(
    layer: FFNLayer, cfg: ModelConfig, tokens: int, dtype: torch.dtype, graph: bool = True
) -> dict:
    device = str(next(layer.parameters()).device)
    x = torch.randn(tokens, cfg.hidden_size, dtype=dtype, device=device)  # [T, H]
    ids, weights = routing(cfg, tokens, device)
    fn = lambda: layer(x, ids, weights.to(dtype))  # noqa: E731
    graph_us = time_us(fn, True) if graph else float("nan")
    return {"tokens": tokens, "eager_us": time_us(fn, False), "graph_us": graph_us}


def versions() -> dict[str, str]:
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__}


def served_us(row: dict, prefix: str = "") -> float:
    """A stage as afd serves decode steps: its CUDA-graph replay (attention blocks and FFN
    layers replay graphs up to --cuda-graph-max-batch; past it they run eagerly, which at
    those sizes is within 2 % of replay: H200, B=512 886 / 884 µs, T=4096 7276 / 7377), or
    eager where capture failed. `prefix` "fp8_" reads the e4m3 columns."""
    graph = row.get(f"{prefix}graph_us", float("nan"))
    return row[f"{prefix}eager_us"] if math.isnan(graph) else graph


def write_profile(
    path: Path, env: dict, attn: list[dict], ffn: list[dict], rt: list[dict], fp8: bool = False
) -> None:
    """The afd/planner/profile.py schema, with the stage times afd serves decodes at (graph
    replay). Eager times, which the first profiles held, overstate small attention batches,
    where the host's launches are slower than the GPU (H200, B=32: 1132 µs against 320).
    `fp8`: the e4m3 columns (`--quantization fp8 --fp8-attention`), dtype "fp8", so that the
    planner sizes memory for the weights these times were measured with."""
    prefix = "fp8_" if fp8 else ""
    profile = {
        "device": env["device"],
        "model": "step3-width (random weights)",
        "hidden_size": STEP3_WIDTH["hidden_size"],
        "dtype": "fp8" if fp8 else "bfloat16",
        "stage_times": "CUDA-graph replay (eager where capture failed)",
        "attention": [
            {"batch": r["batch"], "context": r["context"], "us_per_layer": served_us(r, prefix)}
            for r in attn
        ],
        "ffn": [{"tokens": r["tokens"], "us_per_layer": served_us(r, prefix)} for r in ffn],
        "transfer": [{"tokens": r["tokens"], "us_round_trip": r["transport_us"]} for r in rt],
    }
    path.write_text(json.dumps(profile, indent=2))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="afd-bench layer", description=__doc__)
    p.add_argument("--batches", default="32,64,128,256,512")
    p.add_argument("--contexts", default="4096,8192")
    p.add_argument("--tokens", default="32,64,128,256,512,1024,2048,4096")
    p.add_argument("--out", default="bench/results/layer_h200.json")
    p.add_argument("--profile", default="bench/results/profile_h200.json")
    p.add_argument(
        "--profile-fp8",
        default="bench/results/profile_fp8_h200.json",
        help="the same profile from the e4m3 columns (experts and attention projections)",
    )
    p.add_argument("--no-transfer", action="store_true", help="skip the 2-GPU round trip")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print("afd-bench layer needs a CUDA GPU", file=sys.stderr)
        return 2
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    cfg, dtype, start = step3_config(), torch.bfloat16, time.time()
    attn_layer = build(lambda: AttnLayer(cfg, 0), dtype, "cuda:0", 1)
    attn = [
        attention_stage(attn_layer, cfg, b, c, dtype)
        for c in ints(args.contexts)
        for b in ints(args.batches)
    ]
    quantize_attention_blocks(attn_layer)  # a block-FP8 checkpoint's, with --fp8-attention
    for row in attn:
        fp8 = attention_stage(attn_layer, cfg, row["batch"], row["context"], dtype, unfused=False)
        row["fp8_eager_us"], row["fp8_graph_us"] = fp8["eager_us"], fp8["graph_us"]
    del attn_layer
    ffn_layer = build(lambda: FFNLayer(cfg, 0, FFNShard()), dtype, "cuda:0", 2)
    ffn = [ffn_stage(ffn_layer, cfg, t, dtype) for t in ints(args.tokens)]
    ffn_layer.quantize_experts_fp8()  # --quantization fp8: the same layer, quantized
    for row in ffn:
        fp8 = ffn_stage(ffn_layer, cfg, row["tokens"], dtype)
        row["fp8_eager_us"], row["fp8_graph_us"] = fp8["eager_us"], fp8["graph_us"]
    del ffn_layer
    torch.cuda.empty_cache()
    rt: list[dict] = []
    if not args.no_transfer and torch.cuda.device_count() >= 2:
        from afd.bench.roundtrip import measure_round_trips

        rt = measure_round_trips(ints(args.tokens), cfg.hidden_size, cfg.moe_top_k)
    env = versions()
    print_tables(attn, ffn, rt)
    result = {**env, "seconds": time.time() - start, "attention": attn, "ffn": ffn}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result | {"transfer": rt}, indent=2))
    if rt:
        write_profile(Path(args.profile), env, attn, ffn, rt)
        write_profile(Path(args.profile_fp8), env, attn, ffn, rt, fp8=True)
    return 0


def print_tables(attn: list[dict], ffn: list[dict], rt: list[dict]) -> None:
    print("attention stage (attention block + router, decode); unfused: norms, RoPE and the")
    print("router's top-k by torch ops, q/k/v projections as three GEMMs; fp8: projections in")
    print("e4m3 with 128x128 block scales (a block-FP8 checkpoint with --fp8-attention)")
    heads = ("B", 5), ("C", 6), ("eager µs", 9), ("graph µs", 9), ("unfused eager", 13)
    heads += ("unfused graph", 13), ("fp8 graph", 9)
    print(" ".join(f"{name:>{width}}" for name, width in heads))
    for r in attn:
        print(
            f"{r['batch']:>5} {r['context']:>6} {r['eager_us']:>9.1f} {r['graph_us']:>9.1f}"
            f" {r['unfused_eager_us']:>13.1f} {r['unfused_graph_us']:>13.1f}"
            f" {r.get('fp8_graph_us', float('nan')):>9.1f}"
        )
    print("FFN stage (MoE layer: 48 experts top-3 + shared expert); fp8: --quantization fp8")
    print(f"{'T':>5} {'eager µs':>9} {'graph µs':>9} {'fp8 graph µs':>12}")
    for r in ffn:
        fp8 = r.get("fp8_graph_us", float("nan"))
        print(f"{r['tokens']:>5} {r['eager_us']:>9.1f} {r['graph_us']:>9.1f} {fp8:>12.1f}")
    if rt:
        print("A->F->A round trip over NCCL (x, ids, weights there; x back)")
        print(f"{'T':>5} {'transport µs':>12} {'raw µs':>8}")
        for r in rt:
            print(f"{r['tokens']:>5} {r['transport_us']:>12.1f} {r['raw_us']:>8.1f}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

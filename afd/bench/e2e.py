"""`afd-bench e2e`: a Step3-width model with few layers on two GPUs. (1) Correctness: bf16
greedy generation, disaggregated (1 attention + 1 FFN rank over NCCL) against colocated, from
a random Step3-shaped checkpoint. (2) Per-layer decode step time of the real micro-batch
pipeline (AttnRunner + RemoteFFN -> FFNServer over NCCL) for m = 1..4 against its slowest
stage, and colocated (same kernels, one GPU); (3) decode tokens/s/GPU at TPOT budgets scaled
to 61 layers."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from afd.bench.e2e_pipeline import PipelineBench
from afd.bench.layer import STEP3_WIDTH, build, step3_config, versions
from afd.models.step3 import AttentionSide, FFNShard, FFNSide

FULL_LAYERS = 61


def write_checkpoint(out: Path, layers: int, moe_layers: str) -> Path:
    """A Step3-width random checkpoint, weights drawn on the GPU (minutes faster than tiny's
    CPU generator at 6 B parameters), in the HF layout make_tiny_model writes."""
    import afd.models.tiny as tiny

    def gpu_weights(cfg, seed: int) -> dict[str, torch.Tensor]:
        weights = {}
        attn = build(lambda: AttentionSide(cfg), torch.bfloat16, "cuda:0", seed)
        weights |= {k: v.cpu() for k, v in attn.named_parameters()}
        del attn
        ffn = build(lambda: FFNSide(cfg, FFNShard()), torch.bfloat16, "cuda:0", seed + 1)
        params = dict(ffn.named_parameters())
        weights |= {spec.key: params[n].cpu() for n, spec in ffn.param_specs().items()}
        del ffn, params
        torch.cuda.empty_cache()
        return weights

    text = {k: v for k, v in STEP3_WIDTH.items()}
    text |= {"num_hidden_layers": layers, "moe_layers_enum": moe_layers}
    saved, tiny.random_weights = tiny.random_weights, gpu_weights
    try:
        return tiny.make_tiny_model(out, seed=0, with_tokenizer=False, vocab_size=512, **text)
    finally:
        tiny.random_weights = saved


def generate(model: Path, prompts: list[list[int]], steps: int, **kwargs) -> list[dict]:
    """Greedy tokens and their logprobs from LLM(model, **kwargs)."""
    from afd.llm import LLM
    from afd.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, logprobs=1)
    llm = LLM(str(model), dtype="bfloat16", device="cuda", num_kv_blocks=256, **kwargs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    finally:
        llm.shutdown()
    rows = []
    for o in outs:
        c = o.outputs[0]
        lps = [lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids, strict=False)]
        rows.append({"tokens": list(c.token_ids), "logprobs": lps})
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def correctness(workdir: Path, steps: int, fp8: bool = False) -> dict:
    start = time.time()
    quant = {"quantization": "fp8", "fp8_attention": True} if fp8 else {}
    model = write_checkpoint(workdir / "step3w", layers=2, moe_layers="1")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 511, (n,), generator=g).tolist() for n in (7, 19, 33, 64)]
    # the reference is colocated and eager; the others replay CUDA graphs (afd's default)
    colo = generate(model, prompts, steps, colocated=True, cuda_graph_max_batch=0, **quant)
    runs = {
        "colocated_graphs": generate(model, prompts, steps, colocated=True, **quant),
        "disaggregated": generate(
            model, prompts, steps, colocated=False, transport="nccl", **quant
        ),
    }
    weights = "e4m3 experts and projections" if fp8 else "bf16"
    result: dict = {"model": f"step3-width, 2 layers (0 dense, 1 MoE), random {weights}"}
    result |= {"steps": steps, "colocated_eager": colo} | runs
    for name, rows in runs.items():
        same = [a["tokens"] == b["tokens"] for a, b in zip(colo, rows, strict=True)]
        diffs = [
            abs(x - y)
            for a, b in zip(colo, rows, strict=True)
            for x, y, s, t in zip(
                a["logprobs"], b["logprobs"], a["tokens"], b["tokens"], strict=False
            )
            if s == t and x is not None and y is not None
        ]
        result[f"{name}_same_tokens"] = same
        result[f"{name}_max_logprob_diff"] = max(diffs, default=None)
    result["all_same"] = all(all(result[f"{n}_same_tokens"]) for n in runs)
    return result | {"seconds": time.time() - start}


def budget_table(colo: list[dict], disagg: list[dict], tpots_ms: list[float]) -> list[dict]:
    """For each TPOT, the measured batch with the most tokens/s/GPU whose step scaled to 61
    layers (the measured step plus the missing layers at the steady per-layer time) fits."""
    rows = []
    for tpot in tpots_ms:
        row: dict = {"tpot_ms": tpot, "layer_budget_us": 1e3 * tpot / FULL_LAYERS}
        for mode, runs, gpus in (("colocated", colo, 1), ("disaggregated", disagg, 2)):
            fits = [r for r in runs if r["step_ms_61"] <= tpot]
            best = max(fits, key=lambda r: r["batch"] / r["step_ms_61"], default=None)
            row[mode] = None
            if best is not None:
                tps = best["batch"] / (best["step_ms_61"] * 1e-3) / gpus
                row[mode] = {"batch": best["batch"], "m": best["m"], "tokens_s_gpu": tps}
                row[mode]["graphs"] = best.get("graphs", False)
        rows.append(row)
    return rows


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="afd-bench e2e", description=__doc__)
    p.add_argument("--batches", default="256,1024,3072")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4, help="layers of the timed model")
    p.add_argument("--steps", type=int, default=8, help="greedy tokens compared")
    p.add_argument("--tpots-ms", default="50,100,200,400,800")
    p.add_argument("--workdir", default="/tmp/afd-e2e")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--skip-timing", action="store_true", help="only the correctness runs")
    p.add_argument(
        "--fp8",
        action="store_true",
        help="weights as --quantization fp8 --fp8-attention serves them (e4m3 experts and "
        "attention projections, a scale per output channel)",
    )
    p.add_argument("--out", default="bench/results/e2e_h200x2.json")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if torch.cuda.device_count() < 2:
        print("afd-bench e2e needs two CUDA GPUs", file=sys.stderr)
        return 2
    result: dict = versions() | {"fp8": args.fp8}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_correctness:
        try:
            result["correctness"] = correctness(Path(args.workdir), args.steps, args.fp8)
        except Exception as e:  # keep the timing part: it does not need the engine
            result["correctness"] = {"error": f"{type(e).__name__}: {e}"}
        out.write_text(json.dumps(result, indent=2))
        shown = {k: v for k, v in result["correctness"].items() if not isinstance(v, list)}
        print(
            "correctness:", shown, {k: v for k, v in result["correctness"].items() if "same" in k}
        )
    if args.skip_timing:
        return 0 if result.get("correctness", {}).get("all_same") else 1
    cfg = step3_config(num_layers=args.layers)
    batches = [int(b) for b in args.batches.split(",")]
    with PipelineBench(cfg, max(batches), args.context, fp8=args.fp8) as bench:
        # NCCL pipeline vs colocated, one step, eager and with graphs
        result["pipeline_rel_diff"] = {"batch": min(batches), "m": 3}
        result["pipeline_rel_diff"]["eager"] = bench.rel_diff(min(batches), 3)
        result["pipeline_rel_diff"]["graphs"] = bench.rel_diff(min(batches), 3, graphs=True)
        modes = (False, True)  # eager, CUDA graphs
        colo = [bench.colocated(b, g) for g in modes for b in batches]
        disagg = [
            bench.disaggregated(b, m, g) for g in modes for b in batches for m in (1, 2, 3, 4)
        ]
    tpots = [float(t) for t in args.tpots_ms.split(",")]
    result |= {"context": args.context, "layers": args.layers, "colocated": colo}
    result |= {"disaggregated": disagg, "budgets": budget_table(colo, disagg, tpots)}
    out.write_text(json.dumps(result, indent=2))
    print_tables(result)
    return 0


def print_tables(r: dict) -> None:
    weights = "e4m3 experts and projections" if r.get("fp8") else "bf16"
    print(f"per-layer decode step, Step3 width ({weights}), context {r['context']}, "
          f"{r['layers']} layers")  # fmt: skip
    print("layer µs: steady state (fill/drain left out); step/L: the whole step over its layers")
    print("attn/ffn µs: each stage's busy time per layer in the same run (CUDA events)")
    head = ("mode", "graphs", "B", "m", "layer µs", "step/L", "attn µs", "ffn µs", "vs bound")
    print("{:>8} {:>6} {:>5} {:>2} {:>9} {:>7} {:>8} {:>8} {:>8}".format(*head))
    for x in r["colocated"] + r["disaggregated"]:
        mode = "colo" if x in r["colocated"] else "disagg"
        graphs = "yes" if x.get("graphs") else "no"
        print(
            f"{mode:>8} {graphs:>6} {x['batch']:>5} {x['m']:>2} {x['layer_us']:>9.0f} "
            f"{x['step_layer_us']:>7.0f} "
            f"{x['attn_busy_us']:>8.0f} {x['ffn_busy_us']:>8.0f} {x['vs_bound']:>8.2f}"
        )
    print("tokens/s/GPU at TPOT budgets (61 layers)")
    for b in r["budgets"]:
        print(f"  {b['tpot_ms']:>5.0f} ms: colocated {b['colocated']}, disagg {b['disaggregated']}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

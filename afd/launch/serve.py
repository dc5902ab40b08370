"""`afd-serve`: the OpenAI-compatible server in front of a coordinator process that runs the
model colocated or disaggregated (--attn NxG --ffn MxG). With no --model it serves a built-in
tiny random Step3, made on first use, on the CPU."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path

from afd import envs
from afd.arg_types import non_empty, positive_float, positive_int
from afd.config import ConfigError, ModelConfig
from afd.engine.builder import EngineSettings, parse_roles
from afd.engine.metrics import EngineMetrics
from afd.launch.launch_options import (
    add_launch_args,
    launch_fields,
    placement_plan,
    reserve_port,
    serve_until_sigterm,
    stop_on_sigterm,
)
from afd.models.tiny import make_tiny_model
from afd.quantization import check_quantization
from afd.server.api_server import add_server_args, build_app, settings_from_args
from afd.server.chat_template import ChatTemplateError, compile_template
from afd.server.coordinator_client import CoordinatorClient, EngineStartError
from afd.tokenizer import Tokenizer
from attn_worker.kv_cache import check_kv_cache_dtype


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model", type=non_empty, default=None, help="HF checkpoint folder (default: tiny Step3)"
    )
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--attn", default="1x1", help="attention instances x devices each")
    g.add_argument("--ffn", default="1x1", help="FFN instances x devices each")
    g.add_argument("--colocated", action="store_true", help="one process, no disaggregation")
    g.add_argument("--micro-batches", type=int, default=None, help="default 3 (1 colocated)")
    g.add_argument("--transport", default="zmq", choices=["zmq", "nccl"])
    g.add_argument("--max-model-len", type=positive_int, default=None)
    g.add_argument("--max-num-seqs", type=positive_int, default=256, help="per attention rank")
    g.add_argument(
        "--max-num-batched-tokens", type=positive_int, default=2048, help="per rank per step"
    )
    g.add_argument("--block-size", type=positive_int, default=16)
    g.add_argument("--num-kv-blocks", type=positive_int, default=None, help="per attention rank")
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="auto (the model's dtype) or fp8 (= fp8_e4m3: e4m3 with a scale per token vector)",
    )
    g.add_argument(
        "--quantization",
        default=None,
        help="fp8: the routed experts in e4m3 (half the FFN weight bytes), as a block-FP8 "
        "checkpoint stores them or quantized at load with a scale per output channel, and the "
        "activations to e4m3 per row (fp8 tensor cores). none: 16-bit experts (a block-FP8 "
        "checkpoint's dequantized at load). Default: as the checkpoint stores them",
    )
    g.add_argument(
        "--fp8-attention",
        action="store_true",
        help="the attention projections in e4m3 too (a block-FP8 checkpoint's as stored, else "
        "quantized at load with a scale per output channel): half their memory; faster up to "
        "~128 rows per micro-batch, slower from 256 on an H100 (README, fp8)",
    )
    g.add_argument(
        "--tpot-slo-ms", type=positive_float, default=50.0, help="time-per-output-token target"
    )
    g.add_argument(
        "--cuda-graph-max-batch",
        type=int,
        default=256,
        help="GPU: decode micro-batches up to this many sequences replay CUDA graphs",
    )
    g.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs")
    add_launch_args(parser)


def tiny_model_path() -> Path:
    path = Path(envs.CACHE_DIR) / "tiny-step3"
    if not (path / "model.safetensors.index.json").exists():
        print(f"afd-serve: no --model given; making the built-in tiny Step3 at {path}")
        make_tiny_model(path, seed=0)
    return path


def engine_settings(args: argparse.Namespace, model: str) -> EngineSettings:
    if args.colocated:  # these shape disaggregated ranks: with one process they did nothing
        given = [
            f"{flag} {value}"
            for flag, value, default in (
                ("--attn", args.attn, "1x1"),
                ("--ffn", args.ffn, "1x1"),
                ("--transport", args.transport, "zmq"),
            )
            if value != default
        ]
        if given:
            raise ConfigError(f"--colocated runs one process; drop {' and '.join(given)}")
    settings = EngineSettings(
        model=model,
        device=args.device,
        dtype=args.dtype,
        colocated=args.colocated,
        attn=args.attn,
        ffn=args.ffn,
        micro_batches=args.micro_batches,
        transport=args.transport,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_dtype=check_kv_cache_dtype(args.kv_cache_dtype),
        quantization=check_quantization(args.quantization),
        fp8_attention=args.fp8_attention,
        max_model_len=args.max_model_len,
        tpot_slo_ms=args.tpot_slo_ms,
        cuda_graph_max_batch=0 if args.enforce_eager else args.cuda_graph_max_batch,
        **launch_fields(args),
    )
    parse_roles(settings)
    settings.graph_max_batch()
    settings.num_micro_batches()
    ModelConfig.from_pretrained(model)
    return settings


async def run(args: argparse.Namespace) -> None:
    model = str(args.model or tiny_model_path())
    settings = engine_settings(args, model)
    if args.dry_run:
        print(placement_plan(settings), flush=True)
        return
    socks = reserve_port(args.host, args.port)
    stop_on_sigterm()
    tokenizer = Tokenizer.from_pretrained(model, chat_template=args.chat_template)
    try:  # a template that does not compile fails here, not as every chat request's 400
        compile_template(tokenizer.chat_template)
    except ChatTemplateError as e:
        where = "--chat-template" if args.chat_template else f"{model}'s chat template"
        raise ConfigError(f"{where}: {e}") from None
    names = args.served_model_name or ([model] if args.model else ["tiny-step3"])
    metrics = EngineMetrics()
    client = CoordinatorClient(settings, tokenizer, names[0], on_stats=metrics.update)
    start = time.monotonic()
    print(f"afd-serve: loading {model} ...", flush=True)
    try:
        await client.start()
        print(f"afd-serve: ready in {time.monotonic() - start:.1f}s: {client.layout}")
        print(
            f"afd-serve: OpenAI API at http://{args.host}:{args.port}/v1 (model {names[0]!r})",
            flush=True,
        )
        server = dataclasses.replace(settings_from_args(args), tpot_slo_ms=args.tpot_slo_ms)
        app = build_app(client, server)
        shutdown_s = settings.shutdown_timeout_s
        await serve_until_sigterm(app, socks, shutdown_s, client.abort_all)
    finally:
        for sock in socks:
            sock.close()
        await client.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afd-serve", description=__doc__)
    add_engine_args(parser)
    add_server_args(parser)
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"afd-serve: error: {e}", file=sys.stderr)
        return 2
    except EngineStartError as e:  # a rank's or the checkpoint's error, in one line
        print(f"afd-serve: error: the engine did not start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

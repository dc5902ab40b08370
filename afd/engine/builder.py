"""Builds an engine from user-facing settings: model config, tokenizer, executor, scheduler."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from afd.config import ConfigError, ModelConfig, RoleShape
from afd.engine.admission import AdmitAll, TPOTAdmission
from afd.engine.engine_core import EngineCore
from afd.engine.executor import ColocatedExecutor, Executor
from afd.engine.grammar import Grammars
from afd.engine.scheduler import Scheduler, SchedulerConfig
from afd.engine.step_time import StepTimeModel
from afd.models.build import load_attention_side, load_ffn_side, resolve_dtype
from afd.models.step3 import FFNShard
from afd.quantization import check_quantization
from attn_worker.decode_graphs import DecodeGraphs
from attn_worker.ffn_client import LocalFFN
from attn_worker.kv_cache import KVCache, check_kv_cache_dtype, kv_bytes_per_block
from attn_worker.model_runner import AttnRunner
from ffn_worker.graphs import FFNGraphs

CPU_KV_BYTES = 2 << 30  # default KV pool on CPU when num_kv_blocks is not given
GPU_MEMORY_UTILIZATION = 0.9
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    model: str
    device: str = "cpu"
    dtype: str = "auto"
    colocated: bool = True
    attn: str = "1x1"
    ffn: str = "1x1"
    micro_batches: int | None = None
    transport: str = "zmq"
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_dtype: str = "auto"  # "fp8": e4m3 with a scale per token vector (kv_cache.py)
    # "fp8": routed experts in e4m3; "none": 16-bit; None: as the checkpoint stores them
    quantization: str | None = None
    # attention projections in e4m3 (a block-FP8 checkpoint's as stored, else quantized at
    # load): faster up to ~128 rows per micro-batch, slower from 256 (bench/NOTES-kernels.md)
    fp8_attention: bool = False
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    tpot_slo_ms: float | None = None  # None: throughput first (offline); afd-serve: 50
    # on GPUs, decode micro-batches of up to this many sequences per attention rank replay
    # CUDA graphs (attention blocks, and FFN layers at the matching token counts); 0: eager
    cuda_graph_max_batch: int = 256
    # launching (afd/launch): "local" processes or "ray" actors, Ray cluster and placement
    launcher: str = "local"
    ray_address: str | None = None
    attn_resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources
    ffn_resources: dict[str, float] = field(default_factory=dict)  # per bundle (device)
    restart_on_failure: bool = False  # rebuild every rank after one fails (coordinator)
    shutdown_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may finish

    def graph_max_batch(self) -> int:
        """The CUDA-graph size limit that applies (0 off a GPU)."""
        if self.cuda_graph_max_batch < 0:
            raise ConfigError(
                f"--cuda-graph-max-batch must be >= 0, got {self.cuda_graph_max_batch}"
            )
        return self.cuda_graph_max_batch if self.device.startswith("cuda") else 0

    def num_micro_batches(self) -> int:
        if self.micro_batches is not None:
            if self.micro_batches < 1:
                raise ConfigError(f"--micro-batches must be at least 1, got {self.micro_batches}")
            return self.micro_batches
        return 1 if self.colocated else 3


def model_len(settings: EngineSettings, cfg: ModelConfig) -> int:
    if settings.max_model_len is None:
        return cfg.max_position_embeddings
    if not 0 < settings.max_model_len <= cfg.max_position_embeddings:
        raise ConfigError(
            f"--max-model-len {settings.max_model_len} must be in "
            f"1..{cfg.max_position_embeddings} (the model's max_position_embedding)"
        )
    return settings.max_model_len


def default_num_blocks(
    settings: EngineSettings, cfg: ModelConfig, dtype: torch.dtype, device: torch.device
) -> int:
    if settings.num_kv_blocks is not None:
        if settings.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be positive, got {settings.num_kv_blocks}")
        return settings.num_kv_blocks
    full = settings.max_num_seqs * -(-model_len(settings, cfg) // settings.block_size)
    in_memory = blocks_in_memory(cfg, settings.block_size, dtype, device, settings.kv_cache_dtype)
    return min(in_memory, full)


def blocks_in_memory(
    cfg: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    kv_cache_dtype: str = "auto",
) -> int:
    """KV blocks that fit: 90% of free GPU memory (after weights), or a fixed CPU pool."""
    layers, dim = cfg.num_hidden_layers, cfg.head_dim
    per_block = kv_bytes_per_block(layers, block_size, dim, dtype, kv_cache_dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * GPU_MEMORY_UTILIZATION) // per_block)
    return max(1, CPU_KV_BYTES // per_block)


def build_colocated(settings: EngineSettings, cfg: ModelConfig) -> tuple[Executor, int]:
    """Loads both halves into this process; returns the executor and KV blocks per rank."""
    device = torch.device(settings.device)
    dtype = resolve_dtype(settings.dtype, cfg)
    attn = load_attention_side(settings.model, cfg, dtype, device, settings.fp8_attention)
    ffn = load_ffn_side(settings.model, cfg, FFNShard(), dtype, device, settings.quantization)
    num_blocks = default_num_blocks(settings, cfg, dtype, device)
    cache = KVCache.for_model(
        cfg, num_blocks, settings.block_size, dtype, device, settings.kv_cache_dtype
    )
    graphs, ffn_graphs = None, None
    if max_batch := settings.graph_max_batch():
        width = table_width(model_len(settings, cfg), settings.block_size, num_blocks)
        graphs = DecodeGraphs(attn, cache, max_batch, width)
        ffn_graphs = FFNGraphs(ffn, max_batch)
    runner = AttnRunner(attn, cache, LocalFFN(ffn, ffn_graphs), graphs=graphs)
    return ColocatedExecutor(runner), num_blocks


def table_width(max_model_len: int, block_size: int, num_blocks: int) -> int:
    """The widest block table a sequence can have on a rank with `num_blocks` KV blocks. The
    decode graphs size their attention splits for it, so it follows --max-model-len."""
    return min(num_blocks, -(-max_model_len // block_size))


def build_engine(settings: EngineSettings) -> EngineCore:
    if not Path(settings.model).exists():
        raise ConfigError(f"--model: {settings.model} does not exist")
    cfg = ModelConfig.from_pretrained(settings.model)
    max_len = model_len(settings, cfg)
    check_kv_cache_dtype(settings.kv_cache_dtype)
    check_quantization(settings.quantization)
    if settings.colocated:
        executor, num_blocks = build_colocated(settings, cfg)
    elif settings.launcher == "ray":
        from afd.launch.ray_launcher import build_ray_disaggregated

        executor, num_blocks = build_ray_disaggregated(settings, cfg)
    else:
        from afd.launch.local import build_disaggregated

        executor, num_blocks = build_disaggregated(settings, cfg)
    max_len = fit_model_len(settings, max_len, num_blocks)
    sched = SchedulerConfig(
        num_ranks=executor.num_ranks,
        num_kv_blocks=num_blocks,
        block_size=settings.block_size,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs,
        num_micro_batches=settings.num_micro_batches(),
        max_model_len=max_len,
        enable_prefix_caching=settings.enable_prefix_caching,
    )
    model = StepTimeModel()
    admission = (
        TPOTAdmission(model, settings.tpot_slo_ms / 1000) if settings.tpot_slo_ms else AdmitAll()
    )
    return EngineCore(
        Scheduler(sched, admission), executor, cfg.eos_token_ids, max_len, model,
        grammars=build_grammars(settings.model, cfg),
    )  # fmt: skip


def build_grammars(folder: str, cfg: ModelConfig) -> Grammars | str:
    """The structured-outputs store, built at start (its token table takes ~1 s for a large
    vocabulary: not on a request's path); or, without a usable tokenizer, the reason."""
    try:
        return Grammars.for_model(folder, cfg.vocab_size, list(cfg.eos_token_ids))
    except (ValueError, RuntimeError) as e:  # llguidance's refusals
        logger.warning("structured outputs disabled: %s", e)
        return str(e)


def fit_model_len(settings: EngineSettings, max_len: int, num_blocks: int) -> int:
    """A sequence must fit one rank's KV pool, or it could never be (re)admitted."""
    pool = num_blocks * settings.block_size
    if max_len <= pool:
        return max_len
    if settings.max_model_len is not None:
        raise ConfigError(
            f"--max-model-len {max_len} needs {-(-max_len // settings.block_size)} "
            f"KV blocks per attention rank; the pool holds {num_blocks} "
            f"({pool} tokens): lower it or raise --num-kv-blocks"
        )
    logger.warning(
        "max model length lowered to %d tokens: what %d KV blocks of %d hold",
        pool,
        num_blocks,
        settings.block_size,
    )
    return pool


def parse_roles(settings: EngineSettings) -> tuple[RoleShape, RoleShape]:
    return RoleShape.parse(settings.attn, "--attn"), RoleShape.parse(settings.ffn, "--ffn")

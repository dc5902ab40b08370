"""The timed half of `afd-bench e2e`: this process is attention rank a0 on cuda:0 (the real
AttnRunner pipeline with RemoteFFN over the nccl transport), a spawned process is FFN rank f0
on cuda:1 (the real FFNServer). Colocated runs the same runner with LocalFFN on cuda:0. Each
mode runs eagerly and with CUDA graphs (DecodeGraphs / FFNGraphs, as afd serves decodes).
`fp8`: the weights as `--quantization fp8 --fp8-attention` serves them, on both ranks."""

from __future__ import annotations

import math
import multiprocessing as mp

import torch

from afd.bench.layer import attention_stage, build, ffn_stage
from afd.bench.step_timing import scaled_step_ms, sync, time_steps
from afd.config import ModelConfig
from afd.models.step3 import AttentionSide, FFNShard, FFNSide
from attn_worker.attention import BatchAttention, SeqView
from attn_worker.decode_graphs import DecodeGraphs
from attn_worker.ffn_client import LocalFFN
from attn_worker.kv_cache import KVCache
from attn_worker.model_runner import AttnRunner, MicroBatch
from attn_worker.remote_ffn import RemoteFFN
from ffn_worker.graphs import FFNGraphs
from ffn_worker.messages import StepShape
from ffn_worker.worker import FFNServer
from transport.base import create_transport

BLOCK = 16
WARM, TIMED = 2, 5


def fp8_experts(side: FFNSide) -> FFNSide:
    """--quantization fp8: every MoE layer's routed experts in e4m3, a scale per channel."""
    for layer in side.model.layers:
        layer.quantize_experts_fp8()
    return side


def _ffn_rank(cfg: ModelConfig, backend: str, device: str, dtype, max_tokens, fp8, queues):
    addresses, table, shapes, busy = queues
    t = create_transport("nccl", "f0", backend=backend, device=device)
    addresses.put(("f0", t.address()))
    t.connect(table.get(timeout=120))
    side = build(lambda: FFNSide(cfg, FFNShard()), dtype, device, 2)
    if fp8:
        fp8_experts(side)
    graphs = FFNGraphs(side, max_tokens) if max_tokens else None
    servers = {
        False: FFNServer(side, t, ["a0"], 300.0),
        True: FFNServer(side, t, ["a0"], 300.0, graphs),
    }
    while (item := shapes.get()) is not None:
        if item == "busy":  # FFN compute seconds since the last ask
            busy.put(sum(s.take_compute_s() for s in servers.values()))
            continue
        shape, use_graphs = item
        servers[use_graphs].serve_step(shape)
    sync(device)
    t.close()


class PipelineBench:
    def __init__(
        self,
        cfg: ModelConfig,
        max_batch: int,
        context: int,
        devices: tuple[str, str] = ("cuda:0", "cuda:1"),
        backend: str = "nccl",
        dtype: torch.dtype = torch.bfloat16,
        graphs: bool = True,
        fp8: bool = False,
    ) -> None:
        """devices: (attention rank, FFN rank); backend "gloo" with CPU devices for tests;
        graphs: also build the CUDA-graph runners (captured up to `max_batch` rows); fp8:
        e4m3 experts and attention projections (`--quantization fp8 --fp8-attention`)."""
        self.cfg, self.context, self.step = cfg, context, 0
        self.device, self.dtype = devices[0], dtype
        ctx = mp.get_context("spawn")
        addresses, table, self.shapes = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.busy = ctx.Queue()
        queues = (addresses, table, self.shapes, self.busy)
        args = (cfg, backend, devices[1], dtype, max_batch if graphs else 0, fp8, queues)
        self.proc = ctx.Process(target=_ffn_rank, args=args)
        self.proc.start()
        self.transport = create_transport("nccl", "a0", backend=backend, device=self.device)
        name, address = addresses.get(timeout=120)
        table.put({"a0": self.transport.address()})
        self.transport.connect({name: address})
        self.side = build(lambda: AttentionSide(cfg), dtype, self.device, 1)
        self.local = build(lambda: FFNSide(cfg, FFNShard()), dtype, self.device, 2)
        if fp8:  # the same draws as the FFN rank's, quantized the same way
            self.side.quantize_projections_fp8({})
            fp8_experts(self.local)
        per_seq = -(-context // BLOCK)
        blocks = max_batch * per_seq
        layers = cfg.num_hidden_layers
        self.cache = KVCache(layers, blocks, BLOCK, cfg.head_dim, self.dtype, self.device)
        self.cache.k.normal_()
        self.cache.v.normal_()
        self.tables = torch.randperm(blocks, device=self.device).view(max_batch, per_seq)
        remote = RemoteFFN(self.transport, ["f0"], 300.0)
        # runners[(remote, graphs)]
        self.runners = {
            (True, False): AttnRunner(self.side, self.cache, remote),
            (False, False): AttnRunner(self.side, self.cache, LocalFFN(self.local)),
        }
        if graphs:
            decode = DecodeGraphs(self.side, self.cache, max_batch, per_seq)
            local = LocalFFN(self.local, FFNGraphs(self.local, max_batch))
            self.runners[(True, True)] = AttnRunner(self.side, self.cache, remote, graphs=decode)
            self.runners[(False, True)] = AttnRunner(self.side, self.cache, local, graphs=decode)
        self._stages: dict[int, dict[str, float]] = {}

    def _micro_batches(self, batch: int, m: int) -> list[MicroBatch]:
        pos, scale = self.context - 1, self.cfg.head_dim**-0.5
        mbs = []
        for rows in torch.arange(batch).tensor_split(m):
            tables = self.tables[rows.tolist()]  # [b, blocks]
            slots = tables[:, pos // BLOCK] * BLOCK + pos % BLOCK  # [b]
            views = [SeqView(i, 1, self.context, tables[i]) for i in range(len(rows))]
            attn = BatchAttention(self.cache, views, slots, scale)
            ids = torch.randint(0, self.cfg.vocab_size, (len(rows),), device=self.device)  # [b]
            positions = torch.full((len(rows),), pos, dtype=torch.long, device=self.device)
            mbs.append(MicroBatch(ids, positions, attn))
        return mbs

    def _run(self, mbs: list[MicroBatch], remote: bool, graphs: bool) -> list[torch.Tensor]:
        self.step += 1
        if remote:
            shape = StepShape(self.step, [[len(mb.token_ids) for mb in mbs]])
            self.shapes.put((shape, graphs))
        with torch.inference_mode():
            return self.runners[(remote, graphs)].forward(self.step, mbs)

    def _ffn_busy_s(self, runner: AttnRunner, remote: bool) -> float:
        """FFN compute seconds since the last call (CUDA events on its GPU)."""
        if not remote:
            return runner.ffn.take_compute_s()
        self.shapes.put("busy")
        return self.busy.get(timeout=300)

    def _time_steps(self, mbs: list[MicroBatch], remote: bool, graphs: bool) -> dict[str, float]:
        """Median ms per step and steady µs per layer (afd/bench/step_timing.py), and each
        stage's busy µs per layer in the timed steps: the attention blocks on this GPU, the
        FFN compute on the FFN rank's (device time from CUDA events, same data, same run)."""
        runner = self.runners[(remote, graphs)]
        run = lambda: self._run(mbs, remote, graphs)  # noqa: E731

        def reset() -> None:
            runner.take_stage_s()
            self._ffn_busy_s(runner, remote)

        step_ms, steady_us = time_steps(runner, run, self.device, WARM, TIMED, reset)
        per_layer = 1e6 / (TIMED * self.cfg.num_hidden_layers)
        return {
            "step_ms": step_ms,
            "steady_us": steady_us,
            "attn_busy_us": runner.take_stage_s()[0] * per_layer,
            "ffn_busy_us": self._ffn_busy_s(runner, remote) * per_layer,
        }

    def rel_diff(self, batch: int, m: int, graphs: bool = False) -> dict[str, float]:
        """‖a − b‖ / ‖b‖ of one step's final hidden states, same micro-batches and weights
        (both FFN sides are drawn from one seed; each run rewrites the step's KV slots with
        the same values): disaggregated vs colocated in the same mode, and for graphs also
        colocated graphs vs colocated eager (padding to a captured size changes GEMM shapes,
        hence bf16 rounding, which a random model's peaked router can amplify)."""
        mbs = self._micro_batches(batch, m)
        run = lambda remote, g: torch.cat(self._run(mbs, remote, g)).float()  # noqa: E731
        ref = run(False, graphs)
        out = {"disagg_vs_colocated": float((run(True, graphs) - ref).norm() / ref.norm())}
        if graphs:
            eager = run(False, False)
            out["graphs_vs_eager"] = float((ref - eager).norm() / eager.norm())
        return out

    def _stage_us(self, b: int, graphs: bool) -> tuple[float, float]:
        """Attention-stage and FFN-stage µs for a micro-batch of b on this GPU: eager, or
        replayed as a CUDA graph."""
        if b not in self._stages:
            g = graphs and self.device.startswith("cuda")
            layer = self.side.layer(0)
            a = attention_stage(layer, self.cfg, b, self.context, self.dtype, g, unfused=False)
            f = ffn_stage(self.local.model.layers[0], self.cfg, b, self.dtype, g)
            self._stages[b] = {"eager": (a["eager_us"], f["eager_us"])}
            self._stages[b]["graph"] = (a["graph_us"], f["graph_us"])
        pair = self._stages[b]["graph" if graphs else "eager"]
        return pair if all(math.isfinite(v) for v in pair) else self._stages[b]["eager"]

    def _row(self, batch: int, m: int, t: dict[str, float], bound_us: float, a, f) -> dict:
        layers = self.cfg.num_hidden_layers
        return {
            "batch": batch,
            "m": m,
            "step_ms": t["step_ms"],
            "layer_us": t["steady_us"],  # steady state, fill and drain left out
            "step_layer_us": 1e3 * t["step_ms"] / layers,  # the whole step over its layers
            # a 61-layer step: this one plus 61 - L more layers at the steady rate
            "step_ms_61": scaled_step_ms(t["step_ms"], t["steady_us"], layers, 61),
            "attn_busy_us": t["attn_busy_us"],  # per layer, all micro-batches, in this run
            "ffn_busy_us": t["ffn_busy_us"],
            "bound_us": bound_us,
            "vs_bound": t["steady_us"] / bound_us,
            # the stages timed alone (layer bench's method; its routing touches every expert,
            # the model's peaked random router fewer, so these overstate the FFN stage)
            "attn_stage_us": a,
            "ffn_stage_us": f,
        }

    def colocated(self, batch: int, graphs: bool = False) -> dict:
        """One GPU runs attention then FFN per layer: the bound is their busy times' sum."""
        t = self._time_steps(self._micro_batches(batch, 1), False, graphs)
        a, f = self._stage_us(batch, graphs)
        bound = t["attn_busy_us"] + t["ffn_busy_us"]
        return self._row(batch, 1, t, bound, a, f) | {"graphs": graphs}

    def disaggregated(self, batch: int, m: int, graphs: bool = False) -> dict:
        """Bound: the slowest stage's busy time per layer (over its m micro-batches)."""
        t = self._time_steps(self._micro_batches(batch, m), True, graphs)
        a, f = self._stage_us(-(-batch // m), graphs)
        bound = max(t["attn_busy_us"], t["ffn_busy_us"])
        return self._row(batch, m, t, bound, m * a, m * f) | {"graphs": graphs}

    def __enter__(self) -> PipelineBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shapes.put(None)
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
        self.transport.close()

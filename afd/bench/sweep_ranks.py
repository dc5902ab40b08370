"""The timed half of `afd-bench sweep`: one group of spawned rank processes per layout.

Disaggregated A+F: attention ranks a0..a{A-1} (AttnRunner + RemoteFFN over the nccl transport)
and FFN ranks f0..f{F-1} (FFNServer, FFNShard(j, F): E/F experts, 1/F of the shared expert);
every attention rank sends each micro-batch to every FFN rank and sums the partials (the v1
exchange). Colocated on K: K independent replicas (AttnRunner + LocalFFN, the whole model on
each device), timed concurrently. The parent sends every rank the same commands; each
attention/replica rank answers with its median step time, and the group's time is the slowest.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from dataclasses import dataclass

import torch

from afd.bench.layer import build
from afd.bench.step_timing import sync, time_steps
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
TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RankSetup:
    cfg: ModelConfig
    context: int
    max_batch: int  # sequences per attention rank (KV cache size)
    backend: str  # "nccl" on GPUs, "gloo" on CPU
    dtype: torch.dtype
    attn: int  # attention ranks (disaggregated) or replicas (colocated)
    ffn: int  # FFN ranks; 0 = colocated
    graph_max_batch: int = 0  # decode micro-batches up to this many rows replay CUDA graphs


def sizes(batch: int, m: int) -> list[int]:
    """Rows of each of m micro-batches of a batch (torch.tensor_split's split)."""
    return [len(r) for r in torch.arange(batch).tensor_split(m)]


class _Attention:
    """One attention rank (or colocated replica): random weights, a random paged KV cache."""

    def __init__(self, s: RankSetup, index: int, device: str, transport) -> None:
        self.s, self.device, self.step = s, device, 0
        cfg = s.cfg
        side = build(lambda: AttentionSide(cfg), s.dtype, device, 1)
        per_seq = -(-s.context // BLOCK)
        blocks = s.max_batch * per_seq
        self.cache = KVCache(cfg.num_hidden_layers, blocks, BLOCK, cfg.head_dim, s.dtype, device)
        self.cache.k.normal_()
        self.cache.v.normal_()
        self.tables = torch.randperm(blocks, device=device).view(s.max_batch, per_seq)
        graphs = None
        if s.graph_max_batch:
            graphs = DecodeGraphs(side, self.cache, s.graph_max_batch, per_seq)
        if transport is None:
            local = build(lambda: FFNSide(cfg, FFNShard()), s.dtype, device, 2)
            ffn = LocalFFN(local, FFNGraphs(local, s.graph_max_batch) if graphs else None)
        else:
            ffn = RemoteFFN(transport, [f"f{j}" for j in range(s.ffn)], TIMEOUT_S)
        self.runner = AttnRunner(side, self.cache, ffn, index, graphs)

    def micro_batches(self, batch: int, m: int) -> list[MicroBatch]:
        pos, scale, mbs, start = self.s.context - 1, self.s.cfg.head_dim**-0.5, [], 0
        for n in sizes(batch, m):
            tables = self.tables[start : start + n]  # [b, blocks]
            start += n
            slots = tables[:, pos // BLOCK] * BLOCK + pos % BLOCK  # [b]
            views = [SeqView(i, 1, self.s.context, tables[i]) for i in range(n)]
            attn = BatchAttention(self.cache, views, slots, scale)
            ids = torch.randint(0, self.s.cfg.vocab_size, (n,), device=self.device)  # [b]
            positions = torch.full((n,), pos, dtype=torch.long, device=self.device)  # [b]
            mbs.append(MicroBatch(ids, positions, attn))
        return mbs

    def time_ms(self, batch: int, m: int) -> tuple[float, float]:
        """Median ms of one decode step's pipeline (all layers, device work included) and
        steady µs per layer (afd/bench/step_timing.py)."""
        mbs = self.micro_batches(batch, m)

        def run() -> None:
            self.step += 1
            with torch.inference_mode():
                self.runner.forward(self.step, mbs)

        times = time_steps(self.runner, run, self.device, WARM, TIMED)
        self.runner.take_stage_s()  # stage clocks: drained, not reported here
        self.runner.ffn.take_compute_s()
        return times


def _rank(s: RankSetup, name: str, device: str, addresses, table, commands, results) -> None:
    """A rank's process: build, then serve commands (batch, m) until None."""
    try:
        if device == "cpu":
            torch.set_num_threads(1)  # K ranks share the host's cores
        else:
            torch.cuda.set_device(device)  # Triton launches on the current device
        transport = None
        if s.ffn:
            transport = create_transport("nccl", name, backend=s.backend, device=device)
            addresses.put((name, transport.address()))
            transport.connect({k: v for k, v in table.get(timeout=TIMEOUT_S).items() if k != name})
        if name.startswith("f"):
            shard = FFNShard(int(name[1:]), s.ffn)
            side = build(lambda: FFNSide(s.cfg, shard), s.dtype, device, 2)
            # a micro-batch gathers the rows of every attention rank
            graphs = FFNGraphs(side, s.graph_max_batch * s.attn) if s.graph_max_batch else None
            attn = [f"a{i}" for i in range(s.attn)]
            server = FFNServer(side, transport, attn, TIMEOUT_S, graphs)
            step = 0
            results.put((name, "ready"))
            while (cmd := commands.get()) is not None:
                for _ in range(WARM + TIMED):
                    step += 1
                    server.serve_step(StepShape(step, [sizes(*cmd)] * s.attn))
                server.take_compute_s()  # drained, not reported here
                sync(device)
        else:
            rank = _Attention(s, int(name[1:]), device, transport)
            results.put((name, "ready"))
            while (cmd := commands.get()) is not None:
                results.put((name, rank.time_ms(*cmd)))
        sync(device)
        if transport is not None:
            transport.close()
    except Exception:  # noqa: BLE001 - the parent reports it and stops the group
        results.put((name, "error: " + traceback.format_exc()))


class RankGroup:
    """`with RankGroup(setup, devices) as g: g.step_ms(batch, m)`. devices: one per rank,
    attention ranks (or replicas) first."""

    def __init__(self, setup: RankSetup, devices: list[str]) -> None:
        self.s = setup
        names = [f"a{i}" for i in range(setup.attn)] + [f"f{j}" for j in range(setup.ffn)]
        if setup.ffn == 0:
            names = [f"c{i}" for i in range(setup.attn)]
        ctx = mp.get_context("spawn")
        addresses, self.results = ctx.Queue(), ctx.Queue()
        self.commands = {n: ctx.Queue() for n in names}
        tables = {n: ctx.Queue() for n in names}
        self.procs = [
            ctx.Process(
                target=_rank,
                args=(setup, n, d, addresses, tables[n], self.commands[n], self.results),
            )
            for n, d in zip(names, devices, strict=True)
        ]
        for p in self.procs:
            p.start()
        if setup.ffn:
            table = dict(addresses.get(timeout=TIMEOUT_S) for _ in names)
            for q in tables.values():
                q.put(table)
        self._collect(len(names))

    def _collect(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            try:
                name, value = self.results.get(timeout=TIMEOUT_S)
            except queue.Empty as e:
                raise RuntimeError(f"sweep: a rank sent nothing in {TIMEOUT_S:g} s") from e
            if isinstance(value, str) and value.startswith("error"):
                raise RuntimeError(f"sweep: rank {name} failed:\n{value}")
            if not isinstance(value, str):
                out.append(tuple(value))
        return out

    def step_ms(self, batch: int, m: int) -> tuple[float, float]:
        """The slowest attention rank's (or replica's) median decode step, ms, and steady
        µs per layer."""
        for q in self.commands.values():
            q.put((batch, m))
        return max(self._collect(self.s.attn))

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        for q in self.commands.values():
            q.put(None)
        for p in self.procs:
            p.join(60)
            if p.is_alive():
                p.kill()

"""A->F->A round trip between two GPUs over the nccl transport (shape header included) and
over raw torch.distributed send/recv with shapes known in advance (no header): the header's
cost is the difference. Two spawned processes, cuda:0 and cuda:1."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import torch
import torch.distributed as dist

from transport.base import Transport, create_transport

ITERS, WARM = 50, 5


def measure_round_trips(tokens: list[int], hidden: int, top_k: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    addresses, out = ctx.Queue(), ctx.Queue()
    tables = [ctx.Queue(), ctx.Queue()]
    procs = [
        ctx.Process(target=_rank, args=(i, tokens, hidden, top_k, addresses, tables[i], out))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    table = dict(addresses.get(timeout=120) for _ in procs)
    for q in tables:
        q.put(table)
    rows = out.get(timeout=300)
    for p in procs:
        p.join(30)
    return rows


def _rank(i: int, tokens: list[int], hidden: int, top_k: int, addresses, table, out) -> None:
    name = ("a0", "f0")[i]
    t = create_transport("nccl", name, device=f"cuda:{i}")
    addresses.put((name, t.address()))
    t.connect({k: v for k, v in table.get(timeout=120).items() if k != name})
    rows = []
    for n in tokens:
        x = torch.randn(n, hidden, dtype=torch.bfloat16, device=t.device)  # [T, H]
        ids = torch.randint(0, 48, (n, top_k), dtype=torch.int32, device=t.device)  # [T, k]
        w = torch.rand(n, top_k, dtype=torch.bfloat16, device=t.device)  # [T, k]
        if i == 0:
            via = _time(lambda s, x=x, ids=ids, w=w: _ping(t, s, [x, ids, w]))
            raw = _time(lambda s, x=x, ids=ids, w=w: _ping_raw(1, [x, ids, w], x))
            rows.append({"tokens": n, "transport_us": via, "raw_us": raw})
        else:
            for s in range(ITERS + WARM):
                (y, _, _) = t.recv("a0", (s, 0, 0)).wait(60)
                t.send("a0", (s, 0, 0), [y])
            for _ in range(ITERS + WARM):
                for buf in (x, ids, w):
                    dist.recv(buf, src=0)
                dist.send(x, dst=0)
    torch.cuda.synchronize()
    if i == 0:
        out.put(rows)
    t.close()


def _time(fn) -> float:
    """Median µs of one synchronous round trip, after WARM untimed ones."""
    times = []
    for s in range(ITERS + WARM):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(s)
        torch.cuda.synchronize()
        if s >= WARM:
            times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def _ping(t: Transport, step: int, tensors: list[torch.Tensor]) -> None:
    t.send("f0", (step, 0, 0), tensors)
    t.recv("f0", (step, 0, 0)).wait(60)


def _ping_raw(peer: int, tensors: list[torch.Tensor], back: torch.Tensor) -> None:
    for buf in tensors:
        dist.send(buf, dst=peer)
    dist.recv(back, src=peer)

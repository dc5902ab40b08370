"""A->F->A round trip between two GPUs over the nccl transport and over raw torch.distributed
send/recv on the default stream: the transport's own cost (side-stream receives, bookkeeping)
is the difference. Two spawned processes, cuda:0 and cuda:1."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import torch
import torch.distributed as dist

from transport.base import Key, Transport, create_transport

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
    for j, n in enumerate(tokens):  # keys (j, s, 0): increasing, as the transport needs
        x = torch.randn(n, hidden, dtype=torch.bfloat16, device=t.device)  # [T, H]
        ids = torch.randint(0, 48, (n, top_k), dtype=torch.int32, device=t.device)  # [T, k]
        w = torch.rand(n, top_k, dtype=torch.bfloat16, device=t.device)  # [T, k]
        if i == 0:
            via = _time(lambda s, j=j, x=x, ids=ids, w=w: _ping(t, (j, s, 0), [x, ids, w]))
            raw = _time(lambda s, x=x, ids=ids, w=w: _ping_raw(1, [x, ids, w], x))
            rows.append({"tokens": n, "transport_us": via, "raw_us": raw})
        else:
            like = [(tuple(b.shape), b.dtype) for b in (x, ids, w)]
            for s in range(ITERS + WARM):
                (y, _, _) = t.recv("a0", (j, s, 0), like).wait(60)
                t.send("a0", (j, s, 0), [y])
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


def _ping(t: Transport, key: Key, tensors: list[torch.Tensor]) -> None:
    t.send("f0", key, tensors)
    t.recv("f0", key, [(tuple(tensors[0].shape), tensors[0].dtype)]).wait(60)


def _ping_raw(peer: int, tensors: list[torch.Tensor], back: torch.Tensor) -> None:
    for buf in tensors:
        dist.send(buf, dst=peer)
    dist.recv(back, src=peer)

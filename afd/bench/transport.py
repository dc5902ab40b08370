"""`afd-bench transport`: A->F->A round-trip latency, bandwidth and per-message overhead of the
activation transport, between two local processes (the F side echoes)."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from multiprocessing.connection import Connection

import msgpack
import torch
import zmq

from afd.arg_types import choices_list, non_negative_int, output_file, positive_int
from transport import Transport, create_transport

TIMEOUT_S = 60.0


def echo_peer(
    protocols: list[str], conn: Connection, num_messages: int, options: dict | None = None
) -> None:
    """F side, one "f0" transport per protocol: send {protocol: address}, get {protocol: peer
    table}, then per protocol in turn receive keys (0..n-1, 0, 0) from "a0" and echo each."""
    opts = options or {}
    ranks = {p: create_transport("zmq", "f0", protocol=p, **opts) for p in protocols}
    try:
        conn.send({p: t.address() for p, t in ranks.items()})
        tables = conn.recv()
        for protocol, t in ranks.items():
            t.connect(tables[protocol])
            for i in range(num_messages):
                key = (i, 0, 0)
                t.send("a0", key, t.recv("a0", key).wait(TIMEOUT_S))
            conn.send("done")
        conn.recv()  # keep sockets open until the A side has read everything
    finally:
        for t in ranks.values():
            t.close()


class EchoPair:
    """This process as "a0" plus a spawned echo process as "f0"; keys are handed out in order."""

    def __init__(self, protocol: str, num_messages: int, options: dict) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        args = ([protocol], child_conn, num_messages, options)
        self._proc = ctx.Process(target=echo_peer, args=args)
        self._proc.start()
        self.transport: Transport = create_transport("zmq", "a0", protocol=protocol, **options)
        peer_address = self._conn.recv()[protocol]
        self._conn.send({protocol: {"a0": self.transport.address()}})
        self.transport.connect({"f0": peer_address})
        self._next = 0

    def next_key(self) -> tuple[int, int, int]:
        key = (self._next, 0, 0)
        self._next += 1
        return key

    def close(self) -> None:
        if self._conn.poll(TIMEOUT_S):
            self._conn.recv()
        self._conn.send("bye")
        self._proc.join(TIMEOUT_S)
        if self._proc.is_alive():
            self._proc.kill()
        self.transport.close()


def round_trips(pair: EchoPair, tensors: list[torch.Tensor], n: int, in_flight: int) -> list[float]:
    """Seconds per message for n rounds of `in_flight` messages sent back to back, then echoed."""
    t = pair.transport
    times = []
    for _ in range(n):
        keys = [pair.next_key() for _ in range(in_flight)]
        start = time.perf_counter()
        for key in keys:
            t.send("f0", key, tensors)
        for key in keys:
            t.recv("f0", key).wait(TIMEOUT_S)
        times.append((time.perf_counter() - start) / in_flight)
    return times


def call_overheads(
    protocol: str, tensors: list[torch.Tensor], n: int, options: dict
) -> tuple[list[float], list[float]]:
    """CPU time of send() and of recv().wait() on an already-arrived message (loopback)."""
    t = create_transport("zmq", "a0", protocol=protocol, **options)
    t.connect({"a0": t.address()})
    send_s, recv_s = [], []
    for i in range(n):
        start = time.perf_counter()
        t.send("a0", (i, 0, 0), tensors)
        send_s.append(time.perf_counter() - start)
    time.sleep(0.2)  # let everything land so recv measures only our own work
    for i in range(n):
        start = time.perf_counter()
        t.recv("a0", (i, 0, 0)).wait(TIMEOUT_S)
        recv_s.append(time.perf_counter() - start)
    t.close()
    return send_s, recv_s


def summarize(case: str, protocol: str, nbytes: int, secs: list[float]) -> dict:
    """Median/p90 in µs; bandwidth counts both directions of a round trip."""
    s = sorted(secs)
    median = statistics.median(s)
    row = {"case": case, "protocol": protocol, "bytes": nbytes}
    row |= {"n": len(s), "median_us": median * 1e6, "p90_us": s[int(0.9 * (len(s) - 1))] * 1e6}
    bandwidth = "round trip" in case and nbytes >= 1 << 16
    row["gb_per_s"] = 2 * nbytes / median / 1e9 if bandwidth else None
    return row


def bench_protocol(protocol: str, args: argparse.Namespace) -> list[dict]:
    tokens, hidden, iters, warmup = args.tokens, args.hidden, args.iters, args.warmup
    act = [torch.randn(tokens, hidden).to(torch.bfloat16)]  # [T, H]
    tiny = [torch.zeros(1, dtype=torch.bfloat16)]
    n = warmup + iters
    cases = [  # (name, tensors, messages in flight)
        ("activation round trip", act, 1),
        ("activation round trip, 3 in flight (per msg)", act, 3),
        ("tiny round trip", tiny, 1),
    ]
    options = transport_options(args)
    pair = EchoPair(protocol, sum(n * k for _, _, k in cases), options)
    rows = []
    try:
        for name, tensors, in_flight in cases:
            secs = round_trips(pair, tensors, n, in_flight)[warmup:]
            rows.append(summarize(name, protocol, tensors[0].nbytes, secs))
    finally:
        pair.close()
    # Loopback keeps every message queued at once, so bound the activation count.
    for name, tensors, count in (("tiny", tiny, iters), ("activation", act, min(iters, 100))):
        send_s, recv_s = call_overheads(protocol, tensors, warmup + count, options)
        nbytes = tensors[0].nbytes
        rows.append(summarize(f"{name} send() call", protocol, nbytes, send_s[warmup:]))
        rows.append(summarize(f"{name} recv().wait(), arrived", protocol, nbytes, recv_s[warmup:]))
    return rows


def transport_options(args: argparse.Namespace) -> dict:
    return {"malloc_tuning": not args.no_malloc_tuning}


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'case':<46} {'proto':<5} {'bytes':>9} {'median µs':>10} {'p90 µs':>9} {'GB/s':>6}")
    for r in rows:
        bw = f"{r['gb_per_s']:.2f}" if r["gb_per_s"] is not None else "-"
        print(
            f"{r['case']:<46} {r['protocol']:<5} {r['bytes']:>9} "
            f"{r['median_us']:>10.1f} {r['p90_us']:>9.1f} {bw:>6}"
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="afd-bench transport", description=__doc__)
    p.add_argument("--tokens", type=positive_int, default=128, help="rows per activation message")
    p.add_argument("--hidden", type=positive_int, default=7168, help="hidden size (Step3: 7168)")
    p.add_argument("--iters", type=positive_int, default=1000, help="measured iterations per case")
    p.add_argument("--warmup", type=non_negative_int, default=50)
    p.add_argument(
        "--protocols",
        type=choices_list(("tcp", "ipc")),
        default=["tcp", "ipc"],
        help="comma-separated: tcp, ipc",
    )
    p.add_argument(
        "--no-malloc-tuning", action="store_true", help="keep glibc's malloc defaults (A/B)"
    )
    p.add_argument(
        "--json", metavar="PATH", type=output_file, help="also write the results as JSON here"
    )
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = "afd-bench transport " + shlex.join(argv)
    rows = []
    for protocol in args.protocols:
        rows += bench_protocol(protocol, args)
    shape = [args.tokens, args.hidden]
    header = (
        f"# {command}\n# cpu: {cpu_model()} x{os.cpu_count()}, load {os.getloadavg()[0]:.1f}; "
        f"activation {shape} bfloat16; {versions()}"
    )
    print_table(rows, header)
    if args.json:
        result = {"benchmark": "transport", "device": "cpu", "cpu": cpu_model()}
        result |= {"num_cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()}
        result |= {"command": command, "versions": versions(), "dtype": "bfloat16"}
        result |= {"activation_shape": shape, "iters": args.iters, "warmup": args.warmup}
        result["transport_options"] = transport_options(args)
        result["results"] = rows
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

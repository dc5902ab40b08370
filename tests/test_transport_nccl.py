"""The nccl transport through the Transport API: two spawned processes, gloo on CPU (CI) and
real NCCL between two GPUs (marked gpu, skipped without them); the rendezvous port stays held
from address() to connect(), so another process cannot take it in between."""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket

import pytest
import torch

from tests.conftest import PROMPTS
from transport.base import TransportTimeout, create_transport, settle

NAMES = ("a0", "f0")


def _rank(
    name: str, backend: str, addresses: mp.Queue, table: mp.Queue, out: mp.Queue, steal: bool
) -> None:
    try:
        device = "cpu" if backend == "gloo" else f"cuda:{NAMES.index(name)}"
        t = create_transport("nccl", name, backend=backend, device=device, timeout_s=30)
        addresses.put((name, t.address()))
        # the lead (first name) hosts the rendezvous: another process takes its port if it can
        thief = _take_port(t.address()) if steal and name == NAMES[0] else None
        t.connect({k: v for k, v in table.get(timeout=30).items() if k != name})
        result = "ok" if steal else _exchange(t, name, torch.device(device))
        if thief is not None:
            result = f"another process took the rendezvous port {t.address()}"
            thief.close()
        out.put((name, result))
        t.close()
    except BaseException as e:  # the parent reports it
        out.put((name, f"{type(e).__name__}: {e}"))


def _take_port(address: str) -> socket.socket | None:
    """What a process asking the OS for any free port does when it is handed this one."""
    host, port = address.rsplit(":", 1)
    sock = socket.socket()
    try:
        sock.bind((host, int(port)))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def _exchange(t, name: str, device: torch.device) -> str:
    """a0 sends three micro-batches, posts the replies' receives in key order and claims them
    out of order; f0 receives into buffers shaped from what it knows, echoes x * 2."""
    g = torch.Generator().manual_seed(0)
    if name == "a0":
        xs = [torch.randn(4 + k, 8, generator=g).to(torch.bfloat16) for k in range(3)]
        ids = torch.arange(6).view(3, 2)
        for k, x in enumerate(xs):
            t.send("f0", (0, 0, k), [x.to(device), ids.to(device), torch.empty(0, 2).to(device)])
        handles = [t.recv("f0", (0, 0, k), [((4 + k, 8), torch.bfloat16)]) for k in range(3)]
        for k in (2, 0, 1):
            (y,) = handles[k].wait(20)
            assert y.device == device and torch.equal(y.cpu(), xs[k] * 2), k
        settle(handles, 20)
        with pytest.raises(ValueError, match="increasing key order"):
            t.recv("f0", (0, 0, 1), [((5, 8), torch.bfloat16)])
        with pytest.raises(ValueError, match="like="):
            t.recv("f0", (1, 0, 0))
        late = t.recv("f0", (9, 9, 9), [((1,), torch.float32)])  # never sent
        try:
            settle([late], 0.2)
            return "no timeout"
        except TransportTimeout as e:
            return "ok" if "(9, 9, 9)" in str(e) else str(e)
    for k in range(3):
        like = [((4 + k, 8), torch.bfloat16), ((3, 2), torch.int64), ((0, 2), torch.float32)]
        x, ids, empty = t.recv("a0", (0, 0, k), like).wait(20)
        assert ids.tolist() == [[0, 1], [2, 3], [4, 5]] and empty.shape == (0, 2)
        t.send("a0", (0, 0, k), [x * 2]).wait(20)
    return "ok"


def _run_pair(backend: str, steal: bool = False) -> None:
    ctx = mp.get_context("spawn")
    addresses, out = ctx.Queue(), ctx.Queue()
    tables = {n: ctx.Queue() for n in NAMES}
    procs = [
        ctx.Process(target=_rank, args=(n, backend, addresses, tables[n], out, steal))
        for n in NAMES
    ]
    for p in procs:
        p.start()
    try:
        table = dict(addresses.get(timeout=60) for _ in NAMES)
        for q in tables.values():
            q.put(table)
        results = dict(out.get(timeout=60) for _ in NAMES)
    except queue.Empty:
        pytest.fail(f"{backend} pair did not finish in time")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert results == {"a0": "ok", "f0": "ok"}


def test_gloo_pair_exchanges_out_of_order() -> None:
    _run_pair("gloo")


def test_rendezvous_port_cannot_be_taken_before_connect() -> None:
    """A port picked by binding and closing a socket could be handed to another process before
    the lead's TCPStore bound it (connect then failed with EADDRINUSE); now the store holds it
    from the constructor on."""
    _run_pair("gloo", steal=True)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="real NCCL between processes needs two CUDA GPUs",
)
def test_nccl_pair_exchanges_out_of_order() -> None:
    _run_pair("nccl")


@pytest.mark.slow
def test_llm_over_nccl_transport_matches_colocated(tiny_ckpt) -> None:
    """The launcher path end to end: workers build the transport from its name alone (gloo on
    a machine without CUDA), rendezvous through the peer table, and reproduce colocated."""
    from afd import LLM, SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=1, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    kwargs = dict(dtype="float32", num_kv_blocks=128, block_size=4)
    with LLM(str(tiny_ckpt), **kwargs) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    with LLM(str(tiny_ckpt), colocated=False, ffn="2x1", transport="nccl", **kwargs) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want

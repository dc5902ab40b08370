"""Transport interface and zmq backend: round trips, ordering, many peers, timeouts, cleanup."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator

import msgpack
import pytest
import torch
import zmq

from afd.bench.transport import echo_peer
from transport import Transport, TransportTimeout, create_transport, known_kinds, settle
from transport.zmq_backend import ZERO_COPY_MIN

PROTOCOLS = ["tcp", "ipc"]


def sample_tensors() -> list[torch.Tensor]:
    """Every supported wire dtype, on both sides of the zero-copy threshold, plus edge shapes."""
    big_rows = ZERO_COPY_MIN // (16 * 2) + 1  # > ZERO_COPY_MIN bytes of bf16
    return [
        torch.randn(4, 8),
        torch.randn(big_rows, 16).to(torch.bfloat16),
        torch.randn(3, 5).to(torch.bfloat16),
        torch.randn(2, 7).to(torch.float16),
        torch.randint(-(2**31), 2**31 - 1, (9,), dtype=torch.int32),
        torch.randint(-(2**62), 2**62, (3, 2), dtype=torch.int64),
        torch.empty(0, 7168, dtype=torch.bfloat16),  # a rank with no tokens this micro-batch
        torch.tensor(2.5),  # 0-dim
        torch.tensor([True, False]),
    ]


def assert_same(got: list[torch.Tensor], sent: list[torch.Tensor]) -> None:
    assert len(got) == len(sent)
    for g, s in zip(got, sent, strict=True):
        assert g.dtype == s.dtype and g.shape == s.shape
        assert torch.equal(g, s)
        assert g.is_contiguous()


@pytest.fixture(params=PROTOCOLS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Transport, Transport]]:
    a = create_transport("zmq", "a0", protocol=request.param)
    f = create_transport("zmq", "f0", protocol=request.param)
    a.connect({"f0": f.address()})
    f.connect({"a0": a.address()})
    yield a, f
    a.close()
    f.close()


def test_round_trip_all_dtypes(pair: tuple[Transport, Transport]) -> None:
    a, f = pair
    sent = sample_tensors()
    send = a.send("f0", (0, 1, 2), sent)
    got = f.recv("a0", (0, 1, 2)).wait(5)
    assert send.wait(5) == [] and send.done()
    assert_same(got, sent)
    back = f.send("a0", (0, 1, 2), got)  # a received message can be sent on as is
    assert_same(a.recv("f0", (0, 1, 2)).wait(5), sent)
    back.wait(5)


def test_received_tensors_are_owned_and_writable(pair: tuple[Transport, Transport]) -> None:
    a, f = pair
    sent = [torch.zeros(ZERO_COPY_MIN // 4 + 8), torch.zeros(4)]
    a.send("f0", (1, 0, 0), sent).wait(5)
    got = f.recv("a0", (1, 0, 0)).wait(5)
    for t in sent:
        t.fill_(7.0)  # the sender reuses its buffers once the send handle is done
    for t in got:
        t.add_(1.0)  # must not warn or fail: the receiver owns its tensors
        assert torch.all(t == 1.0)


def test_noncontiguous_and_empty_list(pair: tuple[Transport, Transport]) -> None:
    a, f = pair
    x = torch.arange(12.0).reshape(3, 4).t()
    a.send("f0", (0, 0, 0), [x])
    a.send("f0", (0, 0, 1), [])
    assert_same(f.recv("a0", (0, 0, 0)).wait(5), [x.contiguous()])
    assert f.recv("a0", (0, 0, 1)).wait(5) == []


def test_keys_out_of_order(pair: tuple[Transport, Transport]) -> None:
    a, f = pair
    keys = [(3, layer, mb) for layer in range(3) for mb in range(3)]
    for key in keys:
        a.send("f0", key, [torch.tensor(list(key))])
    handles = {key: f.recv("a0", key) for key in reversed(keys)}
    for key, handle in handles.items():
        assert handle.wait(5)[0].tolist() == list(key)
        assert handle.wait(0)[0].tolist() == list(key)  # a second wait returns the same


def test_like_is_checked_on_arrival(pair: tuple[Transport, Transport]) -> None:
    a, f = pair
    a.send("f0", (0, 0, 0), [torch.ones(3, 2)])
    a.send("f0", (0, 0, 1), [torch.ones(3, 2)])
    assert f.recv("a0", (0, 0, 0), [((3, 2), torch.float32)]).wait(5)[0].shape == (3, 2)
    with pytest.raises(ValueError, match=r"\(0, 0, 1\).*expected \[\(\(4, 2\)"):
        f.recv("a0", (0, 0, 1), [((4, 2), torch.float32)]).wait(5)


def test_settle_bounds_a_batch_of_handles(pair: tuple[Transport, Transport]) -> None:
    a, f = pair
    sends = [a.send("f0", (1, 0, k), [torch.full((2,), float(k))]) for k in range(2)]
    recvs = [f.recv("a0", (1, 0, k)) for k in range(3)]  # the third is never sent
    settle(sends + recvs[:2], 5)
    assert [r.wait(0)[0].tolist() for r in recvs[:2]] == [[0.0, 0.0], [1.0, 1.0]]
    with pytest.raises(TransportTimeout, match=r"'a0'.*\(1, 0, 2\)"):
        settle(recvs, 0.05)


def test_done_polls_without_blocking(pair: tuple[Transport, Transport]) -> None:
    a, f = pair
    handle = f.recv("a0", (5, 0, 0))
    assert not handle.done()
    a.send("f0", (5, 0, 0), [torch.ones(3)])
    handle.wait(5)
    assert handle.done()


def test_many_peers() -> None:
    """Broadcast A->F and partial sums F->A between 2 attention and 4 FFN ranks."""
    ranks = {n: create_transport("zmq", n) for n in ("a0", "a1", "f0", "f1", "f2", "f3")}
    table = {n: t.address() for n, t in ranks.items()}
    attn = [n for n in ranks if n.startswith("a")]
    ffn = [n for n in ranks if n.startswith("f")]
    for n, t in ranks.items():
        t.connect({p: table[p] for p in (ffn if n in attn else attn)})
    try:
        for a in attn:
            for f in ffn:
                ranks[a].send(f, (0, 4, 1), [torch.full((2,), float(int(a[1:])))])
        for f in ffn:
            for a in attn:
                x = ranks[f].recv(a, (0, 4, 1)).wait(5)[0]
                ranks[f].send(a, (0, 4, 1), [x + int(f[1:])])
        for a in attn:
            total = sum(ranks[a].recv(f, (0, 4, 1)).wait(5)[0] for f in ffn)
            assert total.tolist() == [4 * int(a[1:]) + 6] * 2
    finally:
        for t in ranks.values():
            t.close()


def test_timeout_names_peer_and_key(pair: tuple[Transport, Transport]) -> None:
    a, f = pair
    a.send("f0", (9, 9, 9), [torch.ones(1)])  # a different key must not satisfy the wait
    with pytest.raises(TransportTimeout, match=r"'a0'.*\(9, 9, 8\)"):
        f.recv("a0", (9, 9, 8)).wait(0.05)
    with pytest.raises(TransportTimeout, match="'f0'"):
        a.recv("f0", (9, 9, 9)).wait(0)


def test_errors_name_the_problem() -> None:
    t = create_transport("zmq", "a0")
    try:
        with pytest.raises(ValueError, match="'f7'"):
            t.send("f7", (0, 0, 0), [torch.ones(1)])
        t.connect({"a0": t.address()})
        t.connect({"a0": t.address()})  # the same table again is a no-op
        with pytest.raises(ValueError, match="already at"):
            t.connect({"a0": "tcp://127.0.0.1:1"})
        with pytest.raises(ValueError, match="complex64"):
            t.send("a0", (0, 0, 0), [torch.ones(1, dtype=torch.complex64)])
    finally:
        t.close()
    with pytest.raises(ValueError, match="'rdma'.*zmq"):
        create_transport("rdma", "a0")
    with pytest.raises(ValueError, match="protocol"):
        create_transport("zmq", "a0", protocol="udp")
    assert "zmq" in known_kinds()


def test_bad_message_is_skipped_whole(pair: tuple[Transport, Transport]) -> None:
    """A malformed message raises once and does not corrupt the message behind it."""
    _, f = pair
    raw = zmq.Context.instance().socket(zmq.PUSH)  # one socket, so the two stay in order
    raw.connect(f.address())
    raw.send_multipart([msgpack.packb(["a0", 0, 0, 0, [["complex32", [1]]]]), b"xxxx"])
    good = torch.ones(2)
    raw.send_multipart([msgpack.packb(["a0", 0, 0, 1, [["float32", [2]]]]), good.numpy()])
    raw.close(linger=1000)
    with pytest.raises(RuntimeError, match="complex32"):
        f.recv("a0", (0, 0, 1)).wait(5)
    assert f.recv("a0", (0, 0, 1)).wait(5)[0].tolist() == [1.0, 1.0]


def test_close_removes_ipc_file() -> None:
    t = create_transport("zmq", "a0", protocol="ipc")
    path = t.address().removeprefix("ipc://")
    assert os.path.exists(path)
    other = create_transport("zmq", "a0", protocol="ipc")
    assert other.address() != t.address()  # unique per rank even with the same name
    t.close()
    other.close()
    t.close()  # closing twice is harmless
    assert not os.path.exists(path)
    assert not os.path.exists(other.address().removeprefix("ipc://"))


def test_two_processes() -> None:
    """A in this process, F in a spawned one that echoes, over each protocol in turn (one
    process for all protocols: starting one costs a torch import)."""
    sent = sample_tensors()
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=echo_peer, args=(PROTOCOLS, child_conn, 3))
    proc.start()
    ranks = {p: create_transport("zmq", "a0", protocol=p) for p in PROTOCOLS}
    try:
        assert conn.poll(30), "echo process did not start"
        peer_addresses = conn.recv()
        conn.send({p: {"a0": t.address()} for p, t in ranks.items()})
        for protocol, a in ranks.items():
            a.connect({"f0": peer_addresses[protocol]})
            for key in [(2, 0, 0), (1, 0, 0), (0, 0, 0)]:  # sent out of order on purpose
                a.send("f0", key, sent + [torch.tensor(key[0])])
            for i in range(3):
                assert_same(a.recv("f0", (i, 0, 0)).wait(10), sent + [torch.tensor(i)])
            assert conn.recv() == "done"
        conn.send("bye")
        proc.join(10)
        assert proc.exitcode == 0
    finally:
        for a in ranks.values():
            a.close()
        if proc.is_alive():
            proc.kill()

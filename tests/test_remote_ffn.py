"""RemoteFFN bounds how far an attention rank's host runs ahead of its transfers: a peer that
never answers shows as a TransportTimeout two layers later, not at the end of the step (on
GPUs, a host that queued the whole step would block in CUDA's full launch queue first)."""

from __future__ import annotations

import time

import pytest
import torch

from afd.envs import RUN_AHEAD_LAYERS
from attn_worker.remote_ffn import RemoteFFN
from transport import TransportTimeout, create_transport


def test_a_silent_ffn_rank_fails_within_the_run_ahead_window() -> None:
    a = create_transport("zmq", "a0")
    f = create_transport("zmq", "f0")  # connected, alive, never replies
    a.connect({"f0": f.address()})
    f.connect({"a0": a.address()})
    try:
        ffn = RemoteFFN(a, ["f0"], timeout_s=0.2)
        x = torch.ones(3, 8)
        for layer in range(RUN_AHEAD_LAYERS):  # queued without waiting
            ffn.submit(7, layer, 0, x, None)
        start = time.monotonic()
        with pytest.raises(TransportTimeout, match=r"'f0'.*\(7, 0, 0\)"):
            ffn.submit(7, RUN_AHEAD_LAYERS, 0, x, None)
        assert time.monotonic() - start < 2.0
    finally:
        a.close()
        f.close()


def test_answered_layers_settle_and_the_step_completes() -> None:
    a = create_transport("zmq", "a0")
    f = create_transport("zmq", "f0")
    a.connect({"f0": f.address()})
    f.connect({"a0": a.address()})
    try:
        ffn = RemoteFFN(a, ["f0"], timeout_s=5.0)
        x = torch.arange(24.0).view(3, 8)
        pending = []
        for layer in range(5):
            pending.append(ffn.submit(1, layer, 0, x + layer, None))
            (got,) = f.recv("a0", (1, layer, 0), [((3, 8), torch.float32)]).wait(5)
            f.send("a0", (1, layer, 0), [got * 2])
        ffn.settle()
        for layer, p in enumerate(pending):
            assert torch.equal(p.wait(), (x + layer) * 2)
    finally:
        a.close()
        f.close()

"""A rank's session: when the rank fails, the coordinator hears one line naming the rank and
the error (it reaches clients in their error bodies), while the traceback goes to the rank's
stderr as the exception leaves."""

from __future__ import annotations

import pytest

import afd.launch.worker_spec as worker_spec
from afd.engine.messages import WorkerError
from afd.launch.worker_spec import WorkerSpec
from afd.models.loader import CheckpointError


class FakeChannel:
    sent: list[object] = []

    def __init__(self, *args) -> None:
        pass

    def send(self, msg: object) -> None:
        FakeChannel.sent.append(msg)

    def close(self) -> None:
        pass


class FakeTransport:
    def close(self) -> None:
        pass


def test_a_failed_rank_reports_one_line_without_its_traceback(monkeypatch) -> None:
    monkeypatch.setattr(worker_spec, "WorkerChannel", FakeChannel)
    monkeypatch.setattr(worker_spec, "create_transport", lambda *a, **k: FakeTransport())
    spec = WorkerSpec("a0", 0, "unused", "float32", "cpu", ["a0"], ["f0"], "tcp://unused")
    with pytest.raises(RuntimeError, match="no distribution"):
        with spec.session():
            raise RuntimeError("no distribution\nsecond line")
    (error,) = FakeChannel.sent
    assert isinstance(error, WorkerError) and error.rank_name == "a0"
    assert error.message == "rank a0 failed: RuntimeError('no distribution\\nsecond line')"
    assert "Traceback" not in error.message and "\n" not in error.message


def test_a_bad_checkpoint_exits_the_rank_with_its_message_alone(monkeypatch, capsys) -> None:
    """A checkpoint or config error is the user's to fix, not a defect: the rank says it in
    one line, to the coordinator and to its stderr, and exits 1 without a traceback."""
    monkeypatch.setattr(worker_spec, "WorkerChannel", FakeChannel)
    monkeypatch.setattr(worker_spec, "create_transport", lambda *a, **k: FakeTransport())
    FakeChannel.sent = []
    spec = WorkerSpec("f1", 1, "unused", "float32", "cpu", ["a0"], ["f0", "f1"], "tcp://unused")
    with pytest.raises(SystemExit) as exit_info:
        with spec.session():
            raise CheckpointError("/ckpt/model-00001.safetensors: cannot read it as safetensors")
    assert exit_info.value.code == 1 and exit_info.value.__suppress_context__
    (error,) = FakeChannel.sent
    assert error.message == "rank f1: /ckpt/model-00001.safetensors: cannot read it as safetensors"
    assert capsys.readouterr().err == f"afd rank f1: error: {error.message[len('rank f1: ') :]}\n"

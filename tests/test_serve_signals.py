"""A stop signal sent to afd-serve's whole process group (systemd's SIGTERM, a terminal's
Ctrl-C) drains like one sent to the server alone: in-flight streams finish and nothing of the
group is left. The coordinator and the ranks used to die of the signal at once and fail the
streams ("the coordinator exited with code 0")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import free_port


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_group_signal_drains_streams_and_leaves_nothing(tiny_ckpt, sig: int) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "afd.launch.serve", "--model", str(tiny_ckpt), "--port",
           str(port), "--served-model-name", "tiny", "--dtype", "float32", "--attn", "1x1",
           "--ffn", "1x1", "--shutdown-timeout", "60"]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own group, not pytest's
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, "no healthy afd-serve"
            time.sleep(0.5)
        first, chunks = threading.Event(), []
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 40, "ignore_eos": True,
                "stream": True}  # fmt: skip

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60)
        os.killpg(proc.pid, sig)
        reader.join(120)
        assert proc.wait(timeout=90) == 0
        finished = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert "length" in finished and "error" not in finished, finished[-3:]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert text and not any("error" in c for c in chunks)
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(proc.pid), "a process of afd-serve's group outlived it"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

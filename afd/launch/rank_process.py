"""How a launcher starts one rank and watches it: a local OS process here; the Ray launcher
provides actors behind the same small interface."""

from __future__ import annotations

import os
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable

from afd.launch.worker_spec import WorkerSpec


class RankProcess(ABC):
    name: str

    @abstractmethod
    def poll(self) -> int | None:
        """None while running, else an exit code (non-zero when it died)."""

    @abstractmethod
    def kill(self) -> None: ...

    @abstractmethod
    def wait(self, timeout_s: float) -> bool:
        """True once it has exited within timeout_s."""

    @property
    @abstractmethod
    def where(self) -> str:
        """Human-readable location for error messages (pid, node)."""


Spawner = Callable[[WorkerSpec], RankProcess]


def worker_module(spec: WorkerSpec) -> str:
    return "attn_worker.worker" if spec.name.startswith("a") else "ffn_worker.worker"


class LocalProcess(RankProcess):
    def __init__(self, spec: WorkerSpec, gpu: int | None) -> None:
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        self.name = spec.name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", worker_module(spec), spec.to_json()], env=env
        )

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout_s: float) -> bool:
        try:
            self.proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    @property
    def where(self) -> str:
        return f"pid {self.proc.pid}"


def local_spawner(gpus: dict[str, int]) -> Spawner:
    return lambda spec: LocalProcess(spec, gpus.get(spec.name))

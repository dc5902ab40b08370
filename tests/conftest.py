"""Shared fixtures: tiny random Step3 checkpoints in HF layout, made once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afd.models.tiny import make_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 layers (0 and 4 dense, 1-3 MoE), 6 experts top-3, nested text_config, 2 shards."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_step3"), seed=1)


# prompts of different lengths, as token ids (the model is random: text would not help)
PROMPTS: list[list[int]] = [
    [5, 17, 300, 42],
    [11, 250, 37, 99, 123, 7, 64, 900, 3, 45, 77, 12, 8, 501],
    [600],
    list(range(100, 140)),
]


def run_interpreted(test_file: str) -> dict:
    """Runs `python TEST_FILE` in a child with TRITON_INTERPRET=1 (it must be set before triton
    is imported, and setting it here would leak into every later test) and returns the JSON
    of its last output line: the Triton kernel tests compute all their cases there at once."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, test_file], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

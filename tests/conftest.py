"""Shared fixtures: tiny random Step3 checkpoints in HF layout, made once per session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

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


@pytest.fixture(scope="session")
def tiny_fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model as a block-FP8 checkpoint: e4m3 projections with a `weight_scale_inv`
    per 32 x 32 block (so a 2-way split of the 32-wide shared expert cuts blocks in half)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_step3_fp8"), seed=1, fp8_block=(32, 32))


def copy_ckpt(ckpt: Path, tmp_path: Path) -> Path:
    """A copy of a checkpoint to edit."""
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    return d


def edit_tensor(ckpt: Path, key: str, fn) -> None:
    """fn(tensors) edits in place the shard holding `key`, which is then written back."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    file = ckpt / index["weight_map"][key]
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def remove_tensor(ckpt: Path, key: str) -> None:
    """Drops `key` from its shard and from the index."""
    edit_tensor(ckpt, key, lambda t: t.pop(key))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


# fp8 activations round each row to e4m3: a last-bit difference upstream (a GEMM over
# fewer rows sums in another order) now and then moves an element one e4m3 step (6 %), so
# logprobs agree to ~1e-2 across micro-batch splits, not to float rounding (0.007 seen)
FP8_ACTIVATION_TOLERANCE = 2e-2

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


# The real afd-serve on the tiny checkpoint, for the tests that drive it over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(tiny_ckpt) -> Iterator[tuple[subprocess.Popen, str]]:
    """afd-serve (1+1 ranks, CPU) on a free port, healthy; terminated on exit."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "afd.launch.serve",
        "--model",
        str(tiny_ckpt),
        "--served-model-name",
        "tiny",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--block-size",
        "4",
        "--num-kv-blocks",
        "4096",
        "--attn",
        "1x1",
        "--ffn",
        "1x1",
    ]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "afd-serve exited during start-up"
            assert time.monotonic() < deadline, "afd-serve did not become healthy"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_ckpt) -> Iterator[str]:
    with serving(tiny_ckpt) as (_, url):
        yield url


@pytest.fixture(scope="module")
def client(server: str):  # -> openai.OpenAI (a test extra: imported here, not at the top)
    import openai

    # strict: every response must parse into the SDK's models exactly
    return openai.OpenAI(
        base_url=f"{server}/v1", api_key="none", max_retries=0, _strict_response_validation=True
    )

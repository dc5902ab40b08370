"""Every environment variable afd reads, in one place."""

from __future__ import annotations

import os


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name} must be a number, got {value!r}") from e


# A rank that sends no heartbeat for this long is declared dead.
HEARTBEAT_TIMEOUT_S = _float("AFD_HEARTBEAT_TIMEOUT_S", 10.0)
HEARTBEAT_INTERVAL_S = _float("AFD_HEARTBEAT_INTERVAL_S", 0.5)
# Longest a worker waits for its peer's activations, and the coordinator for a step.
RECV_TIMEOUT_S = _float("AFD_RECV_TIMEOUT_S", 20.0)
STEP_TIMEOUT_S = _float("AFD_STEP_TIMEOUT_S", 60.0)
# Layers a rank's host may queue ahead of its last finished transfers (stream-ordered nccl):
# enough to keep the GPU fed, few enough that a dead peer is noticed before CUDA's launch
# queue fills and blocks the host where no timeout runs.
RUN_AHEAD_LAYERS = int(_float("AFD_RUN_AHEAD_LAYERS", 2))
# Longest a rank may take to load its weights and report ready.
STARTUP_TIMEOUT_S = _float("AFD_STARTUP_TIMEOUT_S", 300.0)
# 1: norms and RoPE through torch's elementwise ops instead of the fused Triton kernels.
TORCH_ELEMENTWISE = os.environ.get("AFD_TORCH_ELEMENTWISE", "") == "1"
# Test hook: compute time per token per layer simulated on each stage ("attn_ms,ffn_ms"), so
# pipeline overlap shows on a machine whose tiny model computes in microseconds.
STAGE_DELAY_MS = os.environ.get("AFD_TEST_STAGE_DELAY_MS", "")


def stage_delays_s() -> tuple[float, float]:
    if not STAGE_DELAY_MS:
        return 0.0, 0.0
    attn, ffn = (float(x) / 1000 for x in STAGE_DELAY_MS.split(","))
    return attn, ffn


def ray_address() -> str | None:
    """Ray's own RAY_ADDRESS (ray.init reads it too), the default of --ray-address; empty means
    unset. Read when the flags are built, not at import, so a caller may set it first."""
    return os.environ.get("RAY_ADDRESS") or None


# Where `afd-serve` with no --model keeps the built-in tiny Step3 checkpoint.
CACHE_DIR = os.environ.get("AFD_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "afd"))

"""Fused MoE: the Triton grouped GEMMs (run by Triton's CPU interpreter at tiny shapes), the
torch._grouped_mm path and the per-expert reference, each against a float64 computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ffn_worker.kernels.fused_moe import (
    fused_moe,
    fused_moe_grouped_mm,
    fused_moe_ref,
    has_grouped_mm,
)
from ffn_worker.kernels.moe_gemm import GemmConfig, MoeConfig, align_by_expert, fused_moe_triton

ROOT = Path(__file__).resolve().parents[1]
TOPK = 3

# name -> (tokens, hidden, inter, local experts, expert_start, global experts, config).
# fp16 only under the interpreter: Triton 3.9's interpreter computes bf16 tl.dot wrongly on CPU.
G = GemmConfig
CASES = {
    "all_local": (9, 32, 16, 4, 0, 4, MoeConfig(16, G(16, 16, 4, 2), G(16, 16, 4, 2))),
    "shard_of_8": (13, 32, 16, 4, 2, 8, MoeConfig(16, G(16, 32, 4, 2), G(16, 16, 4, 2))),
    "ragged_k_wrap_n": (16, 48, 24, 4, 4, 8, MoeConfig(16, G(16, 32, 4, 2), G(32, 16, 4, 2))),
}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _inputs(tokens, hidden, inter, experts, global_experts, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)  # [T, H]
    w_gate = (torch.randn(experts, inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w_up = (torch.randn(experts, inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    scores = torch.rand(tokens, global_experts, generator=g)
    weights, ids = scores.topk(TOPK, dim=-1)  # [T, k] distinct GLOBAL ids per token
    return x, w_gate, w_up, w_down, ids.to(torch.int32), weights.to(dtype)


def _naive_f64(x, w_gate, w_up, w_down, ids, weights, start) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - start
            if 0 <= e < w_gate.shape[0]:
                xt = x[t].double()
                h = F.silu(w_gate[e].double() @ xt) * (w_up[e].double() @ xt)
                out[t] += float(weights[t, j]) * (w_down[e].double() @ h)
    return out


def run_case(name: str) -> float:
    tokens, hidden, inter, experts, start, global_experts, cfg = CASES[name]
    args = _inputs(tokens, hidden, inter, experts, global_experts, torch.float16, seed=tokens)
    out = fused_moe_triton(*args, start, cfg)
    return _rel_err(out, _naive_f64(*args, start))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    """All Triton cases in one child process with TRITON_INTERPRET=1 (it must be set before
    triton is imported, and setting it here would leak into every later test)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_float64(interpreted: dict[str, float], name: str) -> None:
    assert interpreted[name] < 1e-2  # fp16 operands and intermediate


@pytest.mark.parametrize("start", [0, 2])
def test_reference_matches_float64(start: int) -> None:
    args = _inputs(11, 32, 16, 4, 8, torch.float32, seed=start)
    assert _rel_err(fused_moe_ref(*args, start), _naive_f64(*args, start)) < 1e-5


@pytest.mark.skipif(not has_grouped_mm(), reason="torch._grouped_mm is not in this torch")
def test_grouped_mm_matches_float64() -> None:
    args = _inputs(12, 32, 16, 4, 8, torch.float32, seed=5)
    assert _rel_err(fused_moe_grouped_mm(*args, 2), _naive_f64(*args, 2)) < 1e-5


def test_no_local_expert_gives_zero() -> None:
    x, wg, wu, wd, _, weights = _inputs(5, 32, 16, 4, 8, torch.float32, seed=3)
    ids = torch.full((5, TOPK), 7, dtype=torch.int32)  # all routed off this rank
    assert torch.equal(fused_moe(x, wg, wu, wd, ids, weights, 0), torch.zeros_like(x))


def test_align_pads_each_expert_run() -> None:
    ids = torch.tensor([[0, 2, 5], [2, 1, 3]], dtype=torch.int32)  # pairs 0..5, expert 5 remote
    sorted_ids, block_expert = align_by_expert(ids, 0, 4, 2)
    pad = 6  # T*k marks padding
    assert sorted_ids.tolist()[:8] == [0, pad, 4, pad, 1, 3, 5, pad]
    assert block_expert.tolist()[:4] == [0, 1, 2, 3]
    assert (block_expert[4:] == 4).all()  # unused blocks of the upper-bound grid


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [3, 64, 300])
def test_gpu_paths_match_float64(tokens: int) -> None:
    args = _inputs(tokens, 256, 128, 8, 16, torch.bfloat16, seed=tokens)
    ref = _naive_f64(*args, 4)
    gpu = [t.cuda() for t in args]
    assert _rel_err(fused_moe_triton(*gpu, 4).cpu(), ref) < 1e-2
    assert _rel_err(fused_moe(*gpu, 4).cpu(), ref) < 1e-2
    if has_grouped_mm():
        assert _rel_err(fused_moe_grouped_mm(*gpu, 4).cpu(), ref) < 1e-2


if __name__ == "__main__":  # the interpreted child of the `interpreted` fixture
    print(json.dumps({name: run_case(name) for name in CASES}))

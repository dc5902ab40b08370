"""Fused MoE: the Triton grouped GEMMs (run by Triton's CPU interpreter at tiny shapes), the
torch._grouped_mm path and the per-expert reference, each against a float64 computation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from afd.quantization import quantize_fp8, quantize_fp8_blocks, quantize_fp8_rows
from ffn_worker.kernels.fused_moe import (
    fused_moe,
    fused_moe_grouped_mm,
    fused_moe_ref,
    has_grouped_mm,
)
from ffn_worker.kernels.moe_gemm import (
    GemmConfig,
    MoeConfig,
    fused_moe_triton,
)
from tests.conftest import run_interpreted

TOPK = 3

# name -> (tokens, hidden, inter, local experts, expert_start, global experts, config, skew).
# fp16 only under the interpreter: Triton 3.9's interpreter computes bf16 tl.dot wrongly on CPU.
# skew > 0 routes unevenly (expert e scores + skew * e): some experts get many rows, some none.
G = GemmConfig
CASES = {
    "all_local": (9, 32, 16, 4, 0, 4, MoeConfig(16, G(16, 16, 4, 2), G(16, 16, 4, 2)), 0.0),
    "shard_of_8": (13, 32, 16, 4, 2, 8, MoeConfig(16, G(16, 32, 4, 2), G(16, 16, 4, 2)), 0.0),
    "ragged_k_wrap_n": (
        16, 48, 24, 4, 4, 8, MoeConfig(16, G(16, 32, 4, 2), G(32, 16, 4, 2)), 0.0
    ),
    # rows per local expert [0, 2, 16, 45]: an empty expert, full tiles, short last tiles on
    # the small path
    "tail_tiles_uneven": (
        60, 32, 32, 4, 2, 8, MoeConfig(32, G(16, 16, 4, 2), G(16, 32, 4, 2), small_m=16), 0.3
    ),
    # rows [1, 2, 21, 52]: last tiles over small_m on the full-size path; weights through TMA
    "tma_weights": (
        72, 48, 32, 4, 2, 8,
        MoeConfig(32, G(16, 32, 4, 2, tma=True), G(32, 16, 4, 2, tma=True), small_m=16), 0.3,
    ),
}  # fmt: skip


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _inputs(tokens, hidden, inter, experts, global_experts, dtype, seed, skew=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)  # [T, H]
    w_gate = (torch.randn(experts, inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w_up = (torch.randn(experts, inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    scores = torch.rand(tokens, global_experts, generator=g) + skew * torch.arange(global_experts)
    weights, ids = scores.topk(TOPK, dim=-1)  # [T, k] distinct GLOBAL ids per token
    return x, w_gate, w_up, w_down, ids.to(torch.int32), weights.to(dtype)


def _fp8_round_trip(v: torch.Tensor) -> torch.Tensor:
    """A row as the fp8-activation path sees it: e4m3 with the row's own power-of-two scale."""
    q, scale = quantize_fp8(v, power_of_two=True)
    return q.double() * scale.double()[..., None]


def _naive_f64(x, w_gate, w_up, w_down, ids, weights, start, act_fp8=None) -> torch.Tensor:
    """act_fp8 (the activations' dtype): x and each SwiGLU row rounded to it, then through
    e4m3 with their own scales, as `fp8_activations` computes."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - start
            if 0 <= e < w_gate.shape[0]:
                xt = x[t].double() if act_fp8 is None else _fp8_round_trip(x[t])
                h = F.silu(w_gate[e].double() @ xt) * (w_up[e].double() @ xt)
                if act_fp8 is not None:
                    h = _fp8_round_trip(h.to(act_fp8))
                out[t] += float(weights[t, j]) * (w_down[e].double() @ h)
    return out


def run_case(name: str) -> float:
    tokens, hidden, inter, experts, start, global_experts, cfg, skew = CASES[name]
    dtype = torch.float16
    args = _inputs(tokens, hidden, inter, experts, global_experts, dtype, tokens, skew)
    out = fused_moe_triton(*args, start, cfg)
    return _rel_err(out, _naive_f64(*args, start))


# a block-FP8 checkpoint's layout at the cases' widths (Step3's is 128 x 128): blocks of 8
# rows by 32 columns, so tiles span several row blocks and the widths that are not multiples
# of 32 end in a partial block
FP8_BLOCK = (8, 32)


def _fp8(args: tuple, block: tuple[int, int] | None = None) -> tuple[tuple, tuple, tuple]:
    """The experts in e4m3 as --quantization fp8 stores them (one scale per output channel),
    or as a block-FP8 checkpoint does (`block`): (inputs with e4m3 weights, their scales,
    inputs with those weights dequantized: the exact math to compare with)."""
    x, *weights, ids, topk_w = args
    quantized = [quantize_fp8_rows(w) if block is None else quantize_fp8_blocks(w, block)
                 for w in weights]  # fmt: skip
    scales = tuple(s for _, s in quantized)
    fp8 = (x, *(q for q, _ in quantized), ids, topk_w)
    exact = (x, *(s.dequantize(q, torch.float32) for q, s in quantized), ids, topk_w)
    return fp8, scales, exact


def run_fp8_case(name: str, block: tuple[int, int] | None = None) -> float:
    """The same case with fp8 expert weights: the kernels widen them in registers and scale
    each output channel after the sum, or each block's partial sum (`block`)."""
    tokens, hidden, inter, experts, start, global_experts, cfg, skew = CASES[name]
    args = _inputs(tokens, hidden, inter, experts, global_experts, torch.float16, tokens, skew)
    fp8, scales, exact = _fp8(args, block)
    out = fused_moe_triton(*fp8, start, cfg, scales=scales, fp8_activations=False)
    return _rel_err(out, _naive_f64(*exact, start))


def fp8_split_case() -> dict[str, float]:
    """fp8 experts as served, on 80 tokens (30 rows per expert of 8) and on their first 40
    (15): a token's output must not depend on how many tokens share the call, since a
    micro-batch split must compute what colocated does. Widened for comparison."""
    args = _inputs(80, 32, 16, 4, 8, torch.float16, 11)
    fp8, scales, _ = _fp8(args)
    x, wg, wu, wd, ids, topk_w = fp8
    cfg = CASES["shard_of_8"][6]

    def run(n: int, **kw) -> torch.Tensor:
        head = (x[:n], wg, wu, wd, ids[:n], topk_w[:n], 2, cfg)
        return fused_moe_triton(*head, scales=scales, model_experts=8, **kw)

    whole, half = run(80), run(40)
    return {
        "split_vs_whole": _rel_err(half, whole[:40]),
        "widened_vs_served": _rel_err(run(40, fp8_activations=False), half),
    }


def run_fp8_activations_case(name: str, block: tuple[int, int] | None = None) -> float:
    """fp8 experts and fp8 activations: both products on fp8 tensor cores."""
    tokens, hidden, inter, experts, start, global_experts, cfg, skew = CASES[name]
    args = _inputs(tokens, hidden, inter, experts, global_experts, torch.float16, tokens, skew)
    fp8, scales, exact = _fp8(args, block)
    out = fused_moe_triton(*fp8, start, cfg, scales=scales, fp8_activations=True)
    return _rel_err(out, _naive_f64(*exact, start, act_fp8=torch.float16))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """All Triton cases, run interpreted in one child process."""
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_float64(interpreted: dict, name: str) -> None:
    assert interpreted[name] < 1e-2  # fp16 operands and intermediate


@pytest.mark.parametrize("name", list(CASES))
def test_triton_fp8_experts_match_float64(interpreted: dict, name: str) -> None:
    assert interpreted["fp8_" + name] < 1e-2  # against the dequantized weights in float64
    assert interpreted["fp8a8_" + name] < 1e-2  # fp8 activations too, rounded the same way


@pytest.mark.parametrize("name", list(CASES))
def test_triton_block_fp8_experts_match_float64(interpreted: dict, name: str) -> None:
    """Weights as a block-FP8 checkpoint stores them: a scale per block of FP8_BLOCK, applied
    to each K tile's sum, widened and with fp8 activations."""
    assert interpreted["fp8blk_" + name] < 1e-2
    assert interpreted["fp8blka8_" + name] < 1e-2


def test_fp8_experts_give_a_token_the_same_numbers_in_any_split(interpreted: dict) -> None:
    found = interpreted["fp8_split"]
    assert found["split_vs_whole"] < 1e-6  # fp32 sums in another order at most
    assert found["widened_vs_served"] > 1e-4  # and the served path is the fp8-x one


@pytest.mark.parametrize("block", [None, FP8_BLOCK], ids=["per_channel", "blocks"])
def test_fp8_experts_off_the_triton_path_dequantize(block: tuple[int, int] | None) -> None:
    """The CPU path takes fp8 experts by dequantizing them and rounding the activations
    through e4m3 per row, as the Triton path computes; the quantization itself stays within
    e4m3's rounding of the 16-bit weights."""
    args = _inputs(11, 40, 24, 4, 8, torch.float32, seed=9)
    fp8, scales, exact = _fp8(args, block)
    same_rounding = _naive_f64(*exact, 2, act_fp8=torch.float32)
    assert _rel_err(fused_moe(*fp8, 2, scales), same_rounding) < 1e-5
    assert 1e-3 < _rel_err(fused_moe(*fp8, 2, scales), _naive_f64(*args, 2)) < 0.1
    for w, q in zip(args[1:4], fp8[1:4], strict=True):
        assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape


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


GPU_CONFIGS = {
    "default": None,
    "small_tail": MoeConfig(64, G(64, 64, 4, 3), G(64, 64, 4, 3), small_m=16),
    "tma_8warps": MoeConfig(128, G(128, 64, 8, 3, True), G(128, 64, 8, 3, True), small_m=32),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [3, 64, 300])
@pytest.mark.parametrize("cfg", list(GPU_CONFIGS))
def test_gpu_paths_match_float64(tokens: int, cfg: str) -> None:
    args = _inputs(tokens, 256, 128, 8, 16, torch.bfloat16, tokens, skew=0.04)
    ref = _naive_f64(*args, 4)
    gpu = [t.cuda() for t in args]
    assert _rel_err(fused_moe_triton(*gpu, 4, GPU_CONFIGS[cfg]).cpu(), ref) < 1e-2
    if cfg == "default":
        assert _rel_err(fused_moe(*gpu, 4).cpu(), ref) < 1e-2
        if has_grouped_mm():
            assert _rel_err(fused_moe_grouped_mm(*gpu, 4).cpu(), ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [3, 300])
def test_gpu_fp32_activations_multiply_in_fp32(tokens: int) -> None:
    """fp32 inputs (tests, the tiny model) multiply in IEEE fp32 on the GPU as on the CPU;
    TF32's 10-bit mantissa would leave ~5e-4 here."""
    args = _inputs(tokens, 256, 128, 8, 16, torch.float32, tokens, skew=0.04)
    out = fused_moe_triton(*[t.cuda() for t in args], 4)
    assert _rel_err(out.cpu(), _naive_f64(*args, 4)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_triton_graph_capture() -> None:
    """No host sync: the whole layer captures into a CUDA graph, and replays with new routing."""
    args = [t.cuda() for t in _inputs(200, 256, 128, 8, 16, torch.bfloat16, 1, skew=0.04)]
    fused_moe_triton(*args, 4)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_triton(*args, 4)
    fresh = _inputs(200, 256, 128, 8, 16, torch.bfloat16, 2, skew=0.04)
    for dst, src in zip(args, fresh, strict=True):
        dst.copy_(src)
    graph.replay()
    assert _rel_err(out.cpu(), _naive_f64(*fresh, 4)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [3, 64, 300])
@pytest.mark.parametrize("cfg", list(GPU_CONFIGS))
@pytest.mark.parametrize("a8", [False, True], ids=["widened", "fp8_activations"])
@pytest.mark.parametrize("block", [None, (128, 128), (32, 64)], ids=["channel", "b128", "b32x64"])
def test_gpu_fp8_experts_match_float64(tokens: int, cfg: str, a8: bool, block) -> None:
    args = _inputs(tokens, 256, 128, 8, 16, torch.bfloat16, tokens, 0.04)
    fp8, scales, exact = _fp8(args, block)
    gpu = [t.cuda() for t in fp8]
    scales = tuple(s.to("cuda") for s in scales)
    out = fused_moe_triton(*gpu, 4, GPU_CONFIGS[cfg], scales=scales, fp8_activations=a8)
    ref = _naive_f64(*exact, 4, act_fp8=torch.bfloat16 if a8 else None)
    # fp8 products: 0.6-1.3e-2 from the same-rounding float64 sum on an H100 (2e-4 under the
    # interpreter, whose sums are exact), bench/NOTES-kernels.md version 16
    assert _rel_err(out.cpu(), ref) < (2e-2 if a8 else 1e-2)


if __name__ == "__main__":  # the interpreted child of the `interpreted` fixture
    found = {name: run_case(name) for name in CASES}
    found |= {"fp8_" + name: run_fp8_case(name) for name in CASES}
    found |= {"fp8a8_" + name: run_fp8_activations_case(name) for name in CASES}
    found |= {"fp8blk_" + name: run_fp8_case(name, FP8_BLOCK) for name in CASES}
    found |= {"fp8blka8_" + name: run_fp8_activations_case(name, FP8_BLOCK) for name in CASES}
    found["fp8_split"] = fp8_split_case()
    print(json.dumps(found))

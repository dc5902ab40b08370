"""Paged MFA decode attention: the Triton kernel (run by Triton's CPU interpreter at tiny shapes)
against float64, the torch reference against float64, and on a GPU the compiled kernel."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attn_worker.kernels.decode_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from attn_worker.kernels.decode_splits import choose_num_splits, graph_num_splits
from tests.conftest import run_interpreted

# name -> (dtype, heads, head_dim, page, seq_lens, num_splits, max_seq_len passed, tolerance);
# the comments count 16-token tiles.
# A given num_splits without max_seq_len sizes splits on the device (the graph-capture path).
# bf16 is left to the GPU test: Triton 3.9's interpreter computes bf16 tl.dot wrongly on CPU
# (fp16/fp32 are exact).
CASES = {
    "fp16_heuristic_splits": (torch.float16, 4, 32, 16, [1, 37, 64], None, True, 1e-2),
    # each sequence cuts itself into 3 splits of whole 16-token tiles: 20 -> 2 live + 1 empty,
    # 3 -> 1 live (stored directly), 33 -> 3 live
    "fp16_splits_some_empty": (torch.float16, 4, 16, 8, [20, 3, 33], 3, False, 1e-2),
    # 5 splits (BLOCK_S 8); 32 heads x D 64 reduce in two head chunks
    "fp16_many_splits": (torch.float16, 32, 64, 16, [70, 1, 64, 17], 5, False, 1e-2),
    # 8 splits asked, the longest (40 tokens) fills 3 tiles: 3 launched
    "fp16_splits_clamped_by_max_len": (torch.float16, 4, 32, 16, [40, 7], 8, True, 1e-2),
    "fp32_one_split_direct": (torch.float32, 4, 32, 16, [40, 17], 1, True, 1e-3),
    # pages of 32: 16-token tiles start mid-page
    "fp16_two_tiles_a_page": (torch.float16, 4, 32, 32, [45, 64, 7], 2, True, 1e-2),
}
# every case also runs with 32-token tiles: over pages of 16 (and 8) a tile spans pages and
# takes per-token page ids; 16-token tiles within pages of 16 take one page id per tile
VARIANTS = {"": {"block_n": 16}, "_n32": {"block_n": 32}}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _inputs(
    batch: int, heads: int, dim: int, page: int, seq_lens: list[int], dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(n / page) for n in seq_lens)
    num_blocks = batch * max_blocks + 3  # spare blocks that no table points at
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)  # [B, Hq, D]
    k = torch.randn(num_blocks, page, dim, generator=g).to(dtype)  # [NB, page, D]
    v = torch.randn(num_blocks, page, dim, generator=g).to(dtype)  # [NB, page, D]
    perm = torch.randperm(num_blocks, generator=g)[: batch * max_blocks]
    tables = perm.view(batch, max_blocks).to(torch.int32)  # [B, max_blocks], shuffled
    return q, k, v, tables, torch.tensor(seq_lens, dtype=torch.int32)


def _naive_f64(q, k, v, tables, seq_lens, scale) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        rows = [int(tables[b, t // k.shape[1]]) * k.shape[1] + t % k.shape[1] for t in range(n)]
        kb = k.reshape(-1, k.shape[-1])[rows].double()  # [L, D]
        vb = v.reshape(-1, v.shape[-1])[rows].double()  # [L, D]
        for h in range(q.shape[1]):
            s = (kb @ q[b, h].double()) * scale  # [L]
            p = torch.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ vb
    return out


def test_reference_matches_float64() -> None:
    q, k, v, tables, lens = _inputs(3, 4, 16, 8, [1, 13, 24], torch.float32, seed=1)
    ref = paged_decode_attention_ref(q, k, v, tables, lens, 0.25)
    assert _rel_err(ref, _naive_f64(q, k, v, tables, lens, 0.25)) < 1e-5


def test_cpu_dispatch_uses_reference() -> None:
    q, k, v, tables, lens = _inputs(2, 4, 16, 8, [5, 16], torch.float32, seed=2)
    out = paged_decode_attention(q, k, v, tables, lens, 0.25)
    assert torch.equal(out, paged_decode_attention_ref(q, k, v, tables, lens, 0.25))


def run_case(name: str, seed: int, **knobs) -> float:
    dtype, heads, dim, page, lens, num_splits, pass_max, _ = CASES[name]
    q, k, v, tables, seq_lens = _inputs(len(lens), heads, dim, page, lens, dtype, seed=seed)
    out = torch.full_like(q, float("nan"))  # poisoned: unwritten elements show
    max_len = max(lens) if pass_max else None
    paged_decode_attention_triton(
        q, k, v, tables, seq_lens, dim**-0.5, max_len, num_splits=num_splits, out=out, **knobs,
    )  # fmt: skip
    return _rel_err(out, _naive_f64(q, k, v, tables, seq_lens, dim**-0.5))  # NaN fails


def run_fp8_case(**knobs) -> float:
    q, k, v, tables, lens = _inputs(2, 8, 32, 16, [29, 48], torch.float16, seed=7)
    g = torch.Generator().manual_seed(8)
    k_scale = torch.rand(k.shape[:2], generator=g) + 0.5  # [NB, page] float32, per token
    v_scale = torch.rand(k.shape[:2], generator=g) + 0.5
    k8 = (k.float() / 2).to(torch.float8_e4m3fn)
    v8 = (v.float() / 2).to(torch.float8_e4m3fn)
    out = paged_decode_attention_triton(
        q, k8, v8, tables, lens, 0.2, k_scale=k_scale, v_scale=v_scale, num_splits=2, **knobs,
    )  # fmt: skip
    return _rel_err(out, paged_decode_attention_ref(q, k8, v8, tables, lens, 0.2, k_scale, v_scale))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    """All Triton cases, run interpreted in one child process."""
    return run_interpreted(__file__)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_float64(interpreted: dict[str, float], name: str, variant: str) -> None:
    assert interpreted[name + variant] < CASES[name][-1]


@pytest.mark.parametrize("name", list(CASES))
def test_triton_second_call_reuses_workspace(interpreted: dict[str, float], name: str) -> None:
    # fresh inputs through the cached partial buffers the first calls left behind
    assert interpreted[name + "_again"] < CASES[name][-1]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_fp8_kv_matches_reference(interpreted: dict[str, float], variant: str) -> None:
    assert interpreted["fp8" + variant] < 1e-2


def test_split_count_model_picks_the_measured_fastest() -> None:
    # 32 sequences on 132 SMs: 4 splits fill one wave; 128 sequences need no split
    assert choose_num_splits(32, 4096, 64, 132) == 4
    assert choose_num_splits(32, 4096, 32, 132) == 4  # the default 32-token tiles
    assert choose_num_splits(128, 4096, 64, 132) == 1
    assert choose_num_splits(1, 64, 64, 132) == 1
    # 64 programs stream at ~2x their share of bandwidth: no reduce pays at 4K, it does at 8K
    assert choose_num_splits(64, 4096, 32, 132) == 1
    assert choose_num_splits(64, 8192, 32, 132) == 2


def _gpu_inputs(
    lens: list[int], dtype: torch.dtype, seed: int, page: int = 64
) -> tuple[torch.Tensor, ...]:
    q, k, v, tables, seq_lens = _inputs(len(lens), 64, 256, page, lens, dtype, seed=seed)
    return tuple(t.cuda() for t in (q, k, v, tables, seq_lens))


def _gpu_ref(q, k, v, tables, lens, k_scale=None, v_scale=None) -> torch.Tensor:
    args = [t.cpu() if t is not None else None for t in (q, k, v, tables, lens)]
    scales = [t.cpu() if t is not None else None for t in (k_scale, v_scale)]
    return paged_decode_attention_ref(*args, 256**-0.5, *scales)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_step3_shape(dtype) -> None:
    q, k, v, tables, lens = _gpu_inputs([1, 300, 4096, 2500], dtype, seed=3)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention_triton(q, k, v, tables, lens, 256**-0.5, out=out)
    assert _rel_err(out.cpu(), _gpu_ref(q, k, v, tables, lens)) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("page", [64, 16])  # 16 (serving's default): tiles span pages
def test_gpu_uneven_splits_repeated(page: int) -> None:
    # 8 splits of 512: short sequences leave splits empty or fit in one; run twice, fresh inputs
    for seed in (4, 5):
        lens = [4096, 1, 513, 3000, 64, 4095]
        q, k, v, tables, lens = _gpu_inputs(lens, torch.bfloat16, seed, page)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention_triton(q, k, v, tables, lens, 256**-0.5, 4096, num_splits=8, out=out)
        assert _rel_err(out.cpu(), _gpu_ref(q, k, v, tables, lens)) < 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_fp8_kv() -> None:
    q, k, v, tables, lens = _gpu_inputs([2048, 700, 1500], torch.bfloat16, seed=6)
    k_scale = torch.rand(k.shape[:2], device="cuda") + 0.5  # [NB, page] float32, per token
    v_scale = torch.rand(k.shape[:2], device="cuda") + 0.5
    k8, v8 = (k.float() / 2).to(torch.float8_e4m3fn), (v.float() / 2).to(torch.float8_e4m3fn)
    out = paged_decode_attention_triton(
        q, k8, v8, tables, lens, 256**-0.5, k_scale=k_scale, v_scale=v_scale
    )
    assert _rel_err(out.cpu(), _gpu_ref(q, k8, v8, tables, lens, k_scale, v_scale)) < 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_graph_replay() -> None:
    # captured once without a max length, replayed at other lengths (the serving graphs' use)
    q, k, v, tables, lens = _gpu_inputs([4096, 17, 2048, 1200], torch.bfloat16, seed=7)
    splits = graph_num_splits(4, 4096)
    call = lambda: paged_decode_attention(  # noqa: E731
        q, k, v, tables, lens, 256**-0.5, num_splits=splits
    )
    call()  # warm-up: compile and size the cached workspace outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for seed, new_lens in ((8, [4096, 1, 700, 64]), (9, [100, 4096, 2049, 3000])):
        # same shapes (the longest is 4096 each time), other lengths and contents
        for dst, src in zip(
            (q, k, v, tables, lens), _gpu_inputs(new_lens, q.dtype, seed), strict=True
        ):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        assert _rel_err(out.cpu(), _gpu_ref(q, k, v, tables, lens)) < 1e-2


if __name__ == "__main__":  # the interpreted child of the `interpreted` fixture
    results = {
        name + variant: run_case(name, seed=i, **knobs)
        for i, name in enumerate(CASES)
        for variant, knobs in VARIANTS.items()
    }
    again = {name + "_again": run_case(name, 100 + i, block_n=16) for i, name in enumerate(CASES)}
    results.update(again)
    results.update({"fp8" + variant: run_fp8_case(**knobs) for variant, knobs in VARIANTS.items()})
    print(json.dumps(results))

"""The MoE's routing alignment (ffn_worker/kernels/moe_align.py): each local expert's pairs in
pair order, the tile list over them; run by Triton's CPU interpreter, and on a GPU where the
order once followed the atomics and the fp8 experts' output then changed from run to run. The
interpreter runs programs one after another, so there atomic order was pair order too: only
the GPU tests fail for a scatter in atomic order (they did, on an H100)."""

from __future__ import annotations

import json

import pytest
import torch

from afd.quantization import quantize_fp8_rows
from ffn_worker.kernels.moe_align import align_by_expert
from ffn_worker.kernels.moe_gemm import GemmConfig, MoeConfig, fused_moe_triton
from tests.conftest import run_interpreted

TOPK = 3


def _routing(tokens: int, experts: int, skew: float, seed: int) -> torch.Tensor:
    """top-3 ids, expert e scored + skew * e: some experts get many pairs, some none."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g) + skew * torch.arange(experts)
    return scores.topk(TOPK, dim=-1).indices.to(torch.int32)


def _expected_rows(ids: torch.Tensor, start: int, local: int) -> list[int]:
    """The order align_by_expert promises: local experts' pairs by expert, each in pair order,
    then the other ranks' pairs in pair order."""
    flat = ids.flatten() - start
    bucket = torch.where((flat >= 0) & (flat < local), flat, local)
    return torch.sort(bucket, stable=True).indices.tolist()


def align_cases() -> dict[str, list]:
    """align_by_expert on a hand-made routing and on skewed random ones (run interpreted);
    2000 tokens are 6000 pairs, 47 programs of the count and scatter kernels, and 25000 are
    75000, past the 64K pairs where the programs take bigger blocks."""
    ids = torch.tensor([[0, 2, 5], [2, 1, 3]], dtype=torch.int32)  # pairs 0..5, expert 5 remote
    tiles = align_by_expert(ids, 0, 4, 2)
    found = {"hand": [tiles.sorted_ids.tolist(), tiles.tile_meta.tolist()]}
    for tokens, block_m, skew in [(50, b, s) for b in (1, 4, 16) for s in (0.0, 1.0, 10.0)] + [
        (2000, 16, 0.3),
        (25000, 64, 0.3),
    ]:
        ids = _routing(tokens, 8, skew, tokens + block_m)
        tiles = align_by_expert(ids, 2, 4, block_m)
        found[f"rand_{block_m}_{skew}_{tokens}"] = [
            ids.tolist(),
            tiles.sorted_ids.tolist(),
            tiles.tile_meta.tolist(),
        ]
    return found


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """All cases, run interpreted in one child process."""
    return run_interpreted(__file__)


def test_align_tiles_each_expert_run(interpreted: dict) -> None:
    sorted_ids, meta = interpreted["hand"]
    # by expert, each in pair order, the remote pair last
    assert sorted_ids == [0, 4, 1, 3, 5, 2]
    # (expert, its first tile, its first row, its rows) per tile; expert 4 = past the last tile
    assert meta[:4] == [[0, 0, 0, 1], [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 4, 1]]
    assert all(row[0] == 4 for row in meta[4:])


def test_align_groups_every_pair_in_order(interpreted: dict) -> None:
    """Whatever the routing: each expert's rows hold exactly its pairs in pair order, and the
    upper-bound tile list holds every tile, in expert order."""
    for name, found in interpreted.items():
        if name == "hand":
            continue
        ids, sorted_ids, meta = found
        block_m = int(name.split("_")[1])
        ids = torch.tensor(ids)
        assert sorted_ids == _expected_rows(ids, 2, 4), name
        local = ids.flatten() - 2  # [P], experts 2..5 are local
        row = 0
        for e in range(4):
            count = int((local == e).sum())
            tiles = [m for m in meta if m[0] == e]
            assert len(tiles) == -(-count // block_m)
            assert all(m[2:] == [row, count] for m in tiles)
            row += count
        experts = [m[0] for m in meta]
        assert experts == sorted(experts) and experts[-1] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [64, 4096, 25000])
def test_gpu_align_keeps_pair_order(tokens: int) -> None:
    """On a GPU too, where the scatter's atomics once set the order within an expert: Step3's
    48 experts, all local and a rank's 12 of them."""
    ids = _routing(tokens, 48, 0.02, tokens)
    for start, local in ((0, 48), (12, 12)):
        tiles = align_by_expert(ids.cuda(), start, local, 64)
        assert tiles.sorted_ids.cpu().tolist() == _expected_rows(ids, start, local)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp8_experts_with_short_tiles_repeat() -> None:
    """e4m3 experts with fp8 activations and short last tiles: the same inputs give the same
    output on every run (fp32 output, so only the down kernel's atomics may differ, in the
    last bits). A short tile sums e4m3 products otherwise than a full one, so a pair that
    lands in another tile gets other numbers: in atomic order this differed by ~1 %. (fp32 x
    takes K tiles of 64 and two stages, not the served bf16 tiles; 13 of the 32 experts end
    in a short tile.)"""
    torch.manual_seed(0)
    tokens, hidden, inter, experts = 1024, 2048, 1024, 32  # ~96 rows an expert, last tile ~32
    x = torch.randn(tokens, hidden, device="cuda")
    ids = _routing(tokens, experts, 0.0, 1).cuda()
    weights = torch.rand(tokens, TOPK, device="cuda")
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    quantized = [quantize_fp8_rows(torch.randn(experts, *s, device="cuda") * 0.02) for s in shapes]
    fp8, scales = [w for w, _ in quantized], tuple(s for _, s in quantized)
    g = GemmConfig
    cfg = MoeConfig(64, g(64, 128, 4, 3), g(128, 128, 4, 3), small_m=32)
    runs = [
        fused_moe_triton(x, *fp8, ids, weights, 0, cfg, scales, fp8_activations=True)
        for _ in range(4)
    ]
    scale = float(runs[0].abs().max())
    for out in runs[1:]:
        assert float((out - runs[0]).abs().max()) <= 1e-5 * scale


if __name__ == "__main__":  # the interpreted child of the `interpreted` fixture
    print(json.dumps(align_cases()))

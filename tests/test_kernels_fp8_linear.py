"""The e4m3-weight GEMM (attn_worker/kernels/fp8_linear.py) against float64 over the same
dequantized weights: run by Triton's CPU interpreter at small shapes (in a child process), and
on a GPU at Step3's projection widths."""

from __future__ import annotations

import json

import pytest
import torch

from afd.quantization import BlockScales, quantize_fp8, quantize_fp8_blocks, quantize_fp8_rows
from attn_worker.kernels.fp8_linear import (
    LinearConfig,
    default_config,
    fp8_linear,
)
from attn_worker.kernels.fp8_rows import quantize_rows_fp8
from tests.conftest import run_interpreted

C = LinearConfig
# name -> (M, N, K, weight block or None (one scale per output channel), config, fp8 x)
CASES = {
    "channel": (5, 48, 64, None, C(16, 16, 32, 4, 2), False),
    "blocks": (5, 48, 64, (16, 32), C(16, 16, 32, 4, 2), False),
    # K split in 3 (atomics), a ragged last split, K and N not multiples of the blocks
    "split_ragged": (9, 40, 88, (16, 32), C(16, 32, 32, 4, 2, splits=3), False),
    "channel_split": (9, 40, 88, None, C(16, 32, 16, 4, 2, splits=2), False),
    # fp8 activations: x per row to e4m3, both operands on fp8 tensor cores
    "a8_blocks": (20, 48, 64, (16, 32), C(16, 16, 32, 4, 2), True),
    "a8_channel_split": (20, 40, 96, None, C(16, 16, 32, 4, 2, splits=2), True),
}


def _inputs(m, n, k, block, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) / k**0.5
    w8, scales = quantize_fp8_rows(w[None]) if block is None else quantize_fp8_blocks(w, block)
    if block is None:  # the per-channel helper takes stacked [E, N, K] weights
        w8, scales = w8[0], type(scales)(scales.scale[0], scales.block)
    return x, w8, scales


def _reference(x, w8, scales, a8: bool) -> torch.Tensor:
    """float64 over the dequantized weight; with fp8 x, over x's per-row e4m3 rounding."""
    if a8:
        q, s = quantize_fp8(x, power_of_two=True)
        x = q.double() * s.double()[:, None]
    return x.double() @ scales.dequantize(w8, torch.float64).T


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def cases() -> dict:
    found = {}
    for name, (m, n, k, block, cfg, a8) in CASES.items():
        for dtype in (torch.float16, torch.float32):
            x, w8, scales = _inputs(m, n, k, block, dtype, seed=m + n)
            out = fp8_linear(x, w8, scales, cfg, fp8_activations=a8)
            found[f"{name}_{dtype}"] = [_rel_err(out, _reference(x, w8, scales, a8)),
                                        str(out.dtype), list(out.shape)]  # fmt: skip
    found["invariant"] = batch_invariance_case()
    found["row_scales"] = row_scales_case()
    _, w8, scales = _inputs(1, 48, 64, (16, 32), torch.float16, seed=0)
    found["no_rows"] = list(fp8_linear(torch.empty(0, 64, dtype=torch.float16), w8, scales).shape)
    return found


def _rows_unchanged(x, w8, scales, counts, config=None) -> dict[int, bool]:
    """Whether the first m rows of x come out the same bits alone as with all of x."""
    full = fp8_linear(x, w8, scales, config)
    return {m: torch.equal(fp8_linear(x[:m], w8, scales, config), full[:m]) for m in counts}


def batch_invariance_case() -> dict:
    """fp8 x on the served tiles, whose columns a program takes change with the rows: 32 up
    to 64 rows, 64 for all 192 (blocks of 16 x 32 at N=1280, and per channel at N=2816:
    negative keys). The pre-invariance rule (K split by the grid: 8 ways for one row tile
    and 4 for three with the blocks, 2 and 1 per channel) fails both at 5 and 64 rows."""
    found = {}
    for block, n, sign in (((16, 32), 1280, 1), (None, 2816, -1)):
        x, w8, scales = _inputs(192, n, 1024, block, torch.float16, seed=3)
        assert default_config(5, n, 1024, 132, scales).block_n == 32
        assert default_config(192, n, 1024, 132, scales).block_n == 64
        counts = (1, 5, 64, 65, 191)
        found.update({sign * m: v for m, v in _rows_unchanged(x, w8, scales, counts).items()})
    return found


def _scale_rows() -> torch.Tensor:
    """Rows whose largest magnitude sits on a power-of-two boundary of the scale (448 x 2^e),
    one float above it and below it, a zero row, and rows over 12 decades."""
    tops = []
    for e in (-10, 0, 7):
        top = torch.tensor(448.0 * 2.0**e)
        tops += [top, torch.nextafter(top, top * 2), -torch.nextafter(top, top * 0)]
    rows = torch.zeros(len(tops), 256)
    rows[:, 5] = torch.stack(tops)
    g = torch.Generator().manual_seed(4)
    spread = torch.randn(6, 256, generator=g) * torch.logspace(-6, 6, 6)[:, None]
    return torch.cat([rows, spread, torch.zeros(1, 256)])


def row_scales_case() -> list[bool]:
    """The row quantizer's power-of-two scales (its Triton bit trick) against torch's,
    bit for bit, per row (the interpreter's e4m3 codes are not checked: it converts
    wrongly)."""
    x = _scale_rows()
    _, got = quantize_rows_fp8(x)
    _, want = quantize_fp8(x, power_of_two=True)
    return [bool(a) for a in got.view(torch.int32) == want.view(torch.int32)]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_fp8_linear_matches_float64(interpreted: dict, name: str, dtype) -> None:
    err, out_dtype, shape = interpreted[f"{name}_{dtype}"]
    m, n = CASES[name][:2]
    assert out_dtype == str(dtype) and shape == [m, n]
    assert err < (2e-3 if dtype == torch.float16 else 1e-5)


def test_a_row_gives_the_same_bits_whatever_rows_share_the_call(interpreted: dict) -> None:
    """Batch invariance (a micro-batch split computes what the whole batch does): 1-191 rows
    of 192 through the served tiles, block and per-channel weight scales."""
    found = interpreted["invariant"]
    assert found == {str(sign * m): True for m in (1, 5, 64, 65, 191) for sign in (1, -1)}


def test_row_quantizer_scales_are_torchs_powers_of_two(interpreted: dict) -> None:
    assert interpreted["row_scales"] == [True] * len(_scale_rows())


def _blocks(n: int, k: int, cols: int = 128) -> BlockScales:
    return BlockScales(torch.ones(-(-n // 128), -(-k // cols)), (128, cols))


def test_no_rows_give_an_empty_output(interpreted: dict) -> None:
    assert interpreted["no_rows"] == [0, 48]


def test_default_config_never_splits_k_as_served() -> None:
    """On 132 SMs, as served (fp8 x): no K split at any row count; 32 columns a program for
    decode rows (6 stages over o_proj's long K, 4 over wq's), then 64 while the 128-column
    grid is short of the SMs (o_proj at 128 rows), else 128. Widened: 32-column tiles, K split
    to 64 KiB of weight a program, except where the columns alone fill the SMs twice (wq). K
    tiles divide the scale blocks along K, and never go under 32 (e4m3 operands); one scale
    along K sets no limit."""
    o_proj = lambda m: default_config(m, 7168, 16384, 132, _blocks(7168, 16384))  # noqa: E731
    assert o_proj(32) == LinearConfig(64, 32, 128, 4, 6, 1)
    assert o_proj(128) == LinearConfig(64, 64, 128, 4, 4, 1)
    assert o_proj(2048) == LinearConfig(64, 128, 128, 4, 4, 1)
    assert default_config(8, 16384, 2048, 132, _blocks(16384, 2048)).num_stages == 4
    widened = default_config(8, 7168, 16384, 132, _blocks(7168, 16384), widened=True)
    assert (widened.block_m, widened.block_n, widened.splits) == (16, 32, 8)
    assert default_config(8, 16384, 2048, 132, _blocks(16384, 2048), widened=True).splits == 1
    assert default_config(8, 64, 192, 132, _blocks(64, 192, 96)).block_k == 32
    channel = BlockScales(torch.ones(64, 1), (1, 200))
    assert default_config(8, 64, 200, 132, channel).block_k == 128
    with pytest.raises(ValueError, match="multiple of 32"):
        default_config(8, 64, 96, 132, _blocks(64, 96, 48))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 32, 256, 1000])
@pytest.mark.parametrize("block", [None, (128, 128)], ids=["channel", "b128"])
@pytest.mark.parametrize(("n", "k"), [(7168, 16384), (2560, 7168)], ids=["o_proj", "qkv"])
def test_gpu_fp8_linear_at_step3_widths(m: int, block, n: int, k: int) -> None:
    """bf16 x as served (per row to e4m3; plus the fp8 tensor cores' short running sums),
    at decode rows, a prefill chunk, and rows in between."""
    x, w8, scales = _inputs(m, n, k, block, torch.bfloat16, seed=m)
    out = fp8_linear(x.cuda(), w8.cuda(), scales.to("cuda"))
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert _rel_err(out.cpu(), _reference(x, w8, scales, a8=True)) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block", [None, (128, 128)], ids=["channel", "b128"])
@pytest.mark.parametrize(("n", "k"), [(7168, 16384), (2560, 7168)], ids=["o_proj", "qkv"])
def test_gpu_fp8_linear_rows_are_batch_invariant(block, n: int, k: int) -> None:
    """As served, at Step3's widths: the first m of 2048 bf16 rows give the same bits alone,
    from decode rows (32 columns a program) to a prefill chunk (64 or 128)."""
    x, w8, scales = _inputs(2048, n, k, block, torch.bfloat16, seed=n)
    found = _rows_unchanged(x.cuda(), w8.cuda(), scales.to("cuda"), (1, 3, 64, 65, 700))
    assert found == {m: True for m in (1, 3, 64, 65, 700)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_row_quantization_equals_torch(dtype) -> None:
    """The one-launch row quantizer (the fp8-activation path's) stores the bytes and scales
    torch's quantize_fp8 (power-of-two scales) computes on CUDA; a zero row stays zero."""
    x = (torch.randn(37, 16384) * torch.logspace(-3, 3, 37)[:, None]).to(dtype)
    x[5] = 0
    x = torch.cat([x, torch.nn.functional.pad(_scale_rows(), (0, 16384 - 256)).to(dtype)]).cuda()
    q, s = quantize_rows_fp8(x)
    want_q, want_s = quantize_fp8(x, power_of_two=True)
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


if __name__ == "__main__":  # the interpreted child of the `interpreted` fixture
    print(json.dumps(cases()))

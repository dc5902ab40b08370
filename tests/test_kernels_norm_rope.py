"""Fused RMSNorm (with and without the residual add) and fused RoPE: the Triton kernels (run by
Triton's CPU interpreter at small shapes, in a child process) against the torch path of
afd.models.layers, which they replace on CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from afd.models import layers
from afd.models.layers import RMSNorm, Rope
from attn_worker.kernels.rms_norm import add_rms_norm, rms_norm
from attn_worker.kernels.rope import rope_qk
from tests.conftest import run_interpreted

# bf16 only on the GPU: Triton's CPU interpreter converts to bf16 without round-to-nearest
# (1-2 ulp off here where fp16 is exact), see test_gpu_step3_widths_match_torch
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# fp32: the kernels sum the squares in another order than torch.mean, a few ulps apart; 16-bit
# outputs: a value that lands on a rounding boundary may round the other way, then times w
FP32_ULPS, LOW_PRECISION_ULPS = 4.0, 2.0
# (rows, width): a power of two, a ragged width, one row
NORM_SHAPES = [(5, 64), (3, 48), (1, 100)]
# (tokens, q heads, k heads, head dim): Step3's one KV head, a non-power-of-two half dim
ROPE_SHAPES = [(4, 8, 1, 32), (3, 3, 1, 24), (1, 2, 2, 16)]


def _max_ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference in units of the reference's dtype resolution at each value."""
    eps = torch.finfo(ref.dtype).eps
    diff = (out.double() - ref.double()).abs()
    return float((diff / (ref.double().abs().clamp_min(1e-3) * eps)).max())


def norm_cases() -> dict[str, float]:
    found = {}
    g = torch.Generator().manual_seed(0)
    for name, dtype in DTYPES.items():
        for rows, width in NORM_SHAPES:
            norm = RMSNorm(width, 1e-6).to(dtype)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.1 * torch.randn(width, generator=g))
            h = torch.randn(rows, width, generator=g).to(dtype)
            delta = torch.randn(rows, width, generator=g).to(dtype)
            if name == "fp16" and rows > 1:  # every other row of a wider buffer: strided rows
                wide = torch.randn(2 * rows, width + 8, generator=g).to(dtype)
                h = wide[::2, :width]
            tag = f"{name}_{rows}x{width}"
            with torch.no_grad():
                found[f"norm_{tag}"] = _max_ulps(rms_norm(h, norm.weight, 1e-6), norm(h))
                total, x = add_rms_norm(h, delta, norm.weight, 1e-6)
                found[f"add_sum_{tag}"] = float((total.double() - (h + delta).double()).abs().max())
                found[f"add_norm_{tag}"] = _max_ulps(x, norm(h + delta))
    empty, weight = torch.empty(0, 64, dtype=torch.float16), torch.ones(64, dtype=torch.float16)
    total, x = add_rms_norm(empty, empty, weight, 1e-6)
    found["zero_rows"] = [list(t.shape) for t in (total, x, rms_norm(empty, weight, 1e-6))]
    return found


def rope_cases() -> dict[str, float]:
    found = {}
    g = torch.Generator().manual_seed(1)
    for name, dtype in DTYPES.items():
        for tokens, hq, hk, dim in ROPE_SHAPES:
            cos, sin = Rope(dim, 10000.0).cos_sin(torch.randint(0, 5000, (tokens,), generator=g))
            q = torch.randn(tokens, hq, dim, generator=g).to(dtype)
            if name == "fp16":  # every other head of a wider buffer: strided heads
                q = torch.randn(tokens, 2 * hq, dim, generator=g).to(dtype)[:, ::2]
            k = torch.randn(tokens, hk, dim, generator=g).to(dtype)
            q_out, k_out = rope_qk(q, k, cos, sin)
            tag = f"{name}_{tokens}x{hq}x{hk}x{dim}"
            found[f"rope_q_{tag}"] = _max_ulps(q_out, Rope.apply(q, cos, sin))
            found[f"rope_k_{tag}"] = _max_ulps(k_out, Rope.apply(k, cos, sin))
    return found


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(__file__)


def test_rms_norm_matches_torch(interpreted: dict) -> None:
    norms = {k: v for k, v in interpreted.items() if k.startswith(("norm_", "add_norm_"))}
    assert len(norms) == 2 * len(DTYPES) * len(NORM_SHAPES)
    assert all(v <= (FP32_ULPS if "fp32" in k else 1.0) for k, v in norms.items()), norms


def test_add_rms_norm_returns_the_rounded_sum(interpreted: dict) -> None:
    sums = {k: v for k, v in interpreted.items() if k.startswith("add_sum_")}
    assert len(sums) == len(DTYPES) * len(NORM_SHAPES)
    assert all(v == 0.0 for v in sums.values()), sums  # h + delta exactly as torch rounds it


def test_rope_matches_torch(interpreted: dict) -> None:
    ropes = {k: v for k, v in interpreted.items() if k.startswith("rope_")}
    assert len(ropes) == 2 * len(DTYPES) * len(ROPE_SHAPES)
    assert all(v <= (FP32_ULPS if "fp32" in k else 1.0) for k, v in ropes.items()), ropes


def test_zero_rows(interpreted: dict) -> None:
    assert interpreted["zero_rows"] == [[0, 64]] * 3


def test_torch_path_add_equals_add_then_norm() -> None:
    """RMSNorm.add off CUDA is the plain residual add followed by the norm."""
    norm = RMSNorm(32, 1e-6)
    h, delta = torch.randn(4, 32), torch.randn(4, 32)
    total, x = norm.add(h, delta)
    assert torch.equal(total, h + delta) and torch.equal(x, norm(h + delta))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_step3_widths_match_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 at Step3's widths (7168 hidden, 2048 shared q, 64 q heads of 256): the layers'
    fused CUDA path against their torch path."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for width in (7168, 2048):
        norm = RMSNorm(width, 1e-5).cuda().bfloat16()
        h = torch.randn(37, width, device="cuda", generator=g).bfloat16()
        delta = torch.randn(37, width, device="cuda", generator=g).bfloat16()
        with torch.no_grad():
            fused_total, fused_x = norm.add(h, delta)
            monkeypatch.setattr(layers, "FUSED_KERNELS", False)
            total, x = norm.add(h, delta)
            monkeypatch.setattr(layers, "FUSED_KERNELS", True)
        assert torch.equal(fused_total, total)
        assert _max_ulps(fused_x, x) <= LOW_PRECISION_ULPS
    cos, sin = Rope(256, 5e5).cos_sin(torch.arange(37, device="cuda") * 97)
    q = torch.randn(37, 64, 256, device="cuda", generator=g).bfloat16()
    k = torch.randn(37, 1, 256, device="cuda", generator=g).bfloat16()
    q_out, k_out = Rope.apply_qk(q, k, cos, sin)
    assert _max_ulps(q_out, Rope.apply(q, cos, sin)) <= LOW_PRECISION_ULPS
    assert _max_ulps(k_out, Rope.apply(k, cos, sin)) <= LOW_PRECISION_ULPS


if __name__ == "__main__":  # the interpreted child (see tests/conftest.py: run_interpreted)
    print(json.dumps(norm_cases() | rope_cases()))

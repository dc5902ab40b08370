"""Prefill attention (`attend`): causal over the last n of L positions with one shared KV head,
against a float64 loop; on a GPU it must run on FlashAttention, not SDPA's math kernel."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attn_worker.attention import attend


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Position L-n+i attends keys 0..L-n+i, every head over the one KV head; float64."""
    q, k, v = q.double(), k.double(), v.double()
    n, length = q.shape[0], k.shape[0]
    out = torch.empty_like(q)
    for i in range(n):
        keys = length - n + i + 1
        probs = torch.softmax(q[i] @ k[:keys].T * scale, dim=-1)  # [Hq, keys]
        out[i] = probs @ v[:keys]
    return out


@pytest.mark.parametrize(("n", "length"), [(1, 7), (5, 5), (5, 12), (16, 40)])
def test_attend_is_causal_over_the_last_positions(n: int, length: int) -> None:
    g = torch.Generator().manual_seed(n * 100 + length)
    q = torch.randn(n, 4, 8, generator=g)
    k, v = torch.randn(length, 8, generator=g), torch.randn(length, 8, generator=g)
    got = attend(q, k, v, 0.3).double()  # float32 math
    torch.testing.assert_close(got, _naive(q, k, v, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention needs a CUDA GPU")
def test_attend_runs_on_flash_attention_at_step3_shapes() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(300, 64, 256, **kw)  # 300 new tokens of a 1000-token context
    k, v = torch.randn(1000, 256, **kw), torch.randn(1000, 256, **kw)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot take it
        out = attend(q, k, v, 256**-0.5)
    ref = _naive(q.cpu(), k.cpu(), v.cpu(), 256**-0.5)
    assert float((out.cpu().double() - ref).norm() / ref.norm()) < 1e-2

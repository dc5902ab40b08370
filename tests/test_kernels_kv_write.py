"""The one-launch KV-cache write against KVCache.write's torch path, which it replaces on CUDA:
the same stored bytes (and fp8 scales). Copies run under Triton's CPU interpreter (in a child
process); fp8 only on a GPU, since the interpreter converts to e4m3 wrongly (126.8 -> 64 where
the GPU and torch give 128)."""

from __future__ import annotations

import json

import pytest
import torch

from afd.models import layers
from attn_worker.kernels.kv_write import kv_write
from attn_worker.kv_cache import KVCache
from tests.conftest import run_interpreted

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # copies
LAYERS, BLOCKS, BLOCK_SIZE, DIM = 2, 5, 4, 32


def _filled(dtype: torch.dtype, kv_cache_dtype: str, device: str = "cpu") -> KVCache:
    """A cache whose every slot holds something, so a write to the wrong slot shows."""
    cache = KVCache(LAYERS, BLOCKS, BLOCK_SIZE, DIM, dtype, device, kv_cache_dtype)
    g = torch.Generator().manual_seed(1)
    for layer in range(LAYERS):
        rows = BLOCKS * BLOCK_SIZE
        old = torch.randn(2, rows, DIM, generator=g).to(device, dtype)
        cache.write(layer, torch.arange(rows, device=device), old[0], old[1])
    return cache


def _step(dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """k and v as column slices of one wider projection output (strided rows), slots out of
    order, one zero vector (its fp8 scale is 0)."""
    g = torch.Generator().manual_seed(0)
    qkv = (4 * torch.randn(6, 3 * DIM, generator=g)).to(device, dtype)
    qkv[2, DIM:] = 0
    slots = torch.tensor([17, 0, 5, 6, 19, 2], device=device)
    return qkv[:, DIM : 2 * DIM], qkv[:, 2 * DIM :], slots


def _state(cache: KVCache) -> list[torch.Tensor]:
    tensors = [cache.k, cache.v]
    if cache.fp8:
        tensors = [t.view(torch.uint8) for t in tensors] + [cache.k_scale, cache.v_scale]
    return tensors


def cases() -> dict:
    found = {}
    for name, dtype in DTYPES.items():
        k, v, slots = _step(dtype)
        ref, got = _filled(dtype, "auto"), _filled(dtype, "auto")
        ref.write(1, slots, k, v)  # the torch path (CPU)
        kv_write(k, v, slots, got.k[1], got.v[1])
        found[name] = [torch.equal(a, b) for a, b in zip(_state(ref), _state(got), strict=True)]
        found[name + "_changed"] = not torch.equal(ref.k, _filled(dtype, "auto").k)
    return found


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(DTYPES))
def test_kv_write_stores_what_the_torch_path_stores(interpreted: dict, name: str) -> None:
    assert interpreted[name + "_changed"]  # the write did something
    assert all(interpreted[name]), interpreted[name]  # K and V: the same bits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cache_write_fused_matches_torch(monkeypatch, kv_cache_dtype, dtype) -> None:
    """KVCache.write on CUDA (one kernel) against its torch path: the same bits everywhere."""
    k, v, slots = _step(dtype, "cuda")
    got, ref = _filled(dtype, kv_cache_dtype, "cuda"), _filled(dtype, kv_cache_dtype, "cuda")
    got.write(1, slots, k, v)
    monkeypatch.setattr(layers, "FUSED_KERNELS", False)
    ref.write(1, slots, k, v)
    assert not torch.equal(ref.k, _filled(dtype, kv_cache_dtype, "cuda").k)
    assert all(torch.equal(a, b) for a, b in zip(_state(ref), _state(got), strict=True))


if __name__ == "__main__":  # the interpreted child (see tests/conftest.py: run_interpreted)
    print(json.dumps(cases()))

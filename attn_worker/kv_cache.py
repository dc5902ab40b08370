"""Paged KV cache of one attention rank: one K and one V vector of head_dim per token per layer,
in fixed-size blocks; a sequence's block table maps its positions to blocks. One extra block
past `num_blocks`, never handed out, takes the writes of padding rows (CUDA-graph replays).

`kv_cache_dtype="fp8"` stores K and V as float8 e4m3 with one fp32 scale per token vector
(a block of head_dim elements): each written vector's largest magnitude maps to e4m3's 448,
so a later token never forces rescaling what is stored, and the cache takes
head_dim + 4 bytes per vector instead of 2 x head_dim. The decode kernel reads the scales;
`gather` (prefill attention) returns dequantized vectors."""

from __future__ import annotations

import torch

from afd.config import ConfigError, ModelConfig
from afd.models.layers import use_fused
from afd.quantization import quantize_fp8
from attn_worker.kernels.kv_write import kv_write

KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype
_FP8 = torch.float8_e4m3fn
_SCALE_BYTES = 4  # fp32, one per token vector


def check_kv_cache_dtype(name: str) -> str:
    """The canonical name ("fp8_e4m3", vLLM's spelling, is fp8), or a ConfigError."""
    canonical = "fp8" if name == "fp8_e4m3" else name
    if canonical not in KV_CACHE_DTYPES:
        raise ConfigError(f"--kv-cache-dtype {name!r}: expected one of auto, fp8, fp8_e4m3")
    return canonical


def kv_bytes_per_block(
    num_layers: int, block_size: int, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str
) -> int:
    """Bytes of one block over all layers, K and V (scales included for fp8)."""
    if check_kv_cache_dtype(kv_cache_dtype) == "fp8":
        per_vector = head_dim * _FP8.itemsize + _SCALE_BYTES
    else:
        per_vector = head_dim * dtype.itemsize
    return 2 * num_layers * block_size * per_vector


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.fp8 = check_kv_cache_dtype(kv_cache_dtype) == "fp8"
        self.dtype = dtype  # what gather returns and attention computes in
        shape = (num_layers, num_blocks + 1, block_size, head_dim)
        store = _FP8 if self.fp8 else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        # per token vector [layers, blocks + 1, block_size]; None unless fp8
        self.k_scale = self.v_scale = None
        if self.fp8:
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
        self.block_size = block_size
        self.scratch_block = num_blocks  # the block padding rows read and write

    @classmethod
    def for_model(
        cls,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_cache_dtype: str = "auto",
    ) -> KVCache:
        """A cache with one layer per model layer at the model's head size."""
        layers, dim = cfg.num_hidden_layers, cfg.head_dim
        return cls(layers, num_blocks, block_size, dim, dtype, device, kv_cache_dtype)

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This layer's K and V scales [blocks + 1, block_size], (None, None) unless fp8."""
        if not self.fp8:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k/v [T, D] at flat slots [T] (block * block_size + offset)."""
        d = k.shape[-1]
        fusable = d & (d - 1) == 0 and k.stride(-1) == v.stride(-1) == 1
        if use_fused(k, v) and fusable and (self.fp8 or k.dtype == v.dtype == self.k.dtype):
            k_scale, v_scale = self.scales(layer)
            kv_write(k, v, slots, self.k[layer], self.v[layer], k_scale, v_scale)  # one launch
            return
        if not self.fp8:
            self.k[layer].view(-1, d).index_copy_(0, slots, k)
            self.v[layer].view(-1, d).index_copy_(0, slots, v)
            return
        quant, scale = quantize_fp8(torch.stack((k, v)))  # [2, T, D], [2, T]: K and V at once
        quant = quant.view(torch.uint8)  # as bytes: index_copy has no float8 kernels
        for i, (data, scales) in enumerate(((self.k, self.k_scale), (self.v, self.v_scale))):
            data[layer].view(torch.uint8).view(-1, d).index_copy_(0, slots, quant[i])
            scales[layer].view(-1).index_copy_(0, slots, scale[i])

    def gather(
        self, layer: int, block_table: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [length, D] of one sequence, in position order, in the model's dtype."""
        d = self.k.shape[-1]
        k = self.k[layer, block_table].view(-1, d)[:length]
        v = self.v[layer, block_table].view(-1, d)[:length]
        if self.fp8:
            k_scale = self.k_scale[layer, block_table].view(-1)[:length, None]
            v_scale = self.v_scale[layer, block_table].view(-1)[:length, None]
            k, v = (k.float() * k_scale).to(self.dtype), (v.float() * v_scale).to(self.dtype)
        return k, v

"""Step3 text model split by role: the attention side (embedding, MFA attention, norms, router,
head) and the FFN side (dense SwiGLU, shared expert, routed experts) as a shardable partial sum.

Parameter names equal the checkpoint keys (STEP3.md), so loading is a name lookup. Neither side
knows about processes or transports: the runners in attn_worker/ and ffn_worker/ drive them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from afd.config import ModelConfig
from afd.models.layers import Fp8Linear, RMSNorm, Rope, linear, swiglu, use_fused
from afd.quantization import BlockScales, quantize_fp8_blocks, quantize_fp8_rows
from attn_worker.kernels.router_topk import router_topk
from ffn_worker.kernels.fused_moe import fused_moe

# (q [T, Hq, D], k [T, 1, D], v [T, 1, D]) -> o [T, Hq, D]; owns the KV cache and batch layout
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """Where a parameter comes from: checkpoint key, full shape there, and the slice we own."""

    key: str
    full_shape: tuple[int, ...]
    index: tuple[slice, ...] = ()


@dataclass(frozen=True)
class FFNShard:
    """The part of every FFN layer one FFN rank owns: a contiguous run of routed experts (EP) and a
    contiguous slice of the dense / shared-expert intermediate dimension (TP)."""

    rank: int = 0
    num_ranks: int = 1

    def _split(self, size: int) -> tuple[int, int]:
        return self.rank * size // self.num_ranks, (self.rank + 1) * size // self.num_ranks

    def experts(self, num_experts: int) -> tuple[int, int]:
        return self._split(num_experts)

    def columns(self, intermediate: int) -> tuple[int, int]:
        return self._split(intermediate)


class Step3Attention(nn.Module):
    """Multi-matrix factorisation attention: low-rank shared query, one K/V head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.head_dim = cfg.num_attention_heads, d
        self.q_proj = nn.Linear(h, cfg.share_q_dim, bias=False)
        self.k_proj = nn.Linear(h, d, bias=False)
        self.v_proj = nn.Linear(h, d, bias=False)
        self.inter_norm = RMSNorm(cfg.share_q_dim, cfg.rms_norm_eps)
        self.wq = nn.Linear(cfg.share_q_dim, cfg.num_attention_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)
        # [share_q + 2D, H] once fuse_projections ran: q_proj, k_proj, v_proj as one GEMM
        # (with its block scales when the projections are e4m3)
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_scales: BlockScales | None = None
        self._qkv_sizes = [cfg.share_q_dim, d, d]

    PROJECTIONS = ("q_proj", "k_proj", "v_proj", "wq", "o_proj")

    def fuse_projections(self) -> None:
        """Runs q_proj, k_proj and v_proj as one GEMM (x read once, one launch instead of
        three; bench/NOTES-kernels.md, version 15). Their weights become row slices of one
        tensor, so memory does not grow and the parameters keep their checkpoint names. Call
        it once the weights are loaded on their device: moving the module afterwards would
        copy the slices apart from the fused tensor. e4m3 projections fuse when their scale
        blocks do not straddle two of them (Step3's 2048 + 256 + 256 rows in blocks of 128);
        otherwise they stay three GEMMs."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if any(isinstance(p, Fp8Linear) for p in projections):
            scales = self._fusable_scales(projections)
            if scales is None:
                return
            rows = scales[0].block[0]
            fused_scale = torch.cat([s.scale for s in scales])
            parts = fused_scale.split([-(-n // rows) for n in self._qkv_sizes])
            for proj, part in zip(projections, parts, strict=True):
                proj.weight_scale = part
            self.qkv_scales = BlockScales(fused_scale, scales[0].block)
        w = torch.cat([p.weight for p in projections]).detach()
        for proj, part in zip(projections, w.split(self._qkv_sizes), strict=True):
            proj.weight.data = part
        self.qkv_weight = w

    def _fusable_scales(self, projections: tuple[nn.Module, ...]) -> list[BlockScales] | None:
        if not all(isinstance(p, Fp8Linear) for p in projections):
            return None
        scales = [p.scales for p in projections]
        rows = scales[0].block[0]
        same = all(s.block == scales[0].block for s in scales)
        aligned = all(n % rows == 0 for n in self._qkv_sizes[:-1])
        return scales if same and aligned else None

    def quantize_projections_fp8(self, stored: Mapping[str, BlockScales] | None = None) -> None:
        """The five projections in e4m3 (--fp8-attention): those a block-FP8 checkpoint
        gave in e4m3 (`stored`: their scales by name, e.g. "o_proj") as stored, 16-bit ones
        quantized here with one scale per output channel; q/k/v fused again if they were."""
        stored = stored or {}
        was_fused = self.qkv_weight is not None
        self.qkv_weight, self.qkv_scales = None, None
        for name in self.PROJECTIONS:
            w = getattr(self, name).weight.detach()
            assert name in stored or w.dtype != torch.float8_e4m3fn, f"{name}: scales missing"
            quant, scales = (w, stored[name]) if name in stored else quantize_fp8_rows(w)
            setattr(self, name, Fp8Linear(quant, scales))
        if was_fused:
            self.fuse_projections()

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionFn
    ) -> torch.Tensor:
        t = x.shape[0]
        # the fused GEMM while the three weights are still its slices (a module moved or
        # reassigned since has them elsewhere: then the three GEMMs, on what they hold)
        fused = self.qkv_weight is not None
        if fused and self.q_proj.weight.data_ptr() == self.qkv_weight.data_ptr():
            qkv = linear(x, self.qkv_weight, self.qkv_scales)
            q_low, k, v = qkv.split(self._qkv_sizes, dim=-1)
        else:
            q_low, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.wq(self.inter_norm(q_low)).view(t, self.num_heads, self.head_dim)
        k = k.view(t, 1, self.head_dim)  # [T, 1, D]
        v = v.view(t, 1, self.head_dim)
        q, k = Rope.apply_qk(q, k, cos, sin)
        o = attn(q, k, v)  # [T, Hq, D]
        return self.o_proj(o.reshape(t, -1))


def fuse_attention_projections(module: nn.Module) -> nn.Module:
    """Step3Attention.fuse_projections on every attention block in `module` (loaded weights)."""
    for m in module.modules():
        if isinstance(m, Step3Attention):
            m.fuse_projections()
    return module


class Router(nn.Module):
    """Top-k over softmax probabilities (fp32); weights not renormalised unless configured."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe_num_experts, bias=False)
        self.top_k, self.renormalise = cfg.moe_top_k, cfg.norm_expert_weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)  # [T, E]
        if use_fused(logits) and logits.stride(1) == 1:  # one kernel instead of five
            return router_topk(logits, self.top_k, self.renormalise, x.dtype)
        probs = F.softmax(logits.float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.renormalise:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids.to(torch.int32), weights.to(x.dtype)


class AttnLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Step3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = Router(cfg) if cfg.is_moe_layer(layer) else None

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionFn
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Returns the residual stream after attention, the FFN input, and the routing."""
        delta = self.self_attn(self.input_layernorm(h), cos, sin, attn)
        h, x = self.post_attention_layernorm.add(h, delta)
        return h, x, (self.moe(x) if self.moe is not None else None)


class _Body(nn.Module):
    pass


class AttentionSide(nn.Module):
    """Everything an attention rank holds: embedding, all attention layers, routers, head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _Body()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(AttnLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = Rope(cfg.head_dim, cfg.rope_theta)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> input embeddings; kept separate so image embeddings can replace some."""
        return self.model.embed_tokens(token_ids)

    def layer(self, i: int) -> AttnLayer:
        return self.model.layers[i]  # type: ignore[return-value]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h)).float()  # [S, V]

    def param_specs(self) -> dict[str, ParamSpec]:
        return {name: ParamSpec(name, tuple(p.shape)) for name, p in self.named_parameters()}

    def projection_names(self) -> list[str]:
        """The attention projections' parameter names (what --fp8-attention stores in
        e4m3 on this side; the embedding, router and head stay 16-bit)."""
        return [
            f"model.layers.{i}.self_attn.{name}.weight"
            for i in range(self.cfg.num_hidden_layers)
            for name in Step3Attention.PROJECTIONS
        ]

    def quantize_projections_fp8(self, stored: Mapping[str, BlockScales]) -> None:
        """Step3Attention.quantize_projections_fp8 on every layer; `stored`: the scales of
        the projections the checkpoint gave in e4m3, by parameter name."""
        for i, layer in enumerate(self.model.layers):
            prefix = f"model.layers.{i}.self_attn."
            mine = {
                name: stored[f"{prefix}{name}.weight"]
                for name in Step3Attention.PROJECTIONS
                if f"{prefix}{name}.weight" in stored
            }
            layer.self_attn.quantize_projections_fp8(mine)


class FFNLayer(nn.Module):
    """One layer's FFN share: a dense SwiGLU slice, or a shared-expert slice + owned experts."""

    def __init__(self, cfg: ModelConfig, layer: int, shard: FFNShard) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.is_moe = cfg.is_moe_layer(layer)
        if not self.is_moe:
            lo, hi = shard.columns(cfg.intermediate_size)
            self.mlp = _swiglu_params(h, hi - lo)
            return
        lo, hi = shard.columns(cfg.share_expert_dim)
        self.share_expert = _swiglu_params(h, hi - lo)
        self.num_experts = cfg.moe_num_experts  # the model's, however many this rank holds
        self.expert_start, expert_end = shard.experts(cfg.moe_num_experts)
        n, inter = expert_end - self.expert_start, cfg.moe_intermediate_size
        self.moe = nn.Module()
        self.moe.gate_proj = nn.Parameter(torch.empty(n, inter, h))
        self.moe.up_proj = nn.Parameter(torch.empty(n, inter, h))
        self.moe.down_proj = nn.Parameter(torch.empty(n, h, inter))

    EXPERTS = ("gate_proj", "up_proj", "down_proj")  # the routed experts' tensors

    @property
    def expert_scales(self) -> tuple[BlockScales, ...] | None:
        """The fp8 experts' scales (gate, up, down), read from the buffers each time so that
        they follow the module when it moves; None for 16-bit experts."""
        if not hasattr(self.moe, "gate_proj_scale"):
            return None
        return tuple(
            BlockScales(getattr(self.moe, f"{name}_scale"), self.moe.scale_blocks[name])
            for name in self.EXPERTS
        )

    def quantize_experts_fp8(self, stored: Mapping[str, BlockScales] | None = None) -> None:
        """Keeps the routed experts in e4m3 (--quantization fp8): half the bytes each step
        streams, and half the memory. Those a block-FP8 checkpoint gave in e4m3 (`stored`:
        their scales by name, e.g. "gate_proj") stay as stored; 16-bit ones are quantized
        here with one scale per output channel, or in the stored ones' blocks where the
        checkpoint left only some in 16 bits (gate and up must share a layout)."""
        if not self.is_moe:
            return
        stored = stored or {}
        block = next((s.block for s in stored.values()), None)
        self.moe.scale_blocks = {}
        for name in self.EXPERTS:
            w = getattr(self.moe, name).detach()
            if name in stored:
                quant, scales = w, stored[name]
            elif block is not None:
                quant, scales = quantize_fp8_blocks(w, block)
            else:
                quant, scales = quantize_fp8_rows(w)
            setattr(self.moe, name, nn.Parameter(quant, requires_grad=False))
            self.moe.register_buffer(f"{name}_scale", scales.scale)
            self.moe.scale_blocks[name] = scales.block

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor | None, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """Partial FFN output for x [T, H]; summing every rank's partial gives the layer's."""
        if not self.is_moe:
            return swiglu(
                x, self.mlp.gate_proj.weight, self.mlp.up_proj.weight, self.mlp.down_proj.weight
            )
        assert ids is not None and weights is not None
        out = swiglu(
            x,
            self.share_expert.gate_proj.weight,
            self.share_expert.up_proj.weight,
            self.share_expert.down_proj.weight,
        )
        return out + fused_moe(
            x,
            self.moe.gate_proj,
            self.moe.up_proj,
            self.moe.down_proj,
            ids,
            weights,
            self.expert_start,
            self.expert_scales,
            self.num_experts,
        )


def _swiglu_params(hidden: int, inter: int) -> nn.Module:
    m = nn.Module()
    m.gate_proj = nn.Linear(hidden, inter, bias=False)
    m.up_proj = nn.Linear(hidden, inter, bias=False)
    m.down_proj = nn.Linear(inter, hidden, bias=False)
    return m


class FFNSide(nn.Module):
    """Everything an FFN rank holds: its share of every layer's FFN."""

    def __init__(self, cfg: ModelConfig, shard: FFNShard = FFNShard()) -> None:
        super().__init__()
        self.cfg, self.shard = cfg, shard
        self.model = _Body()
        self.model.layers = nn.ModuleList(
            FFNLayer(cfg, i, shard) for i in range(cfg.num_hidden_layers)
        )

    def forward(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor | None, weights: torch.Tensor | None
    ) -> torch.Tensor:
        return self.model.layers[layer](x, ids, weights)

    def param_specs(self) -> dict[str, ParamSpec]:
        cfg = self.cfg
        specs: dict[str, ParamSpec] = {}
        for i in range(cfg.num_hidden_layers):
            specs.update(_ffn_layer_specs(cfg, self.shard, i))
        return specs


def _ffn_layer_specs(cfg: ModelConfig, shard: FFNShard, i: int) -> dict[str, ParamSpec]:
    h, p = cfg.hidden_size, f"model.layers.{i}"
    if not cfg.is_moe_layer(i):
        return _swiglu_specs(f"{p}.mlp", h, cfg.intermediate_size, shard)
    specs = _swiglu_specs(f"{p}.share_expert", h, cfg.share_expert_dim, shard)
    e0, e1 = shard.experts(cfg.moe_num_experts)
    e, inter, rows = cfg.moe_num_experts, cfg.moe_intermediate_size, (slice(e0, e1),)
    specs[f"{p}.moe.gate_proj"] = ParamSpec(f"{p}.moe.gate_proj.weight", (e, inter, h), rows)
    specs[f"{p}.moe.up_proj"] = ParamSpec(f"{p}.moe.up_proj.weight", (e, inter, h), rows)
    specs[f"{p}.moe.down_proj"] = ParamSpec(f"{p}.moe.down_proj.weight", (e, h, inter), rows)
    return specs


def _swiglu_specs(prefix: str, hidden: int, inter: int, shard: FFNShard) -> dict[str, ParamSpec]:
    lo, hi = shard.columns(inter)
    cols = slice(lo, hi)
    return {
        f"{prefix}.gate_proj.weight": ParamSpec(
            f"{prefix}.gate_proj.weight", (inter, hidden), (cols,)
        ),
        f"{prefix}.up_proj.weight": ParamSpec(f"{prefix}.up_proj.weight", (inter, hidden), (cols,)),
        f"{prefix}.down_proj.weight": ParamSpec(
            f"{prefix}.down_proj.weight", (hidden, inter), (slice(None), cols)
        ),
    }

"""An independent float64 Step3 text model written from STEP3.md for the tests: reads the raw
HF files itself and shares no code with afd. Full recompute, no KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


class ReferenceStep3:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        self.c = {**raw, **raw.get("text_config", {})}
        self.w: dict[str, torch.Tensor] = {}
        for shard in sorted(path.glob("*.safetensors")):
            self.w.update({k: v.double() for k, v in load_file(str(shard)).items()})
        n = self.c["num_hidden_layers"]
        enum = self.c.get("moe_layers_enum")
        self.moe = {int(x) for x in enum.split(",")} if enum else set(range(1, n))

    def norm(self, x: torch.Tensor, key: str) -> torch.Tensor:
        eps = self.c["rms_norm_eps"]
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * self.w[key]

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] at positions 0..T-1."""
        d = x.shape[-1]
        inv = self.c["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * inv[None]
        cos, sin = (
            torch.cat([ang, ang], -1).cos()[:, None],
            torch.cat([ang, ang], -1).sin()[:, None],
        )
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def attention(self, x: torch.Tensor, p: str) -> torch.Tensor:
        w, t = self.w, x.shape[0]
        heads, d = self.c["num_attention_heads"], self.c["head_dim"]
        q = self.norm(x @ w[f"{p}.q_proj.weight"].T, f"{p}.inter_norm.weight")
        q = self.rope((q @ w[f"{p}.wq.weight"].T).view(t, heads, d))
        k = self.rope((x @ w[f"{p}.k_proj.weight"].T).view(t, 1, d))[:, 0]
        v = x @ w[f"{p}.v_proj.weight"].T
        scores = torch.einsum("thd,sd->hts", q, k) * d**-0.5
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("hts,sd->thd", probs, v).reshape(t, heads * d)
        return out @ w[f"{p}.o_proj.weight"].T

    def mlp(
        self, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dn: torch.Tensor
    ) -> torch.Tensor:
        a = x @ g.T
        return (a / (1 + torch.exp(-a)) * (x @ u.T)) @ dn.T

    def ffn(self, x: torch.Tensor, i: int) -> torch.Tensor:
        w, p = self.w, f"model.layers.{i}"
        if i not in self.moe:
            return self.mlp(x, *(w[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")))
        out = self.mlp(x, *(w[f"{p}.share_expert.{n}_proj.weight"] for n in ("gate", "up", "down")))
        probs = (x @ w[f"{p}.moe.gate.weight"].T).softmax(-1)
        top_p, top_e = probs.topk(self.c["moe_top_k"], -1)
        for t in range(x.shape[0]):
            for weight, e in zip(top_p[t], top_e[t], strict=True):
                e = int(e)
                out[t] += (
                    weight
                    * self.mlp(
                        x[t : t + 1],
                        w[f"{p}.moe.gate_proj.weight"][e],
                        w[f"{p}.moe.up_proj.weight"][e],
                        w[f"{p}.moe.down_proj.weight"][e],
                    )[0]
                )
        return out

    def all_logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log-probabilities of the next token at every position of `ids` [T, V]."""
        h = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        for i in range(self.c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = h + self.attention(self.norm(h, f"{p}.input_layernorm.weight"), f"{p}.self_attn")
            h = h + self.ffn(self.norm(h, f"{p}.post_attention_layernorm.weight"), i)
        logits = self.norm(h, "model.norm.weight") @ self.w["lm_head.weight"].T
        return logits.log_softmax(-1)

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log-probabilities of the next token after `ids` [V]."""
        return self.all_logprobs(ids)[-1]

    def greedy(self, ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        ids, out, lps = list(ids), [], []
        for _ in range(max_tokens):
            lp = self.logprobs(ids)
            tok = int(lp.argmax())
            out.append(tok)
            lps.append(float(lp[tok]))
            ids.append(tok)
        return out, lps

"""The FFN layers of one FFN rank as CUDA graphs at captured token counts (decode steps).

A micro-batch of T tokens (summed over the attention ranks that sent it) replays the graph
of the smallest captured size >= T: its rows are written into the static inputs, the rows
past T compute on whatever an earlier replay left there (every op is row-local, and those
rows are dropped), so nothing but the copies depends on T."""

from __future__ import annotations

from functools import partial

import torch

from afd.cuda_graphs import GraphRunner, capture_sizes, size_for
from afd.models.step3 import FFNSide


class FFNGraphs:
    def __init__(self, side: FFNSide, max_tokens: int) -> None:
        cfg, param = side.cfg, next(side.parameters())
        self.side, self.sizes = side, capture_sizes(max_tokens)
        n, hidden, top_k = self.sizes[-1], cfg.hidden_size, cfg.moe_top_k
        like = dict(device=param.device, dtype=param.dtype)
        self.x = torch.zeros(n, hidden, **like)  # [N, H]
        self.ids = torch.zeros(n, top_k, device=param.device, dtype=torch.int32)  # [N, k]
        self.weights = torch.zeros(n, top_k, **like)  # [N, k]
        self.out = torch.zeros(n, hidden, **like)  # [N, H]
        self.routed = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
        runner = GraphRunner(param.device)
        self.replays = {
            (layer, size): runner.capture(partial(self._forward, layer, size))
            for size in reversed(self.sizes)  # largest first: the pool is sized once
            for layer in range(cfg.num_hidden_layers)
        }

    def _forward(self, layer: int, size: int) -> None:
        if self.routed[layer]:
            out = self.side(layer, self.x[:size], self.ids[:size], self.weights[:size])
        else:
            out = self.side(layer, self.x[:size], None, None)
        self.out[:size].copy_(out)

    def run(
        self,
        layer: int,
        xs: list[torch.Tensor],
        ids: list[torch.Tensor] | None,
        weights: list[torch.Tensor] | None,
    ) -> torch.Tensor | None:
        """The layer's partial output [T, H] for the rows of `xs` (and their routing), in
        order; None when T is past the largest captured size (run it eagerly)."""
        rows = sum(x.shape[0] for x in xs)
        size = size_for(self.sizes, rows)
        if size is None:
            return None
        torch.cat(xs, out=self.x[:rows])
        if self.routed[layer]:
            torch.cat(ids, out=self.ids[:rows])
            torch.cat(weights, out=self.weights[:rows])
        self.replays[(layer, size)]()
        # a copy: the next replay rewrites `out` while this one may still be being sent
        return self.out[:rows].clone()

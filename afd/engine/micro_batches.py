"""Splits one rank's step into micro-batches balanced by work (tokens x context), not count."""

from __future__ import annotations

from afd.engine.sequence import Sequence
from attn_worker.messages import ScheduledChunk


def split_micro_batches(
    chunks: list[ScheduledChunk], decodes: list[Sequence], num_micro_batches: int
) -> list[int]:
    """Sets chunk.micro_batch in place and returns each decode's micro-batch.

    Prefill chunks go greedily to the lightest micro-batch (largest first). Decodes, where
    work is the context length, are dealt in snake order over their context lengths sorted
    descending, which balances work without a per-decode search."""
    m = num_micro_batches
    loads = [0] * m
    for chunk in sorted(chunks, key=_chunk_work, reverse=True):
        k = min(range(m), key=loads.__getitem__)
        chunk.micro_batch = k
        loads[k] += _chunk_work(chunk)
    if m == 1:
        return [0] * len(decodes)
    order = sorted(range(len(decodes)), key=lambda i: decodes[i].num_tokens, reverse=True)
    # start the snake at the micro-batches the chunks left lightest
    lanes = sorted(range(m), key=loads.__getitem__)
    snake = lanes + lanes[::-1]
    result = [0] * len(decodes)
    for rank_in_order, i in enumerate(order):
        result[i] = snake[rank_in_order % (2 * m)]
    return result


def _chunk_work(chunk: ScheduledChunk) -> int:
    n = len(chunk.token_ids)
    return n * (chunk.start_pos + n) + 64 * n

"""Splits one rank's chunks into micro-batches balanced by work (tokens x context), not count."""

from __future__ import annotations

from attn_worker.messages import ScheduledChunk


def chunk_work(chunk: ScheduledChunk) -> int:
    """Attention work grows with tokens x context; the linears and FFN with tokens."""
    n = len(chunk.token_ids)
    return n * (chunk.start_pos + n) + 64 * n


def split_micro_batches(chunks: list[ScheduledChunk], num_micro_batches: int) -> None:
    """Assigns chunk.micro_batch in place: longest-processing-time-first greedy."""
    loads = [0] * num_micro_batches
    for chunk in sorted(chunks, key=chunk_work, reverse=True):
        k = min(range(num_micro_batches), key=lambda i: (loads[i], i))
        chunk.micro_batch = k
        loads[k] += chunk_work(chunk)

"""Attention rank: embeddings, attention layers, paged KV cache, router, sampler, pipeline."""

"""Attention-side Triton kernels; each has a plain-torch reference path."""

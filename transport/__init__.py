"""Activation transport between attention and FFN ranks (interface + backends)."""

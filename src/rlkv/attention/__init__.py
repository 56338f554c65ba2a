"""Attention building blocks: the masked reference that every fast path is tested against."""

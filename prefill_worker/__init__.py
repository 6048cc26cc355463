"""Prefill role: compute the prompt's KV and keep it for a remote decode."""

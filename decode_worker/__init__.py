"""Decode role: obtain a prefilled request's KV from a prefill worker, then generate."""

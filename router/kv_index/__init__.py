"""Which worker holds which prompt prefix: block hashes computed like the engines', an index
of the blocks each worker holds (exact, from vLLM KV events; or approximate, from what the
router routed), and the ZMQ subscriber that keeps the exact index current."""

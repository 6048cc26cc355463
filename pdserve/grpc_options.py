"""gRPC channel and server options, chosen once for every pdserve process."""

from __future__ import annotations

# Messages carry token ids and text deltas; 64 MiB leaves room for long prompts
# (a 128k-token prompt is ~0.5 MiB of token ids) without allowing unbounded input.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # A Generate stream can be silent for a long time (a queued request, a long prefill,
    # a KV pull). gRPC clients send BDP-probe and keepalive PINGs meanwhile; by default
    # the server counts them as strikes and answers GOAWAY(too_many_pings), which drops
    # the connection and stalls or fails the calls on it (seen: 10-30 s stalls, expired
    # KV leases). Tolerate them, as vLLM's own gRPC server does.
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # No client keepalive pings or BDP probes: dead workers are found by the router's
    # health polls, and pings are what servers punish with GOAWAY (ADR 0004).
    ("grpc.http2.bdp_probe", 0),
]

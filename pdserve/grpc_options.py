"""gRPC channel and server options, chosen once for every pdserve process."""

from __future__ import annotations

# Messages carry token ids and text deltas; 64 MiB leaves room for long prompts
# (a 128k-token prompt is ~0.5 MiB of token ids) without allowing unbounded input.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # No client keepalive pings: gRPC servers answer pings more frequent than their
    # policy allows (5 min by default) with GOAWAY, which drops and re-dials the
    # connection. Dead workers are found by the router's health polls instead.
]

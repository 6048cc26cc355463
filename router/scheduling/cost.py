"""The transfer-cost model: seconds to move KV between workers and to prefill tokens.

KV bytes per token come from the worker's reported layout (2 tensors, K and V, per layer
and KV head); link bandwidth and prefill speed are configured (measure them with
`pdserve bench kv-transfer` and a plain engine)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.router.workers import WorkerClient

_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "fp8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


def kv_bytes_per_token(worker: WorkerClient) -> int:
    """0 when the worker has not reported its layout yet."""
    if worker.info is None or not worker.info.HasField("kv_layout"):
        return 0
    layout = worker.info.kv_layout
    dtype_bytes = _DTYPE_BYTES.get(layout.dtype, 2)
    return 2 * layout.num_layers * layout.num_kv_heads * layout.head_size * dtype_bytes


@dataclass(frozen=True)
class TransferCostModel:
    link_bytes_per_s: float = 1e9
    prefill_tokens_per_s: float = 1000.0
    # Fixed cost of the extra hop: a prefill round trip, handle exchange, transfer setup.
    overhead_s: float = 0.005

    def transfer_s(self, worker: WorkerClient, tokens: int) -> float:
        """Seconds to move ``tokens`` tokens of KV in ``worker``'s layout."""
        if tokens <= 0:
            return 0.0
        return tokens * kv_bytes_per_token(worker) / self.link_bytes_per_s

    def prefill_s(self, tokens: int) -> float:
        return max(tokens, 0) / self.prefill_tokens_per_s

"""The KV layout a worker produces or accepts, and the compatibility check.

Every KV handle carries the producer's layout; the consumer compares it with its own
before any byte moves. A mismatch is a KvIncompatibleError naming the fields, never
silent garbage.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.errors import KvIncompatibleError

# Bump when the meaning of a KvHandle field changes.
KV_HANDLE_FORMAT_VERSION = 1
# vLLM's prefix-cache block hash (the default, sha256 over token ids and the parent hash).
DEFAULT_HASH_ALGORITHM = "vllm-sha256"
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class KvLayout:
    """Shape of the KV cache of one engine (all pipeline stages together)."""

    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    hash_algorithm: str = DEFAULT_HASH_ALGORITHM

    def block_bytes(self) -> int:
        """Bytes of one KV block over all layers, K and V (the cache dtype is the model's)."""
        try:
            itemsize = _DTYPE_BYTES[self.dtype]
        except KeyError:
            raise KvIncompatibleError(f"unknown KV dtype {self.dtype!r}") from None
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_size * itemsize

    def mismatches(self, producer: KvLayout, transport_reshapes: bool) -> list[str]:
        """Fields on which KV from ``producer`` cannot be used by this consumer.

        ``transport_reshapes``: the transport splits/merges heads across TP ranks and
        maps layers across PP stages itself, so parallel shapes may differ.
        """
        fields = ["model_id", "dtype", "block_size", "num_layers", "num_kv_heads", "head_size"]
        fields.append("hash_algorithm")
        if not transport_reshapes:
            fields += ["tensor_parallel_size", "pipeline_parallel_size"]
        return [
            f"{name}: producer={getattr(producer, name)!r} consumer={getattr(self, name)!r}"
            for name in fields
            if getattr(producer, name) != getattr(self, name)
        ]

    def check_compatible(
        self, producer: KvLayout, format_version: int, transport_reshapes: bool
    ) -> None:
        if format_version != KV_HANDLE_FORMAT_VERSION:
            raise KvIncompatibleError(
                f"KV handle format version {format_version} is not supported "
                f"(this worker speaks version {KV_HANDLE_FORMAT_VERSION})"
            )
        problems = self.mismatches(producer, transport_reshapes)
        if problems:
            raise KvIncompatibleError(
                "prefill and decode workers disagree on the KV layout: " + "; ".join(problems)
            )

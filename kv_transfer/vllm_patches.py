"""A narrow fix for vLLM 0.32's NIXL pull mode with a pipeline-parallel decode engine.

Bug: in pull mode every decode rank that reads a request's blocks notifies the prefill
rank it read from, and the notification says how many readers the prefill rank must wait
for before it frees the blocks. vLLM computes that count from TP (and DCP) sizes only
(`TransferTopology.dcp_consumer_count`), so with decode PP=2 both pipeline stages read
but the producer frees the blocks after the first stage's notification; the second
stage's read can then see blocks already reused by another request (observed: garbage
tokens under load, and `vllm:nixl_num_notifications_after_expiry_total` counting the
late notifications on the prefill engine).

Fix: multiply the count by the local pipeline-parallel size. Loaded into every vLLM
process through the `vllm.general_plugins` entry point, and active only in pdserve
workers (which set PDSERVE_VLLM_PATCHES=1), so plain vLLM in the same environment is
untouched. Remove when vLLM counts pipeline stages itself.
"""

from __future__ import annotations

import functools
import os
from typing import Any

ENABLE_ENV = "PDSERVE_VLLM_PATCHES"
_MARK = "_pdserve_counts_pp_stages"


def consumers_with_pp(count: int, local_pp_size: int) -> int:
    """Readers a producer rank must wait for, when each of ``local_pp_size`` stages reads."""
    return count * max(1, local_pp_size)


def register() -> None:
    """vLLM general-plugin hook (runs in the engine-core and every worker process)."""
    if os.environ.get(ENABLE_ENV) != "1":
        return
    from vllm.distributed.kv_transfer.kv_connector import utils

    original = utils.TransferTopology.dcp_consumer_count
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def dcp_consumer_count(self: Any, remote_tp_size: int, remote_dcp_size: int) -> int:
        from vllm.distributed.parallel_state import get_pp_group

        count = original(self, remote_tp_size, remote_dcp_size)
        return consumers_with_pp(count, get_pp_group().world_size)

    setattr(dcp_consumer_count, _MARK, True)
    utils.TransferTopology.dcp_consumer_count = dcp_consumer_count

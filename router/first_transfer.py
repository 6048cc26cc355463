"""One request at a time through a prefill -> decode pair until their first transfer works.

vLLM's NixlConnector handshakes a decode engine with a prefill engine on the first
transfer between them. With several first transfers at once (a cold cluster under
concurrent load) the handshake was seen to hang until the KV lease expired (vLLM 0.32,
CPU, prefill TP=2 -> decode PP=2; see docs/adr/0003). The gate lets one request per pair
go first; the others wait until it has produced its first token, or take their turn if it
failed. Warm pairs pass straight through.
"""

from __future__ import annotations

import asyncio


class FirstTransferGate:
    def __init__(self) -> None:
        # pair -> event; set and kept once a transfer between the pair has worked.
        self._pairs: dict[tuple[str, str], asyncio.Event] = {}

    def is_warm(self, pair: tuple[str, str]) -> bool:
        event = self._pairs.get(pair)
        return event is not None and event.is_set()

    async def enter(self, pair: tuple[str, str]) -> bool:
        """Wait for this request's turn. True: this request opens the pair and must call
        ``done``; False: the pair is warm."""
        while True:
            event = self._pairs.get(pair)
            if event is None:
                self._pairs[pair] = asyncio.Event()
                return True
            if event.is_set():
                return False
            await event.wait()

    def done(self, pair: tuple[str, str], ok: bool) -> None:
        """The opener finished its first transfer (``ok``) or gave up (the next one tries)."""
        event = self._pairs[pair]
        if not ok:
            del self._pairs[pair]
        event.set()

"""One stream's token items, from the engine thread to the decode actor's event loop, batched.

The engine thread puts an item per step (`put_threadsafe`, its listener's sink). `get` returns the
items queued by then as one (TokenItem.concat): while the stream's reader keeps up that is one step's
tokens; when it falls behind (a busy event loop, a slow Ray report) it catches up in one message
instead of one per step. A token never waits for a batch: `get` returns as soon as anything is queued.
"""
from __future__ import annotations

import asyncio

from pdcluster.messages import TokenItem


class TokenQueue:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._q: asyncio.Queue[TokenItem] = asyncio.Queue()

    def put_threadsafe(self, item: TokenItem) -> None:
        """Any thread (the engine's)."""
        self._loop.call_soon_threadsafe(self._q.put_nowait, item)

    async def get(self, timeout: float) -> TokenItem | None:
        """Everything queued, as one item (nothing after a finished one); None when nothing came
        within timeout seconds."""
        try:
            first = self._q.get_nowait()
        except asyncio.QueueEmpty:
            try:
                async with asyncio.timeout(timeout):    # no task per token, unlike wait_for
                    first = await self._q.get()
            except TimeoutError:
                return None
        items = [first]
        while not items[-1].finished and not self._q.empty():
            items.append(self._q.get_nowait())
        return TokenItem.concat(items)

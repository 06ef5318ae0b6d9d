"""One uvloop event loop per process, run forever by a daemon thread, shared by every KV stream
(and by `KVServer.start_sync`). Callers in other threads reach it via `call_soon_threadsafe` /
`asyncio.run_coroutine_threadsafe`; nothing that blocks may run on it."""
from __future__ import annotations

import asyncio
import threading

import uvloop

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def shared_loop() -> asyncio.AbstractEventLoop:
    """The process's KV loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None:
            loop = uvloop.new_event_loop()
            threading.Thread(target=loop.run_forever, name="kv-transfer-loop", daemon=True).start()
            _loop = loop
        return _loop

"""The prefill side's view of a KV transport: open a layer-wise sender per request.

Three implementations keep this contract, so the prefill worker never knows which one it holds
(registry.py names them): plain TCP (`tcp/transport.py`, the default), gRPC (`grpc/transport.py`)
and Mooncake (`mooncake/transport.py`: the decode side pulls, RDMA where NICs exist).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from pdcluster.kv_transfer.errors import KVTransferError

END = object()  # LoopSender queue item: finish() was called


@dataclass(frozen=True)
class TransferStats:
    request_id: str
    bytes: int  # payload bytes (K + V) sent
    wire_bytes: int  # bytes of all messages, headers included
    wall_s: float  # first send_layer call -> receiver's ack, seconds
    exposed_s: float  # last send_layer call -> ack: time the transfer added beyond compute, >= 0
    busy_s: float  # seconds spent writing frames and draining to the ack (link busy time)
    receiver_s: float  # receiver's first frame -> stream end, seconds


class LayerwiseSender(ABC):
    """Streams one request's KV to one decode worker, layer by layer. Thread-safe.

    `dst_block_ids` (given at open) are the decode worker's reserved blocks, in the order of the
    blocks the caller will send. Each (layer, block) must be sent exactly once. Implementations
    call `_init_sender` and provide `_frame_limit`, `_failed` and `_enqueue`."""

    def _init_sender(self, request_id: str, address: str, dst_id: str, dst_block_ids: Sequence[int]) -> None:
        self.request_id, self.address, self.dst_id = request_id, address, dst_id
        self._dst = tuple(dst_block_ids)
        self._lock = threading.Lock()  # guards _closed and the timestamps
        self._closed = False  # finish() or abort() called
        self._t_first: float | None = None  # perf_counter() of the first / last send_layer
        self._t_last: float | None = None

    def send_layer(self, layer: int, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                   first: int = 0) -> None:
        """Enqueue K, V [n, block_size, num_kv_heads, head_dim] of `layer`, destined for
        dst_block_ids[first:first + n]; returns at once. The sender owns the tensors from now on
        (pass fresh gathered copies, never cache views). Raises ValueError on a shape mismatch;
        transfer failures surface in finish()."""
        n = check_send(self._dst, layer, first, k_blocks, v_blocks, *self._frame_limit())
        with self._lock:
            if self._closed:
                raise RuntimeError(f"send_layer after finish/abort of {self.request_id!r}")
            self._t_last = time.perf_counter()
            self._t_first = self._t_first or self._t_last
            if n and not self._failed():  # once failed, drop: finish() reports why
                self._enqueue(layer, first, k_blocks, v_blocks)

    @abstractmethod
    def _frame_limit(self) -> tuple[int, str]:
        """(payload bytes one frame/message/slot can hold, its name for errors)."""

    def _failed(self) -> bool:
        """True once the transfer has ended early (failed or aborted): further layers are dropped.
        Every implementation settles `self._future` (a concurrent.futures.Future) with its outcome."""
        return self._future.done()

    @abstractmethod
    def _enqueue(self, layer: int, first: int, k_blocks: torch.Tensor, v_blocks: torch.Tensor) -> None:
        """Hand one checked layer piece to the sending side (called under self._lock)."""

    @abstractmethod
    def finish(self, timeout: float | None = None) -> TransferStats:
        """Wait until the receiver acked every frame (ownership handed over). Raises
        KVTransferError (with the receiver's status) if the transfer failed."""

    @abstractmethod
    def abort(self) -> None:
        """Stop sending and cancel the stream; the receiver marks the request failed."""

    def _outcome(self, timeout: float | None) -> TransferStats:
        """self._future's result; a future cancelled by abort() raises KVTransferError CANCELLED. One
        not settled within `timeout` s is aborted here (the caller holds the only reference: nothing
        else could stop it) and raises KVTransferError DEADLINE_EXCEEDED."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.CancelledError:
            raise KVTransferError(f"transfer of {self.request_id!r} was aborted", "CANCELLED") from None
        except TimeoutError:
            self.abort()
            if self._future.done() and not self._future.cancelled():
                return self._future.result()        # settled between the wait and the abort: its outcome
            raise KVTransferError(f"transfer of {self.request_id!r} not acknowledged within {timeout:g} s",
                                  "DEADLINE_EXCEEDED") from None


class LoopSender(LayerwiseSender):
    """A sender driven by one coroutine (`_run`) on an event loop (the shared KV loop): send_layer
    and finish() only put items on its asyncio.Queue, thread-safely. Call `_start` last in __init__."""

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()  # (layer, first, k, v) | END | ...; loop side
        self._future = asyncio.run_coroutine_threadsafe(self._run(), loop)

    def _put(self, item) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _enqueue(self, layer: int, first: int, k_blocks: torch.Tensor, v_blocks: torch.Tensor) -> None:
        self._put((layer, first, k_blocks, v_blocks))

    def finish(self, timeout: float | None = None) -> TransferStats:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._put(END)
        return self._outcome(timeout)

    @abstractmethod
    async def _run(self) -> TransferStats:
        """Send what the queue brings until END (or an end of the transfer's own); its stats."""


class KVTransport(ABC):
    @abstractmethod
    def open(self, address: str, request_id: str, dst_block_ids: Sequence[int],
             dst_id: str | None = None) -> LayerwiseSender:
        """A sender for request_id towards the decode worker at `address` ("host:port");
        dst_id names the link in the bandwidth meter (defaults to the address)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; senders still open fail."""


def check_send(dst: Sequence[int], layer: int, first: int, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
               max_frame_payload: int, what: str) -> int:
    """Validate one send_layer call against the reservation; returns the block count n.
    A frame must hold at least one whole K+V block (max_frame_payload bytes, headers excluded)."""
    from pdcluster.kv_transfer import wire
    n = k_blocks.shape[0] if k_blocks.dim() else 0
    if layer < 0 or first < 0 or first + n > len(dst):
        raise ValueError(f"layer {layer}, blocks [{first}, {first + n}) outside the {len(dst)} reserved blocks")
    wire.check_blocks(dst[first:first + n], k_blocks, v_blocks)
    block_bytes = 2 * k_blocks[:1].numel() * k_blocks.element_size()
    if block_bytes > max_frame_payload:
        raise ValueError(f"a {block_bytes}-byte K+V block does not fit {what} of {max_frame_payload} payload bytes")
    return n


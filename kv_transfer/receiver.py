"""Decode side: the registry of reserved transfers and the per-stream frame logic (no gRPC here).

Life of a reservation (`PendingTransfer`):

    expect() ──> PENDING ──(every (layer, block) landed)──> COMPLETE
                    │ ──(bad frame / truncated or cancelled stream)──> FAILED
                    └──(abort())──────────────────────────────────> ABORTED

Invariants:
- A frame is written only while its reservation is PENDING, into blocks of that reservation, and
  each (layer, block) exactly once. Writes and state changes hold the reservation's lock, so once
  `abort()` returns no byte of that request is written again (fencing). The TCP server writes
  straight into the cache (`target` -> `locked` writes -> `commit`): each of its writes is a
  bounded copy under that lock, so `abort()` waits for at most one, never for the network.
- Blocks count as landed only at `write` / `commit`, after the frame's checksum passed: bytes of a
  corrupt frame may sit in this reservation's own blocks, but it never completes from them.
- A terminal reservation leaves the registry at once: later frames name an unknown request
  (NOT_FOUND), while a stream already bound to it sees it closed (ABORTED). A stream binds to the
  reservation object on its first frame, so a later `expect()` of the same id is never written by
  an older stream.
- Completion (`wait()`, `add_done_callback`) fires once, on the first terminal state.
"""
from __future__ import annotations

import enum
import threading
import time
from typing import Callable, Sequence

import torch

from pdcluster.engine.kv_quant import QuantKV
from pdcluster.kv_transfer import codec as kvcodec
from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.errors import (DataLoss, DuplicateStream, KVTransferError, MalformedFrame,
                                TransferClosed, UnknownRequest)

# write_fn(layer, dst_block_ids, k, v): copy k, v [len(dst_block_ids), *block_shape] into the cache.
# Raise ValueError/TypeError for a dtype or shape mismatch (answered as INVALID_ARGUMENT). k, v are
# float tensors; a CacheWriter is also handed a quantized frame's codec.Encoded blocks undecoded.
WriteFn = Callable[[int, list[int], torch.Tensor, torch.Tensor], None]


class TransferState(enum.Enum):
    PENDING = "pending"
    COMPLETE = "complete"
    FAILED = "failed"
    ABORTED = "aborted"


def _runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive ids (the usual case: the pool hands out blocks in order) as
    (index in block_ids, first id, length)."""
    runs, i = [], 0
    while i < len(block_ids):
        j = i + 1
        while j < len(block_ids) and block_ids[j] == block_ids[j - 1] + 1:
            j += 1
        runs.append((i, block_ids[i], j - i))
        i = j
    return runs


class CacheWriter:
    """WriteFn copying into per-layer caches k_caches[l], v_caches[l]: [num_blocks, *block_shape];
    on contiguous CPU caches it also hands out the destination bytes themselves (`views`).

    The frame's format and the cache's may differ (prefill and decode pools tuned apart): the
    conversion happens here, at the boundary.
        frame              float cache (any float dtype)      quantized cache (QuantKV, codec c)
        float blocks       copy_ (casts the dtype)            encoded to c (kv_transfer/codec.py)
        Encoded, codec c   decoded, copied                    codes + scales copied as they are
        Encoded, other     decoded, copied                    decoded, encoded to c
    """

    def __init__(self, k_caches: Sequence, v_caches: Sequence):
        self.k_caches, self.v_caches = k_caches, v_caches
        self.quantized = isinstance(k_caches[0], QuantKV) if k_caches else False
        self.viewable = all(c.device.type == "cpu" and c.is_contiguous() for c in [*k_caches, *v_caches])

    def _check(self, layer: int, block_ids: Sequence[int], dtype: torch.dtype, block_shape, exact: bool) -> None:
        """Shape and block ids in range; the dtype the cache's own (exact: raw bytes land) or, for a
        write that converts, any float dtype."""
        kc = self.k_caches[layer]
        ok = dtype == kc.dtype if exact else dtype in kvcodec.FLOAT_DTYPES
        if not ok or tuple(block_shape) != tuple(kc.shape[1:]):
            raise ValueError(f"layer {layer}: frame blocks are {dtype}{list(block_shape)}, "
                             f"cache blocks are {kc.dtype}{list(kc.shape[1:])}")
        if block_ids and max(block_ids) >= kc.shape[0]:
            raise ValueError(f"block id {max(block_ids)} outside a cache of {kc.shape[0]} blocks")

    def lands_raw(self, dtype: torch.dtype) -> bool:
        """Whether an uncompressed frame of `dtype` can land byte for byte (views)."""
        return self.viewable and dtype == self.k_caches[0].dtype

    def __call__(self, layer: int, block_ids: list[int], k, v) -> None:
        self._check(layer, block_ids, k.dtype, k.shape[1:], exact=False)
        kc, vc = self.k_caches[layer], self.v_caches[layer]
        if self.quantized:
            (kq, ks), (vq, vs) = kvcodec.to_codec(k, kc.codec), kvcodec.to_codec(v, vc.codec)
            for i, lo, n in _runs(block_ids):
                for cache, q, s in ((kc, kq, ks), (vc, vq, vs)):
                    cache.data[lo:lo + n].copy_(q[i:i + n])
                    cache.scale[lo:lo + n].copy_(s[i:i + n])
            return
        if isinstance(k, kvcodec.Encoded):
            k, v = k.decode(), v.decode()
        for i, lo, n in _runs(block_ids):  # slice copies: cheaper than index_copy_
            kc[lo:lo + n].copy_(k[i:i + n])
            vc[lo:lo + n].copy_(v[i:i + n])

    def views(self, layer: int, block_ids: Sequence[int], dtype: torch.dtype, block_shape) -> list[memoryview]:
        """Writable byte views of blocks `block_ids` of layer `layer`, in wire payload order: the K
        bytes of every block, then the V bytes (one view per run of consecutive ids). Raises
        ValueError for a dtype, shape or block id the cache does not have."""
        self._check(layer, block_ids, dtype, block_shape, exact=True)
        runs = _runs(block_ids)
        return [memoryview(c[lo:lo + n].view(-1).view(torch.uint8).numpy())
                for c in (self.k_caches[layer], self.v_caches[layer]) for _, lo, n in runs]


def cache_writer(k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor]) -> CacheWriter:
    return CacheWriter(k_caches, v_caches)


class PendingTransfer:
    """One reservation: where a request's incoming KV lands and whether it all has."""

    def __init__(self, request_id: str, block_ids: Sequence[int], num_layers: int, write_fn: WriteFn):
        if num_layers < 1 or len(set(block_ids)) != len(block_ids):
            raise ValueError("need num_layers >= 1 and distinct block ids")
        self.request_id = request_id
        self.block_ids = tuple(block_ids)
        self.num_layers = num_layers
        self.bytes_received = 0  # payload bytes written
        self.error: str | None = None
        self._write_fn = write_fn
        self._pos = {b: i for i, b in enumerate(self.block_ids)}  # block id -> index in block_ids
        self._landed = [bytearray(len(block_ids)) for _ in range(num_layers)]  # [layer][pos] 0/1
        self._landed_count = [0] * num_layers
        self._layers_left = num_layers
        self._state = TransferState.PENDING
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._callbacks: list[Callable[[PendingTransfer], None]] = []
        self.claimed = False  # bound to a stream (guarded by the registry's lock)
        if not self.block_ids:  # nothing to transfer: complete on arrival
            self._state = TransferState.COMPLETE
            self._done.set()

    @property
    def state(self) -> TransferState:
        return self._state

    def wait(self, timeout: float | None = None) -> TransferState:
        """Block until terminal (or timeout); the state then. Callable from any thread."""
        self._done.wait(timeout)
        return self._state

    def add_done_callback(self, fn: Callable[[PendingTransfer], None]) -> None:
        """Call fn(self) once terminal, from the thread that ends it (now, if already terminal).
        To resume an asyncio task: fn = lambda t: loop.call_soon_threadsafe(fut.set_result, t)."""
        with self._lock:
            if self._state is TransferState.PENDING:
                self._callbacks.append(fn)
                return
        fn(self)

    def write(self, header: wire.FrameHeader, k: torch.Tensor, v: torch.Tensor) -> None:
        """Land one decoded, checksummed frame; raises TransferClosed / MalformedFrame without writing."""
        if isinstance(k, kvcodec.Encoded) and not isinstance(self._write_fn, CacheWriter):
            k, v = k.decode(), v.decode()          # only a CacheWriter takes codes undecoded
        with self._lock:
            positions = self._positions(header)
            try:
                self._write_fn(header.layer, list(header.block_ids), k, v)
            except (ValueError, TypeError) as e:
                raise MalformedFrame(str(e)) from None
            callbacks = self._mark(header, positions)
        if callbacks is not None:
            self._run(callbacks)

    # Direct landing, all on the stream's thread: target() -> locked() writes -> checksum -> commit().
    def target(self, header: wire.FrameHeader) -> tuple[list[int], list[memoryview] | None]:
        """Validate `header` against this reservation before any byte of its payload is read:
        PENDING, layer in range, every block reserved and not landed yet, dtype and block shape
        those of the cache. Returns the positions it fills (for commit) and writable views of its
        destination bytes in payload order (None if the cache cannot be viewed, or the frame's
        dtype is not the cache's: use write(), which converts)."""
        with self._lock:
            positions = self._positions(header)
        writer = self._write_fn
        if not isinstance(writer, CacheWriter) or not writer.lands_raw(wire.DTYPES[header.dtype]):
            return positions, None
        try:
            return positions, writer.views(header.layer, header.block_ids, wire.DTYPES[header.dtype],
                                           header.shape[1:])
        except (ValueError, TypeError) as e:
            raise MalformedFrame(str(e)) from None

    def locked(self, fn: Callable, *args):
        """fn(*args) (a bounded write into this reservation's target views) iff still PENDING,
        atomically with respect to end(): after abort() returns, no such write runs or is running."""
        with self._lock:
            if self._state is not TransferState.PENDING:
                raise TransferClosed(f"request {self.request_id!r} is {self._state.value}: frame dropped")
            return fn(*args)

    def commit(self, header: wire.FrameHeader, positions: list[int]) -> None:
        """The frame target() returned `positions` for landed whole and its checksum passed."""
        with self._lock:
            if self._state is not TransferState.PENDING:
                raise TransferClosed(f"request {self.request_id!r} is {self._state.value}: "
                                     f"frame for layer {header.layer} dropped")
            callbacks = self._mark(header, positions)
        if callbacks is not None:
            self._run(callbacks)

    def _positions(self, header: wire.FrameHeader) -> list[int]:
        """Indices into block_ids the frame fills; raises unless it may land now. Caller holds the lock."""
        if self._state is not TransferState.PENDING:
            raise TransferClosed(f"request {self.request_id!r} is {self._state.value}: "
                                 f"frame for layer {header.layer} dropped")
        if header.layer >= self.num_layers:
            raise MalformedFrame(f"layer {header.layer} >= num_layers {self.num_layers}")
        landed = self._landed[header.layer]
        positions: dict[int, None] = {}  # ordered set
        for b in header.block_ids:
            p = self._pos.get(b)
            if p is None:
                raise MalformedFrame(f"block {b} is not reserved for {self.request_id!r}")
            if landed[p] or p in positions:
                raise MalformedFrame(f"block {b} of layer {header.layer} sent twice")
            positions[p] = None
        return list(positions)

    def _mark(self, header: wire.FrameHeader, positions: list[int]) -> list | None:
        """Record a landed frame; the callbacks to run if that completed the transfer. Caller holds the lock."""
        landed = self._landed[header.layer]
        for p in positions:
            landed[p] = 1
        self.bytes_received += header.nbytes
        self._landed_count[header.layer] += len(positions)
        if positions and self._landed_count[header.layer] == len(self.block_ids):
            self._layers_left -= 1
            if self._layers_left == 0:
                return self._finish(TransferState.COMPLETE, None)
        return None

    def missing(self) -> str:
        """Human-readable list of layers not fully landed ('' when none)."""
        with self._lock:
            incomplete = [f"{l} ({c}/{len(self.block_ids)} blocks)"
                          for l, c in enumerate(self._landed_count) if c < len(self.block_ids)]
        return ", ".join(incomplete)

    def end(self, state: TransferState, reason: str) -> bool:
        """Move PENDING -> `state` (FAILED or ABORTED); False if already terminal."""
        with self._lock:
            if self._state is not TransferState.PENDING:
                return False
            callbacks = self._finish(state, reason)
        self._run(callbacks)
        return True

    def _finish(self, state: TransferState, reason: str | None) -> list:
        # caller holds self._lock
        self._state, self.error = state, reason
        callbacks, self._callbacks = self._callbacks, []
        self._done.set()
        return callbacks

    def _run(self, callbacks: list) -> None:
        for fn in callbacks:
            fn(self)


class KVReceiver:
    """Thread-safe registry of reservations, keyed by request id. One per decode worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, PendingTransfer] = {}

    def expect(self, request_id: str, dst_block_ids: Sequence[int], num_layers: int,
               write_fn: WriteFn) -> PendingTransfer:
        """Reserve: frames for request_id may land in dst_block_ids (already allocated by the
        caller) for layers [0, num_layers). Raises ValueError if the id is already pending."""
        entry = PendingTransfer(request_id, dst_block_ids, num_layers, write_fn)
        if entry.state is not TransferState.PENDING:
            return entry
        with self._lock:
            if request_id in self._pending:
                raise ValueError(f"request {request_id!r} already has a pending transfer")
            self._pending[request_id] = entry
        entry.add_done_callback(self._forget)
        return entry

    def abort(self, request_id: str, reason: str = "aborted by the decode worker") -> bool:
        """Fence off request_id: no byte of it is written after this returns. False if not pending."""
        with self._lock:
            entry = self._pending.get(request_id)
        return entry is not None and entry.end(TransferState.ABORTED, reason)

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def claim(self, request_id: str) -> PendingTransfer:
        """Bind a stream to the pending reservation for request_id."""
        with self._lock:
            entry = self._pending.get(request_id)
            if entry is None:
                raise UnknownRequest(f"no pending transfer for request {request_id!r}")
            if entry.claimed:
                raise DuplicateStream(f"request {request_id!r} is already being received")
            entry.claimed = True
            return entry

    def unclaim(self, entry: PendingTransfer) -> None:
        """Unbind a stream that claimed `entry` under an id it may not own (a first frame that
        failed its checksum): the reservation waits for its real sender again."""
        with self._lock:
            entry.claimed = False

    def _forget(self, entry: PendingTransfer) -> None:
        with self._lock:
            if self._pending.get(entry.request_id) is entry:
                del self._pending[entry.request_id]


class InboundStream:
    """The frames of one push RPC. Driven by one coroutine; not thread-safe itself.

    Frames of one piece (one send_layer call) arrive in order 0..chunks-1, not interleaved with
    another piece; pieces and layers may come in any order."""

    def __init__(self, receiver: KVReceiver):
        self._receiver = receiver
        self._entry: PendingTransfer | None = None
        self._piece: tuple[int, int, int] | None = None  # open piece: (layer, next chunk, chunks)
        self._t_first = 0.0  # time.perf_counter() of the first frame

    def feed(self, frame: bytes) -> None:
        header, k, v = wire.decode_frame(frame, keep_codes=True)
        if self._entry is None:
            self._t_first = time.perf_counter()
            self._entry = self._receiver.claim(header.request_id)
        elif header.request_id != self._entry.request_id:
            raise MalformedFrame(f"frame for {header.request_id!r} in the stream of "
                                 f"{self._entry.request_id!r}")
        self._check_order(header)
        self._entry.write(header, k, v)

    def _check_order(self, h: wire.FrameHeader) -> None:
        expected = self._piece or (h.layer, 0, h.chunks)
        if (h.layer, h.chunk, h.chunks) != expected:
            raise DataLoss(f"expected layer {expected[0]} chunk {expected[1]} of {expected[2]}, "
                           f"got layer {h.layer} chunk {h.chunk} of {h.chunks}")
        self._piece = (h.layer, h.chunk + 1, h.chunks) if h.chunk + 1 < h.chunks else None

    def close(self) -> wire.Ack:
        """The client finished writing: the reservation must be complete."""
        if self._entry is None:
            raise MalformedFrame("stream ended before its first frame")
        if self._piece is not None:
            layer, nxt, chunks = self._piece
            raise DataLoss(f"truncated: stream ended after chunk {nxt - 1} of {chunks} of layer {layer}")
        if self._entry.state is TransferState.PENDING:
            raise DataLoss(f"truncated: layers incomplete: {self._entry.missing()}")
        if self._entry.state is not TransferState.COMPLETE:
            raise TransferClosed(f"request {self._entry.request_id!r} is {self._entry.state.value}")
        return wire.Ack(self._entry.bytes_received, time.perf_counter() - self._t_first)

    def fail(self, error: BaseException) -> None:
        """Mark the reservation failed (no-op if unbound or already terminal)."""
        if self._entry is not None:
            reason = str(error) if isinstance(error, KVTransferError) else f"stream broke: {error!r}"
            self._entry.end(TransferState.FAILED, reason)

"""The prefill side's view of a KV transport: open a layer-wise sender per request.

Two implementations are planned: gRPC over TCP (`grpc_transport.GrpcKVTransport`, this one) and
RDMA. Both keep the same contract, so the prefill worker never knows which one it holds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch


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
    blocks the caller will send. Each (layer, block) must be sent exactly once."""

    @abstractmethod
    def send_layer(self, layer: int, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                   first: int = 0) -> None:
        """Enqueue K, V [n, block_size, num_kv_heads, head_dim] of `layer`, destined for
        dst_block_ids[first:first + n]; returns at once. The sender owns the tensors from now on
        (pass fresh gathered copies, never cache views). Raises ValueError on a shape mismatch;
        transfer failures surface in finish()."""

    @abstractmethod
    def finish(self, timeout: float | None = None) -> TransferStats:
        """Wait until the receiver acked every frame (ownership handed over). Raises
        KVTransferError (with the receiver's status) if the transfer failed."""

    @abstractmethod
    def abort(self) -> None:
        """Stop sending and cancel the stream; the receiver marks the request failed."""


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
    from kv_transfer import wire
    n = k_blocks.shape[0] if k_blocks.dim() else 0
    if layer < 0 or first < 0 or first + n > len(dst):
        raise ValueError(f"layer {layer}, blocks [{first}, {first + n}) outside the {len(dst)} reserved blocks")
    wire.check_blocks(dst[first:first + n], k_blocks, v_blocks)
    block_bytes = 2 * k_blocks[:1].numel() * k_blocks.element_size()
    if block_bytes > max_frame_payload:
        raise ValueError(f"a {block_bytes}-byte K+V block does not fit {what} of {max_frame_payload} payload bytes")
    return n


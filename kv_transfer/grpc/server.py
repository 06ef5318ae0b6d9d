"""Thin grpc.aio wrapper serving a KVReceiver: one Push RPC (client stream of raw-bytes frames)."""
from __future__ import annotations

import asyncio
import logging

import grpc

from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.errors import KVTransferError
from pdcluster.kv_transfer.grpc.base import AioKVServer
from pdcluster.kv_transfer.malloc_tuning import keep_large_buffers
from pdcluster.kv_transfer.receiver import InboundStream, KVReceiver

log = logging.getLogger(__name__)

REJECT_DRAIN_S = 10.0  # how long a rejected stream may keep writing before it is cut off, seconds


class KVServer(AioKVServer):
    """The gRPC transport's decode side (grpc/base.py AioKVServer). With a secret, a Push without
    the matching x-pdcluster-secret metadata gets UNAUTHENTICATED."""
    service, method, listener = wire.SERVICE, "Push", "a decode worker's gRPC KV listener"

    def __init__(self, receiver: KVReceiver, *, host: str = "127.0.0.1", port: int = 0,
                 secret: str | None = None, max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(receiver, host=host, port=port, secret=secret, max_message_bytes=max_message_bytes)
        keep_large_buffers()

    def _handler(self) -> grpc.RpcMethodHandler:
        return grpc.stream_unary_rpc_method_handler(self._push)  # raw bytes in and out

    async def _push(self, frames, context: grpc.aio.ServicerContext) -> bytes:
        if not self._authorized(context):
            await _reject(frames, context, KVTransferError(
                f"missing or wrong {wire.SECRET_METADATA_KEY} metadata", "UNAUTHENTICATED"))
        stream = InboundStream(self.receiver)
        try:
            async for frame in frames:
                stream.feed(frame)
            return wire.encode_ack(stream.close())
        except KVTransferError as e:  # the reservation fails, the sender gets the status
            stream.fail(e)
            await _reject(frames, context, e)
        except Exception as e:  # a bug, or the cache write's own failure: INTERNAL, as the TCP server answers
            log.exception("gRPC KV stream failed")
            stream.fail(e)
            await _reject(frames, context, KVTransferError(f"internal error: {e!r}", "INTERNAL"))
        except BaseException as e:  # cancelled by the client: fail, never complete
            stream.fail(e)
            raise


async def _reject(frames, context: grpc.aio.ServicerContext, error: KVTransferError) -> None:
    """End the RPC with error's status once the client stopped writing (see REJECTED_METADATA_KEY).
    Frames still arriving are dropped unread; a client that keeps writing is cut off after
    REJECT_DRAIN_S seconds."""
    await context.send_initial_metadata(((wire.REJECTED_METADATA_KEY, error.status),))
    try:
        await asyncio.wait_for(_discard(frames), REJECT_DRAIN_S)
    except asyncio.TimeoutError:
        pass
    await context.abort(grpc.StatusCode[error.status], str(error))


async def _discard(frames) -> None:
    async for _ in frames:
        pass

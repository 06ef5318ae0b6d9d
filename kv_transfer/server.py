"""Thin grpc.aio wrapper serving a KVReceiver: one Push RPC (client stream of raw-bytes frames)."""
from __future__ import annotations

import asyncio
import hmac

import grpc

from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.errors import KVTransferError
from pdcluster.kv_transfer.loop_thread import shared_loop
from pdcluster.kv_transfer.malloc_tuning import keep_large_buffers
from pdcluster.kv_transfer.receiver import InboundStream, KVReceiver
from pdcluster.ports import GRPC_NO_REUSEPORT, bind_grpc

REJECT_DRAIN_S = 10.0  # how long a rejected stream may keep writing before it is cut off, seconds


class KVServer:
    """Binds host:port (port 0 = ephemeral; `port` holds the bound one after start). With a
    secret, a Push without the matching x-pdcluster-secret metadata gets UNAUTHENTICATED."""

    def __init__(self, receiver: KVReceiver, *, host: str = "127.0.0.1", port: int = 0,
                 secret: str | None = None,
                 max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES):
        self.receiver, self.host, self.port = receiver, host, port
        self._secret = secret.encode() if secret is not None else None
        self._max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None
        keep_large_buffers()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Serve on the running event loop."""
        opts = [("grpc.max_send_message_length", self._max_message_bytes),
                ("grpc.max_receive_message_length", self._max_message_bytes), GRPC_NO_REUSEPORT]
        self._server = grpc.aio.server(options=opts)
        handler = grpc.stream_unary_rpc_method_handler(self._push)  # raw bytes in and out
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(wire.SERVICE, {"Push": handler}),))
        self.port = bind_grpc(self._server, self.host, self.port, "a decode worker's gRPC KV listener", "its kv_port (0, the default, takes any free port)")
        await self._server.start()

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    def start_sync(self) -> None:
        """Serve on the process's shared KV loop thread (for callers without an event loop)."""
        asyncio.run_coroutine_threadsafe(self.start(), shared_loop()).result()

    def stop_sync(self, grace: float | None = None) -> None:
        asyncio.run_coroutine_threadsafe(self.stop(grace), shared_loop()).result()

    async def _push(self, frames, context: grpc.aio.ServicerContext) -> bytes:
        if self._secret is not None:
            got = dict(context.invocation_metadata()).get(wire.SECRET_METADATA_KEY, "")
            if not hmac.compare_digest(got.encode(), self._secret):
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
        except BaseException as e:  # cancelled by the client, or a bug: fail, never complete
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

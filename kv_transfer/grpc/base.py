"""The grpc.aio plumbing shared by the gRPC and Mooncake transports (both speak one raw-bytes
method per request on the shared KV loop): a server with the secret check, and channels by address."""
from __future__ import annotations

import asyncio
import hmac

import grpc

from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.loop_thread import shared_loop
from pdcluster.kv_transfer.receiver import KVReceiver
from pdcluster.kv_transfer.serving import KVServerBase
from pdcluster.ports import GRPC_NO_REUSEPORT, bind_grpc


# calls served at once (authenticated or not, a refused one draining too), as the TCP server's MAX_CONNECTIONS;
# past it gRPC answers RESOURCE_EXHAUSTED at once: peers without the secret cannot pile up streams without end
MAX_STREAMS = 256


class AioKVServer(KVServerBase):
    """A grpc.aio server of one method (`service`/`method`, raw bytes in and out) on the shared KV
    loop. With a secret, callers must send it as x-pdcluster-secret metadata (`_authorized`)."""
    service: str
    method: str
    listener: str  # what the port is, for PortInUse

    def __init__(self, receiver: KVReceiver, *, host: str = "127.0.0.1", port: int = 0,
                 secret: str | None = None, max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(receiver, host=host, port=port)
        self._secret = secret.encode() if secret is not None else None
        self._max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None

    def _handler(self) -> grpc.RpcMethodHandler:
        """The method's handler (e.g. grpc.stream_unary_rpc_method_handler(self._push))."""
        raise NotImplementedError

    async def start(self) -> None:
        """Serve on the running event loop."""
        opts = [("grpc.max_send_message_length", self._max_message_bytes),
                ("grpc.max_receive_message_length", self._max_message_bytes), GRPC_NO_REUSEPORT]
        self._server = grpc.aio.server(options=opts, maximum_concurrent_rpcs=MAX_STREAMS)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(self.service, {self.method: self._handler()}),))
        self.port = bind_grpc(self._server, self.host, self.port, self.listener,
                              "its kv_port (0, the default, takes any free port)")
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

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        """True without a secret, else iff the call's metadata carries it (constant-time compare)."""
        if self._secret is None:
            return True
        got = dict(context.invocation_metadata()).get(wire.SECRET_METADATA_KEY, "")
        return hmac.compare_digest(got.encode(), self._secret)


class Channels:
    """grpc.aio channels by decode address, each made on first use; loop thread only."""

    def __init__(self, max_message_bytes: int):
        self._opts = [("grpc.max_send_message_length", max_message_bytes),
                      ("grpc.max_receive_message_length", max_message_bytes)]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=self._opts)
        return self._channels[address]

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

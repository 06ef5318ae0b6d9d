"""uvicorn serving the OpenAI app (router/openai/app.py) on the router's own event loop, beside the
gRPC server: same process, same Router. Signals stay with `pdcluster serve` (its graceful stop)."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

import uvicorn

from pdcluster.ports import PortInUse
from pdcluster.router.openai.app import Api, asgi_app

log = logging.getLogger(__name__)

# Kernel send buffer per HTTP connection, bytes (Linux doubles it; fixing it turns off autotuning,
# which grows it to tcp_wmem's max, 4 MiB, for a client that reads nothing). A client that stops
# reading then stalls our writes after ~0.2 MB, and the slow-reader bound (sse.py) starts counting,
# instead of after 4 MiB of tokens. Token streams need little: 128 KiB per round trip.
SEND_BUFFER_BYTES = 64 * 1024


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):         # the serve command owns SIGINT/SIGTERM
        yield


class HttpServer:
    def __init__(self, router, model_name: str, vocab_size: int, host: str = "127.0.0.1", port: int = 8000,
                 auth=None, tls_cert: str | None = None, tls_key: str | None = None,
                 slow_reader_timeout_s: float = 30.0):
        self.api = Api(router, model_name, vocab_size, auth, slow_reader_timeout_s)
        config = uvicorn.Config(asgi_app(self.api), host=host, port=port, loop="none", lifespan="off",
                                access_log=False, log_level="warning", ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                timeout_graceful_shutdown=1)
        self.server = _Server(config)
        self.host, self.port, self._task = host, port, None

    async def start(self) -> None:
        sock = _listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():       # failed to start (uvicorn logged why)
                self._task.result()
                raise RuntimeError(f"the OpenAI HTTP endpoint on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)

    async def drain(self, timeout_s: float) -> int:
        """New requests get 503; requests in flight (streams) may finish within timeout_s. Those left
        then end with 503 naming the bound (a stream: an error event, then [DONE]), their choices
        cancelled on the workers. Returns how many were cut. An idle keep-alive connection holds no
        request task and is not waited for."""
        self.api.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        tasks = self.server.server_state.tasks
        while tasks and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = len(tasks)
        if left:
            self.api.cut_reason = f"the server is shutting down: request cut after the {timeout_s:g}s drain bound"
            self.api.cut.set()
            end = loop.time() + 10.0        # each ends once its workers have its abort
            while tasks and loop.time() < end:
                await asyncio.sleep(0.05)
        return left

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._task, 10)
        self.api.tokenize.shutdown(wait=False, cancel_futures=True)


def _listen(host: str, port: int) -> socket.socket:
    """The bound listening socket (uvicorn listens on it); its connections inherit SEND_BUFFER_BYTES.
    PortInUse, naming --http-port, when the port is taken."""
    family, _, _, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(host, port, "the router's OpenAI HTTP endpoint", "--http-port") from None
        raise
    return sock

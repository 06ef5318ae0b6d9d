"""uvicorn serving the OpenAI app (router/openai/app.py) on the router's own event loop, beside the
gRPC server: same process, same Router. Signals stay with `pdcluster serve` (its graceful stop)."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn

from pdcluster.ports import check_free
from pdcluster.router.openai.app import Api, make_app
from pdcluster.router.openai.body_limit import BodyLimit

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):         # the serve command owns SIGINT/SIGTERM
        yield


class HttpServer:
    def __init__(self, router, model_name: str, vocab_size: int, host: str = "127.0.0.1", port: int = 8000,
                 auth=None, tls_cert: str | None = None, tls_key: str | None = None):
        self.api = Api(router, model_name, vocab_size, auth)
        config = uvicorn.Config(BodyLimit(make_app(self.api)), host=host, port=port, loop="none", lifespan="off",
                                access_log=False, log_level="warning", ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                timeout_graceful_shutdown=1)
        self.server = _Server(config)
        self.host, self.port, self._task = host, port, None

    async def start(self) -> None:
        check_free(self.host, self.port, "the router's OpenAI HTTP endpoint", "--http-port")
        self._task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:
            if self._task.done():       # failed to start (uvicorn logged why)
                self._task.result()
                raise RuntimeError(f"the OpenAI HTTP endpoint on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    async def drain(self, timeout_s: float) -> None:
        """New requests get 503; requests in flight (streams) may finish within timeout_s. An idle
        keep-alive connection holds no request task and is not waited for."""
        self.api.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.server.server_state.tasks and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._task, 10)
        self.api.tokenize.shutdown(wait=False, cancel_futures=True)

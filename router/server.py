"""The router's gRPC front door (router/proto/generation.proto): Generation, grpc.health.v1.Health, server reflection.
A thin layer: protobuf <-> Router, exceptions -> status codes."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdcluster.logs import clip
from pdcluster.ports import GRPC_NO_REUSEPORT, bind_grpc
from pdcluster.router.conn_reset import reset_connection
from pdcluster.router.errors import Overloaded, Unavailable
from pdcluster.router.lifecycle import Router
from pdcluster.router.lifecycle.choices import Choice, choice_events, choice_params
from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pb_grpc
from pdcluster.router.validate import InvalidRequest, parse_request, tokenize_executor

log = logging.getLogger(__name__)

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
# Largest request accepted (else RESOURCE_EXHAUSTED before parsing). A request is parsed on the event
# loop: 4 MiB of packed ids parse in ~50 ms. A whole 8k-token context is ~0.1 MB of text.
MAX_REQUEST_BYTES = 4 * 2**20
MAX_STATUS_TEXT = 2048          # characters of a status message: gRPC refuses trailing metadata past 16 KiB, and
                                # the client then sees RESOURCE_EXHAUSTED instead of the request's own status


def status_text(e) -> str:
    """An error's text for a status message, cut to MAX_STATUS_TEXT characters."""
    t = str(e)
    return t if len(t) <= MAX_STATUS_TEXT else t[:MAX_STATUS_TEXT - 3] + "..."


class Malformed:
    """What a request that is not valid protobuf (corrupt wire format, non-UTF-8 in a string field)
    deserializes to, so the servicer answers INVALID_ARGUMENT instead of the library's UNKNOWN."""

    def __init__(self, kind: str, error: Exception):
        self.message = f"request is not a valid {kind} protobuf message: {error}"


def _lenient(msg_type):
    def parse(data: bytes):
        try:
            return msg_type.FromString(data)
        except DecodeError as e:
            return Malformed(msg_type.DESCRIPTOR.name, e)
    return parse


def add_generation_service(servicer, server) -> None:
    """generation_pb2_grpc.add_GenerationServicer_to_server, with lenient request parsing."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=_lenient(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


# logprob entries past which a reply message is built off the event loop: a 3,072-token prompt's logprobs with
# 20 alternatives each are ~64k protobuf objects (tens of ms), times n choices
OFF_LOOP_LOGPROBS = 256


def message(rid: str, k: int, ev) -> pb.GenerateResponse:
    """Choice k's event as the reply message."""
    msg = pb.GenerateResponse(request_id=rid, token_ids=ev.token_ids, text=ev.text, index=k,
                              finish_reason=FINISH.get(ev.finish_reason, pb.FINISH_REASON_UNSPECIFIED))
    if ev.placement:
        msg.placement.CopyFrom(pb.Placement(**ev.placement))
    if ev.usage:
        msg.usage.CopyFrom(pb.Usage(**ev.usage))
    for out, lps in ((msg.logprobs, ev.logprobs), (msg.prompt_logprobs, ev.prompt_logprobs or ())):
        for lp in lps:
            out.add(token_id=lp.token_id, logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v)
                                                                    for t, v in lp.top])
    return msg


class SlowReader(Exception):
    """The client left a write stalled past the slow-reader bound (maps to RESOURCE_EXHAUSTED)."""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless `authorization: Bearer <token>` names a known token. The health service
    stays open so load balancers can probe."""

    OPEN = ("/grpc.health.v1.Health/",)

    def __init__(self, auth):
        self.auth = auth

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid authorization bearer token")
        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(self.OPEN):
            return await continuation(details)
        md = dict(details.invocation_metadata or ())
        if self.auth.tenant(md.get("authorization")) is None:
            return self._deny_stream if details.method.endswith("/Generate") else self._deny_unary
        return await continuation(details)


def tenant_of(context, auth) -> str | None:
    """Cache salt for this call: the authenticated tenant (never taken from the client)."""
    if auth is None:
        return None
    md = dict(context.invocation_metadata() or ())
    return auth.tenant(md.get("authorization"))


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, model_name: str, vocab_size: int, auth=None,
                 slow_reader_timeout_s: float = 30.0):
        self.router = router
        self.auth = auth
        self.model_name = model_name
        self.vocab_size = vocab_size
        # Buffering bound for a client that stops reading: gRPC's flow control stalls our writes once
        # its window (a few MB) is full; a write stalled this long cancels the request (its KV blocks
        # are freed on every worker) with RESOURCE_EXHAUSTED instead of holding its slot forever.
        self.slow_reader_timeout_s = slow_reader_timeout_s
        self.port = 0                   # the bound port, set by RouterServer (conn_reset matches on it)
        self.draining = False           # set by RouterServer.drain: new calls get UNAVAILABLE
        self._calls: set[asyncio.Task] = set()      # Generate handlers in progress
        # (tenant, request_id) of the clients' named requests in flight -> the call (its handler task) holding it;
        # a cancelled call's id is the client's again while its cleanup runs (a retry at once was ALREADY_EXISTS)
        self._client_ids: dict[tuple, asyncio.Task] = {}
        self._cut: str | None = None    # why the calls left after a drain are being ended
        # Tokenizing a long prompt is CPU work (a 600 KB text: ~1 s): it runs on the router's one tokenizing
        # thread, which the HTTP API shares (validate.tokenize_executor), never on the event loop.
        self._tokenize = (tokenize_executor(router) if router is not None else
                          ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-tokenize"))

    async def Generate(self, request, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry on another")
        task = asyncio.current_task()
        self._calls.add(task)
        try:
            await self._generate(request, context, task)
        finally:
            self._calls.discard(task)

    async def _generate(self, request, context, task) -> None:
        r = self.router
        first = True
        rid = request.request_id or uuid.uuid4().hex
        tenant = tenant_of(context, self.auth)
        key = (tenant, rid) if request.request_id else None
        mine = task                         # this call's hold on key in _client_ids

        def release() -> None:
            if self._client_ids.get(key) is mine:
                del self._client_ids[key]
        try:
            held = self._client_ids.get(key)
            if held is not None and not held.cancelling():  # (a cancelled call's id is free while it cleans up)
                raise InvalidRequest(f"request_id {clip(rid)} is already in flight", code="ALREADY_EXISTS")
            if key is not None:
                self._client_ids[key] = mine
            r.check_room()                  # a full queue is answered before the tokenizing
            parsed = await asyncio.get_running_loop().run_in_executor(
                self._tokenize, parse_request, request, r.tokenizer, self.vocab_size, r.context_tokens)
            # The id the workers know is the client's made unique: a retry under the same request_id
            # is a new request there (never fenced by the old one's abort), and no tenant's id can
            # meet another's. n > 1: choice j is f"{wid}-{j}"; its messages carry index j.
            wid = f"{rid}@{uuid.uuid4().hex[:12]}"
            choices = [Choice(wid if parsed.n == 1 else f"{wid}-{j}", parsed.prompt_ids, p)
                       for j, p in enumerate(choice_params(parsed.params, parsed.n))]
            events = choice_events(r, choices, tenant, context.time_remaining())
            async with contextlib.aclosing(events):
                async for k, ev in events:
                    if len(ev.prompt_logprobs or ()) + len(ev.logprobs) > OFF_LOOP_LOGPROBS:
                        msg = await asyncio.get_running_loop().run_in_executor(self._tokenize, message, rid, k, ev)
                    else:
                        msg = message(rid, k, ev)
                    if first:   # its own batch: an abort must not resend it while a write is stuck
                        await context.send_initial_metadata(())
                    first = False
                    try:   # asyncio.timeout, not wait_for: no task per message
                        async with asyncio.timeout(self.slow_reader_timeout_s):
                            await context.write(msg)
                    except TimeoutError:
                        raise SlowReader(f"client stopped reading: no message accepted for "
                                         f"{self.slow_reader_timeout_s:g}s; request {rid} cancelled") from None
        except InvalidRequest as e:
            await context.abort(getattr(grpc.StatusCode, e.code), status_text(e))
        except SlowReader as e:
            await self._cut_off(context, str(e))
        except Overloaded as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, status_text(e))
        except Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, status_text(e))
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            if self._cut is None:
                raise                       # the client went away
            task.uncancel()                 # shutdown after the drain bound: tell the client why
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._cut)
        except Exception as e:  # never let one request take the router down
            log.exception("request failed")
            await context.abort(grpc.StatusCode.UNAVAILABLE if first else grpc.StatusCode.INTERNAL,
                                status_text(f"request failed: {e}"))
        finally:
            release()

    async def _cut_off(self, context, reason: str) -> None:
        """A slow reader's request is already cancelled (its KV freed). Its status waits behind the
        data the client has not taken: if that does not drain within the bound, reset the client's
        connection (router/conn_reset.py) and return: the status is marked sent, so gRPC would not cancel
        this handler (it slept 30 s, holding the client's request id and a call slot)."""
        log.warning("%s", reason)
        try:
            await asyncio.wait_for(context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason),
                                   self.slow_reader_timeout_s)
        except asyncio.TimeoutError:
            if reset_connection(context.peer(), self.port):
                log.warning("reset the connection of %s: it took no data for %gs", context.peer(),
                            2 * self.slow_reader_timeout_s)
            else:
                log.warning("could not reset the connection of %s; its stream stays open", context.peer())

    async def GetModelInfo(self, request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        p = self.router.workers
        return pb.ModelInfo(model=self.model_name, max_context_tokens=self.router.context_tokens,
                            vocab_size=self.vocab_size, prefill_workers=len(p.prefill), decode_workers=len(p.decode))


def _no_passphrase() -> str:
    raise ValueError("--tls-key is encrypted: gRPC takes an unencrypted PEM private key")


def tls_pair(cert: str | None, key: str | None) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for a TLS endpoint; ValueError unless both are given and are PEM
    files of a matching pair, OSError if one cannot be read."""
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")      # gRPC's policy on keys is its own: check the pair, not its strength
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as e:
        raise ValueError(f"--tls-cert {cert} and --tls-key {key} are not a matching PEM certificate and "
                         f"private key ({e})") from None
    except OSError as e:        # (name the flags and the files: the bare error named neither)
        raise OSError(e.errno, f"cannot read --tls-cert {cert} / --tls-key {key}: {e.strerror}") from None
    with open(key, "rb") as k, open(cert, "rb") as c:
        return k.read(), c.read()


class RouterServer:
    def __init__(self, router: Router, model_name: str, vocab_size: int, host: str = "127.0.0.1", port: int = 50051,
                 auth=None, tls_cert: str | None = None, tls_key: str | None = None,
                 slow_reader_timeout_s: float = 30.0):
        self.router = router
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                               GRPC_NO_REUSEPORT],
                                      interceptors=[AuthInterceptor(auth)] if auth else None)
        self.servicer = GenerationServicer(router, model_name, vocab_size, auth, slow_reader_timeout_s)
        add_generation_service(self.servicer, self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        creds = grpc.ssl_server_credentials([tls_pair(tls_cert, tls_key)]) if tls_cert or tls_key else None
        self.port = self.servicer.port = bind_grpc(self.server, host, port, "the router's gRPC endpoint", "--port",
                                                   creds)
        self.host = host
        self._health: asyncio.Task | None = None      # _follow_health, from start until the drain
        self._serving = False

    async def start(self) -> None:
        await self.server.start()
        self._serving = self.router.ready()
        await self.set_serving(self._serving)
        self._health = asyncio.ensure_future(self._follow_health())

    async def _follow_health(self, every_s: float = 1.0) -> None:
        """Health follows the workers until the drain: SERVING while the router has a healthy worker of
        each role it needs (Router.ready), NOT_SERVING while it has not (every decode worker lost, hung
        or retired), so a load balancer stops sending what could only fail."""
        while True:
            await asyncio.sleep(every_s)
            ok = self.router.ready()
            if ok != self._serving and not self.servicer.draining:
                self._serving = ok
                await self.set_serving(ok)

    async def set_serving(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await _maybe_await(self.health.set(name, status))

    async def drain(self, timeout_s: float) -> int:
        """Graceful stop, first half: health NOT_SERVING, new calls UNAVAILABLE, the streams in
        flight run to their end for up to timeout_s; those left then end with UNAVAILABLE (their
        requests cancelled on the workers). Returns how many were cut."""
        self.servicer.draining = True
        if self._health is not None:
            self._health.cancel()
        await self.set_serving(False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.servicer._calls and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.servicer._calls)
        if left:
            self.servicer._cut = f"the server is shutting down: stream cut after the {timeout_s:g}s drain bound"
            for t in left:
                t.cancel()
            for _ in range(10):             # a cancellation swallowed on its way is sent again
                _, pending = await asyncio.wait(left, timeout=1.0)
                if not pending:
                    break
                for t in pending:
                    t.cancel()
        return len(left)

    async def stop(self, grace: float = 2.0) -> None:
        if self._health is not None:
            self._health.cancel()
        await self.server.stop(grace)
        if self.servicer.router is None:        # its own thread; the router's is the router's (Router.close)
            self.servicer._tokenize.shutdown(wait=False, cancel_futures=True)


async def _maybe_await(x):
    if hasattr(x, "__await__"):
        await x

"""`pdcluster` command line: serve, generate, bench serve, bench scenario, plan."""
from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import math
import os
import signal
import struct
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (not for on/off flags or required options); an option unset by
        default says "(default: none)" unless its help already tells what happens without it."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("%(default)" in h or not action.option_strings or action.default is False or action.required
                or action.default == argparse.SUPPRESS):
            return h
        if action.default is None:
            return h if "default" in h.lower() else h + " (default: none)"
        return h + " (default: %(default)s)"


def _serve_args(p: argparse.ArgumentParser) -> None:
    """The config tree's flags (deploy/flags.py: names, defaults, choices and help from its fields)
    and serve's own: --config, logging."""
    from pdcluster.deploy.config import ClusterConfig
    from pdcluster.deploy.flags import add_flags
    p.set_defaults(tree_flags=add_flags(p, ClusterConfig()))
    p.add_argument("--config", default=None,
                   help="serving config YAML (see deploy/pools.yaml): model, router host/port/metrics port, "
                        "the size bounds, resources and autoscaling knobs of each pool; it overrides the matching "
                        "flags. A pool with min_replicas < max_replicas is scaled by the pool autoscaler "
                        "(unless autoscaler.enabled is false): replicas are added and drained while serving")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="router log level")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="router log lines as text or as one JSON object per line; client-supplied strings are "
                        "escaped either way")


def check_gpus(cfg) -> None:
    """A single-host cluster with --gpu (pools.yaml resources.gpus) takes one GPU per worker: ValueError when
    this host has fewer (else Ray could never place them: serve waited start_timeout_s, 600 s, then failed)."""
    if not cfg.engine.use_gpu or cfg.address:
        return
    import torch
    need = cfg.pools.pool("prefill").initial_replicas + cfg.pools.pool("decode").initial_replicas
    have = torch.cuda.device_count()
    if have < need:
        raise ValueError(f"--gpu: {need} workers take one GPU each; this host has {have} (torch.cuda.device_count())")


def check_disk_tiers(cfg) -> None:
    """On a single-host cluster, each pool's disk tier directory is created and writable now (OSError): else
    every worker failed to start after Ray had, in tracebacks. On a joined cluster it is the nodes' to have."""
    if cfg.address:
        return
    for role in ("prefill", "decode"):
        kw = cfg.engine_kwargs(role)
        d = kw.get("disk_cache_dir")
        if d and kw.get("disk_cache_gb", 0) > 0:
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:        # a file where the directory goes, a read-only parent: name the setting
                raise OSError(e.errno, f"the {role} pool's KV disk tier directory (--kv-disk-cache-dir or the "
                                       f"pool's kv_tiers.disk_cache_dir) cannot be made: {e.strerror}", d) from None
            if not os.access(d, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, f"the {role} pool's KV disk tier directory is not writable", d)


def cmd_serve(a) -> int:
    import uvloop

    from pdcluster.deploy.config import ClusterConfig
    from pdcluster.deploy.flags import apply_flags
    from pdcluster.deploy.launch import Cluster, StartFailed
    try:
        cfg = apply_flags(ClusterConfig(), a, a.tree_flags)
    except ValueError as e:
        print(f"pdcluster serve: {e}", file=sys.stderr)
        return 2
    if cfg.kv.transport == "mooncake":
        from pdcluster.kv_transfer.mooncake.engine import available
        if (reason := available()) is not None:
            print(reason, file=sys.stderr)
            return 2
    from pdcluster.logs import setup_logging
    setup_logging(a.log_level, a.log_format)
    rules = {}          # pool autoscaling: only pools with room to scale (--config sets the bounds)
    if a.config:
        from pdcluster.deploy.pools import PoolsConfigError, load_pools_config
        try:
            cfg = load_pools_config(a.config, base=cfg)
        except (PoolsConfigError, OSError, ValueError) as e:     # every issue, file:line: key: message
            print(f"pdcluster serve: {e}", file=sys.stderr)
            return 2
        rules = cfg.pools.autoscaling_rules()
        if cfg.pools.autoscaler.enabled and not rules:
            logging.getLogger("pdcluster").info("%s: every pool has min_replicas == max_replicas: no autoscaling",
                                                a.config)

    from pdcluster.ports import PortInUse, check_free, host_port

    def via(key: str) -> str:           # the file's key overrides the flag
        return f" (router.{key} in {a.config})" if a.config else ""
    try:    # before Ray and the workers start: a taken port fails in a second, not after the model loads
        check_free(cfg.server.host, cfg.server.port, "the router's gRPC endpoint", "--port" + via("port"))
        check_free(cfg.server.host, cfg.server.metrics_port, "the router's Prometheus metrics",
                   "--metrics-port (0 turns metrics off)" + via("metrics_port"))
        check_free(cfg.server.host, cfg.server.http_port, "the router's OpenAI HTTP endpoint",
                   "--http-port (0 turns HTTP off)" + via("http_port"))
    except PortInUse as e:
        print(f"pdcluster serve: {e.strerror}", file=sys.stderr)
        return 2
    except OSError as e:                # an address this host does not have, or a name that does not resolve
        print(f"pdcluster serve: cannot bind --host {cfg.server.host!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    from pdcluster.deploy.launch import cluster_secret
    from pdcluster.router.auth import TokenAuth
    try:    # the files a request path would read late: bad ones stop serve now, in one line
        from pdcluster.engine.loader import load_model_config
        m = load_model_config(cfg.model)    # (config.json or GGUF metadata: else a traceback once Ray had started)
        check_tokenizer(m)
        check_gpus(cfg)
        check_disk_tiers(cfg)
        if cfg.engine.max_model_len is not None and not 1 <= cfg.engine.max_model_len <= m.max_position_embeddings:
            raise ValueError(f"--max-model-len must be in [1, {m.max_position_embeddings}] (the model's context), "
                             f"got {cfg.engine.max_model_len}")
        if cfg.server.auth_token_file:
            TokenAuth.from_file(cfg.server.auth_token_file)
        if cfg.kv.secret_file:
            cluster_secret(cfg.kv.secret_file)
        if cfg.server.tls_cert or cfg.server.tls_key:
            from pdcluster.router.server import tls_pair
            tls_pair(cfg.server.tls_cert, cfg.server.tls_key)
    except (OSError, ValueError) as e:
        print(f"pdcluster serve: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        starting: asyncio.Future | None = None

        def on_signal() -> None:
            if starting is not None and not starting.done() and not stop.is_set():
                starting.cancel()       # start() stops what it had started (Ray, actors) before it ends
            stop.set()

        def handlers() -> None:         # before the start, and again once Ray is up (its driver installs its own)
            for s in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(s, on_signal)
        handlers()
        print(f"starting pdcluster: {cfg.workers('prefill')} prefill + {cfg.workers('decode')} decode workers ...",
              flush=True)
        cluster = Cluster(cfg)
        cluster.on_ray_up = handlers
        starting = asyncio.ensure_future(cluster.start())   # on failure, whatever started goes again
        try:
            await starting
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            print("interrupted during start-up: stopped what had started", file=sys.stderr, flush=True)
            return 130
        if rules:
            cluster.start_autoscaler(rules, cfg.pools.autoscaler.interval_s)
        print(f"pdcluster serving on {cluster.address} (Ctrl-C to stop)", flush=True)
        if cluster.metrics_port:
            print(f"metrics on http://{host_port(cfg.server.host, cluster.metrics_port)}/metrics", flush=True)
        if cluster.http:
            scheme = "https" if cfg.server.tls_cert else "http"
            print(f"OpenAI API on {scheme}://{host_port(cfg.server.host, cluster.http.port)}/v1", flush=True)
        try:
            await stop.wait()
            n = len(cluster.router.in_flight)
            drain_s = cfg.server.shutdown_drain_s
            print(f"shutting down: no new requests; draining {n} stream(s) for up to {drain_s:g}s ...", flush=True)
            if cluster.http:
                http_drain = asyncio.ensure_future(cluster.http.drain(drain_s))
            cut = await cluster.server.drain(drain_s)
            if cluster.http:
                cut += await http_drain
            print(f"drained; {cut} stream(s) cut at the bound" if cut else "drained", flush=True)
        finally:
            print("shutting down ...", flush=True)
            await cluster.stop()
        return 0

    from ray.exceptions import RayError
    try:
        return uvloop.run(main())
    except PortInUse as e:    # taken between the check above and the bind
        print(f"pdcluster serve: {e.strerror}", file=sys.stderr)
        return 2
    # workers not placed in time; no Ray cluster at --address; a worker killed while it loaded (out of memory)
    except (StartFailed, ConnectionError, RayError) as e:
        print(f"pdcluster serve: {e}", file=sys.stderr)
        return 1


def check_tokenizer(m) -> None:
    """ValueError unless model config m's tokenizer loads (the router loads it once Ray and the workers have
    started: a folder without one failed there, in a traceback)."""
    from pdcluster.engine.tokenizer import load_tokenizer
    try:
        load_tokenizer(m)
    except Exception as e:      # transformers raises OSError, ValueError, TypeError, ... by what is missing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load the tokenizer of {m.path}: {first}") from None


def cmd_generate(a) -> int:
    import grpc

    from pdcluster.router.proto import generation_pb2 as pb
    from pdcluster.router.proto import generation_pb2_grpc as pbg

    async def main() -> int:
        sp = pb.SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                               stop=a.stop or [])
        if a.seed is not None:
            sp.seed = a.seed % 2**64        # any int64 as the HTTP API takes it (the field is a uint64)
        req = pb.GenerateRequest(sampling=sp)
        if a.chat:
            req.chat.messages.add(role="user", content=a.prompt)
        else:
            req.text = a.prompt
        if a.tls_ca:
            try:
                with open(a.tls_ca, "rb") as f:
                    ca = f.read()
            except OSError as e:
                print(f"error: --tls-ca: {e}", file=sys.stderr)
                return 2
            ch = grpc.aio.secure_channel(a.addr, grpc.ssl_channel_credentials(ca))
        else:
            ch = grpc.aio.insecure_channel(a.addr)
        async with ch:
            try:
                last = None
                token = a.auth_token or os.environ.get("PDCLUSTER_TOKEN")
                md = (("authorization", f"Bearer {token}"),) if token else None
                async for m in pbg.GenerationStub(ch).Generate(req, timeout=a.timeout, metadata=md):
                    sys.stdout.write(m.text)
                    sys.stdout.flush()
                    last = m
            except grpc.aio.AioRpcError as e:
                print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
        if last is not None and a.verbose:
            print(f"\n[{pb.FinishReason.Name(last.finish_reason)}] {last.usage}", file=sys.stderr)
        print()
        return 0

    return asyncio.run(main())


def _int64(text: str) -> int:
    """An integer the wire's int64 fields hold (the server checks the field's own range)."""
    v = int(text)
    if not -2**63 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"{text} is out of the 64-bit integer range")
    return v


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return v


def _float32(text: str) -> float:
    """A finite number the wire's 32-bit float fields hold as given: not past their range (it would go as
    infinity), and not a nonzero that rounds to 0 (top_p's 0 is "off")."""
    v = _finite(text)
    try:
        w = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:       # (some Pythons raise; others pack an infinity)
        w = math.inf
    if math.isinf(w):
        raise argparse.ArgumentTypeError(f"{text} is past a 32-bit float's range (the wire's)")
    if v and not w:
        raise argparse.ArgumentTypeError(f"{text} rounds to 0 in a 32-bit float (the wire's)")
    return v


def _seconds(text: str) -> float:
    """A deadline: a finite number of seconds > 0."""
    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text}: a deadline must be > 0 seconds")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The whole `pdcluster` command tree."""
    ap = argparse.ArgumentParser(prog="pdcluster", description="Disaggregated prefill/decode LLM serving.",
                                 formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="start (or join) a Ray cluster, the workers and the gRPC router; blocks",
                       description="Start the workers and the router. Ctrl-C or SIGTERM shuts everything down.",
                       formatter_class=HelpFormatter)
    _serve_args(s)
    s.set_defaults(fn=cmd_serve)
    g = sub.add_parser("generate", help="stream a completion from a running server", formatter_class=HelpFormatter)
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--chat", action="store_true", help="send as a chat message (chat template applied)")
    g.add_argument("--max-tokens", type=_int64, default=64, help="most tokens to generate")
    g.add_argument("--temperature", type=_float32, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=_float32, default=0.0, help="nucleus mass; 0 = off")
    g.add_argument("--top-k", type=_int64, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of a sampled (temperature > 0) completion (default: none, unseeded)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--addr", default="127.0.0.1:50051", help="the router's gRPC address")
    g.add_argument("--timeout", type=_seconds, default=None, help="deadline in seconds (default: none)")
    g.add_argument("--tls-ca", default=None, help="PEM CA (or the server's own certificate): connect over TLS")
    g.add_argument("--auth-token", default=None,
                   help="bearer token for a server started with --auth-token-file (default: $PDCLUSTER_TOKEN)")
    g.add_argument("-v", "--verbose", action="store_true", help="print finish reason and usage")
    g.set_defaults(fn=cmd_generate)
    b = sub.add_parser("bench", help="benchmarks", formatter_class=HelpFormatter)
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    from pdcluster.bench import serve as bench_serve
    bs = bsub.add_parser("serve", help="load a running router and report TTFT/TPOT/ITL/E2E, throughput, goodput",
                         formatter_class=HelpFormatter)
    bench_serve.add_arguments(bs)
    bs.set_defaults(fn=bench_serve.main)
    from pdcluster.bench import scenario as bench_scenario
    bc = bsub.add_parser("scenario", help="run two cluster configurations side by side on one seeded workload",
                         description=bench_scenario.__doc__.split("\n\n")[0],
                         formatter_class=HelpFormatter, epilog=bench_scenario.epilog())
    bench_scenario.add_arguments(bc)
    bc.set_defaults(fn=bench_scenario.main)
    from pdcluster.sim import plan as sim_plan
    pl = sub.add_parser("plan", help="size prefill/decode pools for a trace with the simulator; writes a pools.yaml",
                        description=sim_plan.__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    sim_plan.add_arguments(pl)
    pl.set_defaults(fn=sim_plan.main)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

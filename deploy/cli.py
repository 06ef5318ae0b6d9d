"""`pdcluster` command line: serve, generate, bench serve, bench scenario."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (not for flags, nor for options that default to unset)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("%(default)" in h or not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return h
        return h + " (default: %(default)s)"


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="router bind address")
    p.add_argument("--port", type=int, default=50051, help="router gRPC port")
    p.add_argument("--prefill-workers", type=int, default=1, help="prefill worker actors (one device each)")
    p.add_argument("--decode-workers", type=int, default=1, help="decode worker actors (one device each)")
    p.add_argument("--address", default=None, help="join a running Ray cluster ('auto'); default: start one here")
    p.add_argument("--threads-per-worker", type=int, default=1, help="CPU hosts: torch threads per worker actor")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker actor (CUDA hosts)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights, activations and KV cache dtype of every worker")
    p.add_argument("--kv-cache-memory", type=int, default=512, help="MiB of KV cache per worker")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests one worker batches in a step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one engine step (longer prompts prefill in chunks of it)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length cap, prompt + output tokens (default: the model's own)")
    p.add_argument("--local-prefill", action="store_true",
                   help="prefill every request on its decode worker (no remote prefill)")
    p.add_argument("--local-prefill-max-tokens", type=int, default=0,
                   help="prompts up to this many tokens prefill on the decode worker")
    p.add_argument("--metrics-port", type=int, default=9090,
                   help="Prometheus /metrics of the router on --host:PORT (0 = off)")
    p.add_argument("--kv-transport", default="tcp", choices=["grpc", "tcp", "mooncake"],
                   help="how KV goes from prefill to decode workers: a plain TCP socket (default), gRPC, or "
                        "mooncake (the decode side pulls over the Mooncake Transfer Engine, RDMA where NICs "
                        "exist; needs pip install 'pdcluster[rdma]' and libibverbs1)")
    p.add_argument("--kv-compression", default="off", choices=["off", "int8", "fp8", "auto"],
                   help="KV compression on the wire (tcp and grpc transports): int8 or fp8 (e4m3) with a scale "
                        "per block and KV head, ~4x fewer bytes for fp32 caches, 2x for 16-bit ones; auto "
                        "compresses (int8) a transfer when the link's measured bandwidth would make it take "
                        "longer than the prefill it overlaps with (off: every byte exact)")
    p.add_argument("--policy", default="cost-model",
                   choices=["round-robin", "least-loaded", "cache-aware", "cost-model"],
                   help="placement policy (cost-model prices each (prefill, decode) pair and local "
                        "prefill by cache hits, learned rates and measured link bandwidth)")
    p.add_argument("--auth-token-file", default=None,
                   help="require `authorization: Bearer <token>`; one token (or tenant:token) per line; the "
                        "tenant also isolates its prefix cache")
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve the public endpoint over TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--cluster-secret-file", default=None,
                   help="shared secret (first line, >= 16 chars) that the internal KV endpoints require; "
                        "without it, a fresh random secret per serve (the router hands it to the workers it spawns)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="Ray restarts a crashed worker actor this often; it re-registers with the router")
    p.add_argument("--worker-timeout", type=float, default=60.0,
                   help="seconds of silence inside a token stream (or for a reserve) after which a decode worker "
                        "counts as lost and its requests migrate; a stream's heartbeats count while the "
                        "engine keeps stepping")
    p.add_argument("--prefill-timeout", type=float, default=120.0,
                   help="seconds one remote prefill + KV transfer may take before it is recomputed elsewhere")
    p.add_argument("--health-timeout", type=float, default=5.0,
                   help="a worker that misses a status poll for this long is unhealthy (no new placements)")
    p.add_argument("--transfer-timeout", type=float, default=30.0,
                   help="seconds one request's KV transfer may take on either end before it fails and is recomputed")
    p.add_argument("--max-queue-wait", type=float, default=30.0,
                   help="admission: a request whose prefill could not start within this many seconds (the "
                        "queued prompt tokens / the measured prefill rate), or whose first token could not "
                        "come within its own gRPC deadline, gets RESOURCE_EXHAUSTED at once; 0 = only the "
                        "deadline")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM: seconds the streams in flight may take to finish (new requests are "
                        "refused at once, health turns NOT_SERVING); those left then end with UNAVAILABLE")
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


def cmd_serve(a) -> int:
    import uvloop
    rules, interval_s = {}, 5.0        # pool autoscaling: only from --config

    from pdcluster.deploy.launch import Cluster, ClusterConfig
    if a.kv_transport == "mooncake":
        from pdcluster.kv_transfer.mooncake_engine import available
        if (reason := available()) is not None:
            print(reason, file=sys.stderr)
            return 2
    from pdcluster.logs import setup_logging
    setup_logging(a.log_level, a.log_format)
    cfg = ClusterConfig(model=a.model, host=a.host, port=a.port, prefill_workers=a.prefill_workers,
                        decode_workers=a.decode_workers, address=a.address, threads_per_worker=a.threads_per_worker,
                        use_gpu=a.gpu, dtype=a.dtype, kv_cache_memory=a.kv_cache_memory * 2**20,
                        max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                        max_model_len=a.max_model_len, remote_prefill=not a.local_prefill,
                        local_prefill_max_tokens=a.local_prefill_max_tokens, metrics_port=a.metrics_port,
                        kv_transport=a.kv_transport, kv_compression=a.kv_compression,
                        auth_token_file=a.auth_token_file, tls_cert=a.tls_cert, tls_key=a.tls_key,
                        policy=a.policy, cluster_secret_file=a.cluster_secret_file, max_restarts=a.max_restarts,
                        worker_timeout_s=a.worker_timeout, prefill_timeout_s=a.prefill_timeout,
                        health_timeout_s=a.health_timeout, transfer_timeout_s=a.transfer_timeout,
                        max_queue_wait_s=a.max_queue_wait or None)
    if a.config:
        from dataclasses import replace

        from pdcluster.deploy.pools import load_pools_config
        pools = load_pools_config(a.config)
        kw = pools.to_cluster_kwargs()
        cfg = replace(cfg, **kw)
        rules, interval_s = pools.autoscaling_rules(), pools.autoscaler.interval_s
        if pools.autoscaler.enabled and not rules:
            logging.getLogger("pdcluster").info("%s: every pool has min_replicas == max_replicas: no autoscaling",
                                                a.config)

    from pdcluster.ports import PortInUse, check_free
    via = " (or router.port / router.metrics_port in --config)" if a.config else ""
    try:    # before Ray and the workers start: a taken port fails in a second, not after the model loads
        check_free(cfg.host, cfg.port, "the router's gRPC endpoint", "--port" + via)
        check_free(cfg.host, cfg.metrics_port, "the router's Prometheus metrics",
                   "--metrics-port (0 turns metrics off)" + via)
    except PortInUse as e:
        print(f"pdcluster serve: {e.strerror}", file=sys.stderr)
        return 2
    from pdcluster.deploy.launch import cluster_secret
    from pdcluster.router.auth import TokenAuth
    try:    # the files a request path would read late: bad ones stop serve now, in one line
        if cfg.auth_token_file:
            TokenAuth.from_file(cfg.auth_token_file)
        if cfg.cluster_secret_file:
            cluster_secret(cfg.cluster_secret_file)
    except (OSError, ValueError) as e:
        print(f"pdcluster serve: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        n_pre = cfg.prefill_workers if cfg.remote_prefill else 0     # --local-prefill: no prefill pool
        print(f"starting pdcluster: {n_pre} prefill + {cfg.decode_workers} decode workers ...", flush=True)
        cluster = Cluster(cfg)
        try:
            await cluster.start()
        except BaseException:
            await cluster.stop()     # whatever started (Ray, actors, servers) goes again
            raise
        if rules:
            cluster.start_autoscaler(rules, interval_s)
        # after ray.init: Ray's driver installs its own fatal-signal handlers, ours must win
        loop = asyncio.get_running_loop()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(s, stop.set)
        print(f"pdcluster serving on {cluster.address} (Ctrl-C to stop)", flush=True)
        if cluster.metrics_port:
            print(f"metrics on http://{cfg.host}:{cluster.metrics_port}/metrics", flush=True)
        try:
            await stop.wait()
            n = len(cluster.router.in_flight)
            print(f"shutting down: no new requests; draining {n} stream(s) for up to {a.drain_timeout:g}s ...",
                  flush=True)
            cut = await cluster.server.drain(a.drain_timeout)
            print(f"drained; {cut} stream(s) cut at the bound" if cut else "drained", flush=True)
        finally:
            print("shutting down ...", flush=True)
            await cluster.stop()

    try:
        uvloop.run(main())
    except PortInUse as e:    # taken between the check above and the bind
        print(f"pdcluster serve: {e.strerror}", file=sys.stderr)
        return 2
    return 0


def cmd_generate(a) -> int:
    import grpc

    from pdcluster.router.proto import generation_pb2 as pb
    from pdcluster.router.proto import generation_pb2_grpc as pbg

    async def main() -> int:
        sp = pb.SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                               stop=a.stop or [])
        if a.seed is not None:
            sp.seed = a.seed
        req = pb.GenerateRequest(sampling=sp)
        if a.chat:
            req.chat.messages.add(role="user", content=a.prompt)
        else:
            req.text = a.prompt
        if a.tls_ca:
            with open(a.tls_ca, "rb") as f:
                ch = grpc.aio.secure_channel(a.addr, grpc.ssl_channel_credentials(f.read()))
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
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus mass; 0 = off")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None, help="seed of a sampled (temperature > 0) completion")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--addr", default="127.0.0.1:50051", help="the router's gRPC address")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
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
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

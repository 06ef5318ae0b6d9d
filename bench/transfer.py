"""KV transfer throughput between two processes on loopback: kv_transfer (gRPC, TCP, Mooncake) vs a raw socket.

A receiver process runs a KVServer and a KVTcpServer whose KVReceiver writes into real per-layer
cache tensors, and a raw TCP listener that recv_into()s the same cache tensors. A sender process
pushes the same `layers x blocks` K/V blocks through GrpcKVTransport and TcpKVTransport (all layers
enqueued at once, so the figure is the transport's, not compute's) and through a plain socket with
sendall(), in turn. Each mode runs --repeats times after one untimed warm-up each; the table shows
payload GB/s (1 GB = 1e9 B, K+V bytes only, first byte sent to the receiver's acknowledgement) and
each transport's median over the raw socket's median.

    python -m pdcluster.bench.transfer                      # 30 layers x 400 blocks, fp32: ~295 MB per run
    python -m pdcluster.bench.transfer --dtype bfloat16 --blocks 800 --chunk-bytes 2097152
    python -m pdcluster.bench.transfer --modes tcp,raw      # skip gRPC
    python -m pdcluster.bench.transfer --modes grpc,tcp,mooncake,raw   # add the mooncake transport (pull; its
                                                  # "tcp" protocol here, needs pdcluster[rdma])
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import socket
import statistics
import sys
import time


import torch  # noqa: E402
from pdcluster.deploy.cli import HelpFormatter  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _layers(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic K, V per layer: [blocks, block_size, kv_heads, head_dim] each."""
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.blocks, args.block_size, args.kv_heads, args.head_dim)
    return [(torch.randn(shape, generator=g).to(DTYPES[args.dtype]),
             torch.randn(shape, generator=g).to(DTYPES[args.dtype])) for _ in range(args.layers)]


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _recv_exact(sock: socket.socket, buf: memoryview) -> None:
    while buf.nbytes:
        n = sock.recv_into(buf)
        if n == 0:
            raise ConnectionError("raw sender closed early")
        buf = buf[n:]


def receiver_main(conn, args) -> None:
    from pdcluster.kv_transfer import KVReceiver, KVServer, KVTcpServer, MooncakeKVServer, TransferState, cache_writer

    torch.set_num_threads(1)
    shape = (args.blocks, args.block_size, args.kv_heads, args.head_dim)
    kc = [torch.zeros(shape, dtype=DTYPES[args.dtype]) for _ in range(args.layers)]
    vc = [torch.zeros(shape, dtype=DTYPES[args.dtype]) for _ in range(args.layers)]
    receiver = KVReceiver()
    server = KVServer(receiver, max_message_bytes=args.chunk_bytes + (1 << 20))
    server.start_sync()
    tcp_server = KVTcpServer(receiver)
    tcp_server.start_sync()
    mc_server = MooncakeKVServer(receiver, kc, vc) if "mooncake" in args.modes.split(",") else None
    if mc_server is not None:
        mc_server.start_sync()
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send((server.port, tcp_server.port, listener.getsockname()[1], mc_server.port if mc_server else 0))
    raw_sock, _ = listener.accept()
    pending = None
    while (msg := conn.recv())[0] != "quit":
        if msg[0] == "expect":  # reserve blocks 0..blocks-1 of layers 0..nl-1 for request msg[1]
            pending = receiver.expect(msg[1], range(args.blocks), msg[2], cache_writer(kc, vc))
            cpu0 = _cpu_s()
            conn.send("ok")
        elif msg[0] == "check":  # the transfer landed, and (once) holds exactly the sent bytes
            state = pending.wait(60)
            exact = None
            cpu = _cpu_s() - cpu0
            if msg[1]:
                exact = all(torch.equal(kc[l], k) and torch.equal(vc[l], v)
                            for l, (k, v) in enumerate(_layers(args)))
            conn.send((state is TransferState.COMPLETE, pending.error, exact, cpu))
        elif msg[0] == "raw":  # receive msg[1] layers of K, V straight into the caches, then ack
            cpu0 = _cpu_s()
            for l in range(msg[1]):
                _recv_exact(raw_sock, _raw(kc[l]))
                _recv_exact(raw_sock, _raw(vc[l]))
            raw_sock.sendall(b"k")
            conn.send(_cpu_s() - cpu0)
    server.stop_sync()
    tcp_server.stop_sync()
    if mc_server is not None:
        mc_server.stop_sync()


def sender_main(conn, args, grpc_port: int, tcp_port: int, raw_port: int, mc_port: int) -> None:
    from pdcluster.kv_transfer import GrpcKVTransport, MooncakeKVTransport, TcpKVTransport

    torch.set_num_threads(1)
    layers = _layers(args)
    transports = {
        "grpc": (GrpcKVTransport(chunk_bytes=args.chunk_bytes,
                                 max_message_bytes=args.chunk_bytes + (1 << 20)), grpc_port),
        "tcp": (TcpKVTransport(chunk_bytes=args.tcp_chunk_bytes), tcp_port),
    }
    if mc_port:
        transports["mooncake"] = (MooncakeKVTransport(), mc_port)
    raw_sock = socket.create_connection(("127.0.0.1", raw_port))
    conn.send("ready")
    while (msg := conn.recv())[0] != "quit":
        nl, cpu0 = msg[2], _cpu_s()
        if msg[0] in transports:
            transport, port = transports[msg[0]]
            sender = transport.open(f"127.0.0.1:{port}", msg[1], range(args.blocks))
            for l in range(nl):  # the bench reuses its tensors: the sender only reads them
                sender.send_layer(l, *layers[l])
            seconds = sender.finish(120).wall_s
        elif msg[0] == "raw":
            t0 = time.perf_counter()
            for k, v in layers[:nl]:
                raw_sock.sendall(_raw(k))
                raw_sock.sendall(_raw(v))
            raw_sock.recv(1)
            seconds = time.perf_counter() - t0
        conn.send((seconds, _cpu_s() - cpu0))
    for transport, _ in transports.values():
        transport.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--layers", type=int, default=30, help="layers of KV sent (one K and one V tensor each)")
    ap.add_argument("--blocks", type=int, default=400, help="blocks per layer")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per block")
    ap.add_argument("--kv-heads", type=int, default=3, help="KV heads per token")
    ap.add_argument("--head-dim", type=int, default=64, help="elements per head")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="KV cache dtype")
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20, help="payload bytes per gRPC message")
    ap.add_argument("--tcp-chunk-bytes", type=int, default=None,
                    help="payload bytes per TCP frame (default: TcpKVTransport's)")
    ap.add_argument("--modes", default="grpc,tcp,raw", help="comma-separated subset of grpc,tcp,mooncake,raw")
    ap.add_argument("--repeats", type=int, default=3, help="timed transfers per mode, alternated")
    ap.add_argument("--seed", type=int, default=0, help="seeds the random KV tensors")
    args = ap.parse_args(argv)
    modes = [m for m in ("grpc", "tcp", "mooncake", "raw") if m in args.modes.split(",")]
    if "raw" not in modes or len(modes) < 2:
        ap.error("--modes needs raw and at least one of grpc, tcp, mooncake")
    if args.tcp_chunk_bytes is None:
        from pdcluster.kv_transfer.tcp.protocol import DEFAULT_CHUNK_BYTES
        args.tcp_chunk_bytes = DEFAULT_CHUNK_BYTES

    ctx = mp.get_context("spawn")
    r_conn, r_child = ctx.Pipe()
    s_conn, s_child = ctx.Pipe()
    receiver = ctx.Process(target=receiver_main, args=(r_child, args), daemon=True)
    receiver.start()
    ports = r_conn.recv()
    sender = ctx.Process(target=sender_main, args=(s_child, args, *ports), daemon=True)
    sender.start()
    assert s_conn.recv() == "ready"

    itemsize = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    layer_bytes = 2 * args.blocks * args.block_size * args.kv_heads * args.head_dim * itemsize
    total = layer_bytes * args.layers

    def run(mode: str, n: int, nl: int, check_exact: bool = False) -> tuple[float, float, float]:
        """(wall seconds, sender CPU seconds, receiver CPU seconds) of one transfer."""
        rid = f"bench-{mode}-{n}"
        if mode != "raw":
            r_conn.send(("expect", rid, nl))
            assert r_conn.recv() == "ok"
        else:
            r_conn.send(("raw", nl))
        s_conn.send((mode, rid, nl))
        seconds, sender_cpu = s_conn.recv()
        if mode != "raw":
            r_conn.send(("check", check_exact))
            ok, error, exact, receiver_cpu = r_conn.recv()
            if not ok or exact is False:
                raise SystemExit(f"{mode} transfer {n} failed: complete={ok} error={error} exact={exact}")
        else:
            receiver_cpu = r_conn.recv()
        return seconds, sender_cpu, receiver_cpu

    for mode in modes:  # warm-ups: connection, allocator, page faults
        run(mode, -1, min(2, args.layers))
    gb = total / 1e9
    # per mode, per run: (GB/s, sender CPU s/GB, receiver CPU s/GB)
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    for i in range(args.repeats):
        for mode in modes:  # alternate, so all see the same background load
            seconds, s_cpu, r_cpu = run(mode, i, args.layers, check_exact=(mode != "raw" and i == 0))
            results[mode].append((gb / seconds, s_cpu / gb, r_cpu / gb))
    r_conn.send(("quit",))
    s_conn.send(("quit",))
    sender.join(30)
    receiver.join(30)

    from pdcluster.kv_transfer.crc import BACKEND
    print(f"geometry: {args.layers} layers x {args.blocks} blocks x [{args.block_size}, {args.kv_heads}, "
          f"{args.head_dim}] {args.dtype}; K+V {total / 1e6:.1f} MB per transfer; chunk {args.chunk_bytes} B "
          f"(gRPC), {args.tcp_chunk_bytes} B (TCP); crc32 via {BACKEND}; exact equality verified on run 1")
    print("GB/s = 1e9 payload bytes per second; CPU = process CPU seconds (all threads) per GB, "
          "sender + receiver")
    names = {"grpc": "gRPC", "tcp": "TCP", "mooncake": "Mooncake", "raw": "raw"}
    print(f"{'run':>6} | " + " | ".join(f"{names[m] + ' GB/s':>9}" for m in modes) + " | "
          + " | ".join(f"{names[m] + ' CPU s/GB':>13}" for m in modes))
    rows = [[f"{i + 1}", *(results[m][i] for m in modes)] for i in range(args.repeats)]
    rows.append(["median", *(tuple(statistics.median(r[c] for r in results[m]) for c in range(3))
                             for m in modes)])
    for name, *cols in rows:
        print(f"{name:>6} | " + " | ".join(f"{c[0]:>9.3f}" for c in cols) + " | "
              + " | ".join(f"{c[1]:>6.2f}+{c[2]:<6.2f}" for c in cols))
    medians = dict(zip(modes, rows[-1][1:]))
    for m in modes[:-1]:
        # each run's modes ran back to back under the same background load: the median of those
        # per-run ratios is the steadier figure when the load drifts during the whole run
        paired = statistics.median(results[m][i][0] / results["raw"][i][0] for i in range(args.repeats))
        print(f"ratio {names[m]} kv_transfer / raw socket = {medians[m][0] / medians['raw'][0]:.2f} "
              f"(medians); {paired:.2f} (median of per-run ratios) (target >= 0.70)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""KV compression on the wire (kv_transfer/codec.py): bytes, transfer time and greedy token agreement.

Real workers, no Ray, on the embedded model (float32 KV cache): one DecodeWorker and, per link, one
PrefillWorker over TCP: "fast" (loopback, unthrottled) and "slow" (the transport's token bucket at
--link-mbps). On each link every mode of --modes runs the same --prompts text prompts one at a time
(each mode under its own cache salt, so every block crosses the link; --output-len greedy tokens).
The table, per (link, mode):

    codecs        transfers per codec the policy chose ("auto" decides per transfer)
    kv_MB         mean payload bytes on the wire per request (1 MB = 1e6 B; K+V, scales excluded)
    ratio         kv_MB of mode "off" on that link / kv_MB
    wall_ms       mean transfer time: first layer handed to the sender -> the receiver's ack
    exposed_ms    mean part of it after the last layer was computed (what TTFT pays)
    prefill_ms    mean prefill call (reserve done -> KV acked): compute + exposed transfer
    link_MBps     the prefill worker's meter EWMA for the link after the mode's requests
    exact         prompts whose greedy tokens equal mode "off"'s on that link
    first_div     token positions of the first divergence of the others

Modes run in the order given, "off" first: "auto" reads the meter, so it should follow "off" (a
token bucket lets a transfer smaller than its burst, one 4 MiB chunk, through at loopback speed, so
compressed transfers can make an emulated link look faster than it is; a real link would not).

    python -m pdcluster.bench.kv_compression                          # 6 prompts of ~400 tokens, 3 MB/s slow link
    python -m pdcluster.bench.kv_compression --modes off,int8 --link-mbps 5
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time


from pdcluster.decode_worker.worker import DecodeWorker  # noqa: E402
from pdcluster.engine.llm_engine import LLMEngine, build_config  # noqa: E402
from pdcluster.engine.sampling_params import SamplingParams  # noqa: E402
from pdcluster.kv_transfer.codec_policy import MODES, CompressionPolicy  # noqa: E402
from pdcluster.prefill_worker.worker import PrefillWorker  # noqa: E402
from pdcluster.deploy.cli import HelpFormatter  # noqa: E402

TOPICS = [
    "the history of lighthouses and the keepers who lived in them",
    "how bread rises: yeast, gluten and the chemistry of baking",
    "why the sky is blue and sunsets are red",
    "the rules of chess and how beginners should study openings",
    "how vaccines train the immune system",
    "the water cycle: evaporation, clouds, rain and rivers",
    "how a compiler turns source code into machine instructions",
    "the migration of birds across continents",
]


def _prompt(topic: str, tokens: int, tokenizer) -> list[int]:
    """A natural-text prompt of about `tokens` tokens on `topic`, ending in a question."""
    body = (f"Here are some notes on {topic}. People have written about {topic} for a long time, "
            f"and the details matter. ")
    ask = f"Question: summarize the key facts about {topic} in one paragraph.\nAnswer:"
    ids = tokenizer.encode(body, add_special_tokens=False)
    ask_ids = tokenizer.encode(ask, add_special_tokens=False)
    reps = max(1, (tokens - len(ask_ids)) // len(ids))
    return ids * reps + ask_ids


def _run(p: PrefillWorker, d: DecodeWorker, rid: str, ids: list[int], params: SamplingParams,
         salt: str) -> tuple[list[int], dict]:
    r = d.reserve(rid, ids, params, cache_salt=salt)
    dest = r.destination()
    t0 = time.perf_counter()
    res = dataclasses.asdict(p.prefill(rid, ids, params, dest, cache_salt=salt))
    res["call_s"] = time.perf_counter() - t0
    stream, toks = d.start(rid, res["first_token"]), [res["first_token"]]
    while not (item := stream.get(timeout=120)).finished:
        toks += item.token_ids
    return toks + item.token_ids, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--modes", default="off,auto,int8,fp8", help=f"comma-separated subset of {MODES}")
    ap.add_argument("--prompts", type=int, default=6, help="prompts sent through prefill, link and decode")
    ap.add_argument("--prompt-len", type=int, default=400, help="tokens per prompt (about)")
    ap.add_argument("--output-len", type=int, default=16, help="greedy output tokens per prompt (EOS ignored)")
    ap.add_argument("--link-mbps", type=float, default=3.0, help="slow link's rate, MB/s (1 MB = 1e6 B)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    a = ap.parse_args(argv)
    modes = a.modes.split(",")
    if "off" not in modes:
        modes.insert(0, "off")  # the reference for bytes and tokens
    mk = lambda: LLMEngine(build_config(kv_cache_memory=256 * 2**20, num_threads=a.threads))  # noqa: E731
    d = DecodeWorker("d", mk(), kv_transport="tcp")
    links = {"fast": None, "slow": a.link_mbps * 1e6}
    params = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    prompts = [_prompt(TOPICS[i % len(TOPICS)], a.prompt_len, d.engine.tokenizer) for i in range(a.prompts)]
    print(f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{a.output_len} greedy output tokens; slow link {a.link_mbps} MB/s (token bucket)")
    print(f"{'link':5} {'mode':5} {'codecs':18} {'kv_MB':>7} {'ratio':>6} {'wall_ms':>8} {'exposed_ms':>10} "
          f"{'prefill_ms':>10} {'link_MBps':>9} {'exact':>6}  first_div")
    try:
        for link, limit in links.items():
            p = PrefillWorker(f"p-{link}", mk(), transport="tcp", bandwidth_limit_bytes_per_s=limit,
                              transfer_timeout_s=120)
            try:
                ref_tokens, ref_mb = None, None
                for mode in modes:
                    p.compression = CompressionPolicy(mode)
                    runs = [_run(p, d, f"{link}-{mode}-{i}", ids, params, salt=f"{link}-{mode}")
                            for i, ids in enumerate(prompts)]
                    toks = [t for t, _ in runs]
                    ref_tokens = ref_tokens or toks
                    mb = statistics.mean(r["kv_bytes"] for _, r in runs) / 1e6
                    ref_mb = ref_mb or mb
                    codecs = {}
                    for _, r in runs:
                        codecs[r["kv_codec"]] = codecs.get(r["kv_codec"], 0) + 1
                    divs = [next(j for j, (x, y) in enumerate(zip(t, r)) if x != y)
                            for t, r in zip(toks, ref_tokens) if t != r]
                    exact = sum(t == r for t, r in zip(toks, ref_tokens))
                    mean = lambda key: statistics.mean(r[key] for _, r in runs)  # noqa: E731
                    print(f"{link:5} {mode:5} {','.join(f'{k}:{v}' for k, v in codecs.items()):18} {mb:7.2f} "
                          f"{ref_mb / mb:5.2f}x {mean('kv_wall_ms'):8.0f} {mean('kv_transfer_ms'):10.0f} "
                          f"{mean('call_s') * 1e3:10.0f} {(p.meter.bandwidth(p.worker_id, 'd') or 0) / 1e6:9.1f} "
                          f"{exact:>3}/{len(prompts):<2}  {divs}", flush=True)
            finally:
                p.close()
    finally:
        d.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

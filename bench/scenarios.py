"""The named scenarios of `pdcluster bench scenario` (bench/scenario.py runs them). Each block says
what it compares, why its sizes are what they are, and what was measured to choose them."""
import os
from dataclasses import replace
from pathlib import Path

from pdcluster.bench.scenario import FRESH_DIR, Scenario, cluster, register

# The scenarios. Defaults sized for the 2-core build machine (whole scenario < 5 minutes).
#
# colocated-vs-disagg, "near saturation": a probe (one cluster per side, this workload with fresh
# seeds at several Poisson rates, 2026-11-22, machine load average 2.5-4 from other jobs) measured
#   offered req/s        inf    0.6    0.9    1.2
#   colocated achieved   1.30   0.37   0.76   1.35   (median TTFT 0.4-0.5 s up to 1.2 req/s)
#   disagg achieved      1.34   0.37   0.73   0.97   (at 1.2: median TTFT 6.1 s, a queue builds)
# so the single prefill worker saturates near 1.0 req/s and two colocated workers near 1.3-1.4;
# 0.9 req/s is ~90% of the disagg capacity and ~70% of the colocated one. With 24 requests a run
# takes ~30 s, a cluster start + warm-up + stop ~15 s: 2 rounds (4 runs) take about 3 minutes.
# The TPOT target, 200 ms (5 tokens/s, about reading speed), was fixed before the comparison runs.
register(Scenario(
    name="colocated-vs-disagg",
    summary="2 colocated workers (prefill+decode on each) vs 1 prefill + 1 decode worker, 1 core per worker",
    # least-loaded on both sides: the disagg side prefills every prompt remotely (the cost model,
    # the default policy, would prefill short prompts on the decode worker)
    baseline=cluster(pools__prefill__initial_replicas=0, pools__decode__initial_replicas=2,
                     router__remote_prefill=False, engine__threads_per_worker=1, router__policy="least-loaded"),
    candidate=cluster(pools__prefill__initial_replicas=1, pools__decode__initial_replicas=1,
                      router__remote_prefill=True, engine__threads_per_worker=1, router__policy="least-loaded"),
    labels=("colocated", "disagg"),
    dataset={"dataset": "mixed", "num_prompts": 24, "input_len": 64, "long_input_len": 384,
             "long_fraction": 0.25, "output_len": 24, "range_ratio": 0.25, "ignore_eos": True},
    request_rate=0.9,
    goodput={"tpot": 200.0},
    metrics=("p99_tpot_ms", "p99_itl_ms", "median_ttft_ms", "p99_ttft_ms", "request_goodput", "output_throughput"),
    notes="rate 0.9 req/s = ~90% of the 1P1D capacity (~1.0 req/s) and ~70% of 2 colocated (~1.3 req/s), "
          "measured by a rate probe on the 2-core build machine; TPOT target 200 ms = 5 tok/s",
))


# Placement scenarios (issue 5). Sizes in the embedded model's units:
KV_BYTES_PER_TOKEN = 46_080                    # SmolLM2-135M, float32: 2 (K, V) * 30 layers * 3 heads * 64 * 4 B
KV_BLOCK_BYTES = 16 * KV_BYTES_PER_TOKEN       # one 16-token KV block


def kv_blocks(n: int) -> int:
    """kv_cache_memory (bytes) for a pool of n 16-token blocks of the embedded model in float32."""
    return n * KV_BLOCK_BYTES


# prefix-routing: 8 long prefixes (384-token system prompts, 24 blocks each), 24 short suffixes each,
# and a pool of PREFIX_POOL_BLOCKS per worker: 4 prefixes (96 blocks) plus room for the running
# requests' own blocks, so each worker holds about half the prefixes. Topology: 2 workers that
# prefill locally (no prefill pool), so the prefix cache that a placement hits is the one that
# computes the prompt; with remote prefill workers the decode pool's cache only saves transfer
# bytes, not the prefill compute that TTFT is. The rate is about round-robin's capacity here.
# Bound (uniform prefix popularity): with pools of c prefixes each, round-robin's LRU pools hit c/8 of
# what is reusable and a perfect placement min(1, 2c/8), so no router beats round-robin's hit rate by
# more than min(2, 8/c): 2x exactly at c = 4. `bench/prefix_breakdown.py` prints each side's share of
# the perfect placement's hit rate.
PREFIX_LEN = 384
PREFIX_POOL_BLOCKS = 4 * PREFIX_LEN // 16 + 16
_prefix_cfg = dict(pools__prefill__initial_replicas=0, pools__decode__initial_replicas=2, router__remote_prefill=False,
                   engine__threads_per_worker=1, engine__cache__kv_cache_memory=kv_blocks(PREFIX_POOL_BLOCKS))
PREFIX_ROUTING = register(Scenario(
    name="prefix-routing",
    summary="shared-prefix workload on 2 local-prefill workers, each pool ~half the prefixes: round-robin vs cost-model",
    baseline=cluster(router__policy="round-robin", **_prefix_cfg),
    candidate=cluster(router__policy="cost-model", **_prefix_cfg),
    labels=("round-robin", "cost-model"),
    dataset={"dataset": "shared-prefix", "num_groups": 8, "prompts_per_group": 24, "prefix_len": PREFIX_LEN,
             "suffix_len": 24, "output_len": 8, "ignore_eos": True},
    request_rate=1.0,
    goodput={"ttft": 1000.0},
    metrics=("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "prefix_cache_hit_rate", "request_goodput",
             "request_throughput"),
    notes=f"2 workers x {PREFIX_POOL_BLOCKS} blocks (4 of the 8 prefixes + working room); local prefill so the "
          "cache hit is where the prompt computes; 1.0 req/s ~ round-robin's capacity (it served 0.89 req/s)",
))


# prefix-pull: prefix-routing's workload and cluster, the cost model on both sides; the candidate's
# local prefills may pull a prefix the other worker holds over the KV transport (issue 19 point 3,
# router/placement/pull_pricing.py) instead of recomputing it. What it isolates: a prompt placed away
# from its prefix's holder (the holder busy) costs a pull of 24 blocks (17.7 MB) instead of a
# 384-token prefill, so the router can spread load without repeating prefix compute.
PREFIX_PULL = register(Scenario(
    name="prefix-pull",
    summary="prefix-routing's workload, cost-model on both sides: recompute a prefix the other worker holds vs pull it",
    baseline=cluster(router__policy="cost-model", **_prefix_cfg),
    candidate=cluster(router__policy="cost-model", cost__peer_pull=True, **_prefix_cfg),
    labels=("cost-model", "cost-model+pull"),
    dataset=PREFIX_ROUTING.dataset,
    request_rate=PREFIX_ROUTING.request_rate,
    goodput=PREFIX_ROUTING.goodput,
    metrics=PREFIX_ROUTING.metrics,
    notes=f"as prefix-routing (2 workers x {PREFIX_POOL_BLOCKS} blocks, local prefill); candidate: --peer-pull",
))


# prefix-routing-pull: prefix-routing with pulls on the candidate (issue 19's prefix-routing target:
# >= 3x in every one of 3 runs now that pulls replace cold recomputes): round-robin against the cost
# model whose local prefills may pull a prefix the other worker holds instead of recomputing it.
register(replace(
    PREFIX_PULL, name="prefix-routing-pull",
    summary="prefix-routing's workload: round-robin vs cost-model with peer pulls (--peer-pull)",
    baseline=PREFIX_ROUTING.baseline, labels=("round-robin", "cost-model+pull")))


# layerwise-transfer: 1P+1D, prompts 512-2048 tokens one at a time (no queueing: TTFT = prefill +
# the exposed part of the transfer), the KV link throttled to LAYERWISE_LINK_BPS of TCP payload (a
# veth pair shaped by tc tbf between two network namespaces where the machine allows it, else the
# transport's token bucket) = KV bytes per token * the prefill rate, so that shipping a prompt's KV takes
# about as long as computing it. Both sides least-loaded with remote prefill: every prompt crosses.
LAYERWISE_PREFILL_TPS = 150.0                  # prefill tokens/s of one 1-thread worker at 1280 tokens (measured
                                               #   2026-12-01: 220 at 512, 153 at 1280, 115 at 2048)
LAYERWISE_LINK_BPS = KV_BYTES_PER_TOKEN * LAYERWISE_PREFILL_TPS
_layer_cfg = dict(pools__prefill__initial_replicas=1, pools__decode__initial_replicas=1, engine__threads_per_worker=1,
                  router__policy="least-loaded", kv__bandwidth_limit=LAYERWISE_LINK_BPS)
register(Scenario(
    name="layerwise-transfer",
    summary="1P1D, 512-2048-token prompts, KV link throttled so transfer ~= prefill: whole-request vs layer-wise",
    baseline=cluster(kv__layerwise=False, **_layer_cfg),
    candidate=cluster(kv__layerwise=True, **_layer_cfg),
    labels=("whole-request", "layer-wise"),
    dataset={"dataset": "random", "num_prompts": 4, "input_len": 1280, "range_ratio": 0.6, "output_len": 4,
             "ignore_eos": True},
    request_rate=float("inf"),
    max_concurrency=1,
    goodput={},
    metrics=("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_kv_transfer_ms", "request_throughput"),
    notes=f"KV link {LAYERWISE_LINK_BPS / 1e6:.1f} MB/s: veth+tbf between two netns where the machine allows "
          "it (root, iproute2), else the transport's token bucket (scenario.kv_link says which ran); "
          "one request at a time so TTFT is prefill + exposed transfer",
    shaped_link=True,
))


# selective-offload: the paper's setting in miniature. Zone "pfaas" holds the prefill worker, zone
# "local" the decode worker; the cross-zone KV link is throttled (SELECTIVE_LINK_BPS). The decode
# worker's local prefill capacity is small: it has one core, which also runs every decode step, and
# the cost model's TPOT guard keeps long prompts off it. Mixed lengths: 75% short (~64 tokens), 25%
# long (~768). Baseline: every prompt prefills remotely (least-loaded, the naive heterogeneous
# setup); candidate: the cost model picks local or remote per prompt. Its per-step stall guard
# (CostConfig.tpot_slo_s) is 0.5 s: on this CPU one 64-token prefill chunk alone takes ~0.3 s, so
# the default 0.25 s would forbid every local prefill next to a running decode; an occasional
# 0.5 s step keeps the mean TPOT (the SLO below) under 200 ms.
SELECTIVE_LINK_BPS = 12e6
_sel_cfg = dict(pools__prefill__initial_replicas=1, pools__decode__initial_replicas=1, engine__threads_per_worker=1,
                pools__prefill__zone="pfaas", pools__decode__zone="local", kv__bandwidth_limit=SELECTIVE_LINK_BPS,
                cost__tpot_slo_s=0.5)
register(Scenario(
    name="selective-offload",
    summary="2 zones, 1P (remote zone, throttled link) + 1D, skewed prompt lengths: all-remote vs cost-model",
    baseline=cluster(router__policy="least-loaded", **_sel_cfg),
    candidate=cluster(router__policy="cost-model", **_sel_cfg),
    labels=("all-remote", "cost-model"),
    dataset={"dataset": "mixed", "num_prompts": 32, "input_len": 64, "long_input_len": 768,
             "long_fraction": 0.25, "output_len": 24, "range_ratio": 0.25, "ignore_eos": True},
    request_rate=0.6,
    goodput={"ttft": 2500.0, "tpot": 200.0},
    metrics=("request_goodput", "median_ttft_ms", "p99_ttft_ms", "p99_tpot_ms", "remote_prefill_fraction",
             "output_throughput"),
    notes=f"cross-zone link {SELECTIVE_LINK_BPS / 1e6:.0f} MB/s (veth+tbf where the machine allows it, else "
          "token bucket: scenario.kv_link); decode zone = 1 core that also decodes; SLO ttft 2.5 s, tpot 200 ms",
    shaped_link=True,
))


# KV tiers (issue 19 point 6): host-memory and disk tiers on every worker (candidate) against
# device-only pools (baseline), same cluster: 2 workers that prefill locally (as prefix-routing:
# the cache a placement hits is where the prompt computes), the cost model on both sides (it
# prices a host/disk hit at its load time), device pools far smaller than the working set.
# The candidate's flags are those of `pdcluster serve` (the KV tiers' deploy/flags.py), set when it
# runs: the tiers and peer pulls (issue 19 point 3, --peer-pull), as the issue's scenarios ask ("tiers
# and pulls on"). The runs of 12-04/05 in RESULTS.md had pulls off; a worker with tiers could not
# pull then anyway (MultiConnector asked its tiers alone, fixed 12-05).
TIER_FLAGS = {"--kv-host-cache-gb": 0.5, "--kv-disk-cache-dir": FRESH_DIR, "--kv-disk-cache-gb": 2.0,
              "--peer-pull": True}
_tier_cfg = dict(pools__prefill__initial_replicas=0, pools__decode__initial_replicas=2, router__remote_prefill=False,
                 engine__threads_per_worker=1, router__policy="cost-model")

# multi-turn: 10 conversations of 6 turns, each opening with its own 512-token context (a document or
# long system prompt: vLLM's multi-turn benchmark's per-conversation prefix), then 64 new prompt
# tokens + 8 output tokens a turn, so turn k sends 512 + 72k tokens, the last 872 = 55 blocks; ~550
# blocks for every conversation's last turn. Sent turn-major so that all 10 are live
# at once and 9 other turns come between two turns of one conversation. Device pool 96 blocks per
# worker: under two last turns, a third of the ~5 conversations a worker serves, and the running
# requests' blocks come out of it too, so an LRU device pool evicts a conversation's history before
# its next turn (a cyclic pattern larger than the cache); a 0.5 GiB host tier per worker (728 blocks
# of 0.74 MB, float32 KV) holds them all. In whole blocks a perfect cache serves 3,296 of a
# conversation's 4,152 prompt tokens (79%).
# History: the first probe (12 x 4 turns, 96 + 16 tokens, 1.0 req/s) saturated both sides on this
# shared host (workers 96% busy): TTFT was queueing on both, and 16 output tokens a turn made decode
# steps most of the work; so fewer, shorter outputs. Until 12-05 the turns opened with 64 tokens like
# the rest (64-block pools; 70% reusable): a turn's prefill was then mostly the engine's fixed cost of a
# forward (~90 ms of the ~190 ms a 64-token prefill takes on one float32 thread), which caps what any
# cache can save at ~2.3x (RESULTS.md, "multi-turn with an opening context").
MT_POOL_BLOCKS = 96
MT_CONVERSATIONS, MT_TURNS, MT_RATE = 10, 6, 0.6
register(Scenario(
    name="multi-turn",
    summary=f"{MT_CONVERSATIONS} live {MT_TURNS}-turn conversations (512-token openings, 64 tokens a turn) on 2 "
            f"local-prefill workers of {MT_POOL_BLOCKS}-block pools (device pools hold a third of the conversations, "
            "the host tier all): device-only vs host+disk tiers and peer pulls",
    baseline=cluster(engine__cache__kv_cache_memory=kv_blocks(MT_POOL_BLOCKS), **_tier_cfg),
    candidate=cluster(engine__cache__kv_cache_memory=kv_blocks(MT_POOL_BLOCKS), **_tier_cfg),
    candidate_flags=TIER_FLAGS,
    labels=("device-only", "kv-tiers"),
    dataset={"dataset": "multi-turn", "num_conversations": MT_CONVERSATIONS, "turns": MT_TURNS, "input_len": 64,
             "first_input_len": 512, "output_len": 8, "ignore_eos": True},
    request_rate=MT_RATE,
    goodput={"ttft": 2000.0},
    metrics=("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "prefix_cache_hit_rate", "request_goodput",
             "request_throughput"),
    notes=f"2 workers x {MT_POOL_BLOCKS} device blocks (a third of a worker's conversations); candidate adds "
          f"{TIER_FLAGS} (a fresh disk directory per run)",
))


def trace_path() -> str:
    """The Mooncake conversation trace: $PDCLUSTER_TRACE, else ../shared/traces/ beside the repository."""
    return os.environ.get("PDCLUSTER_TRACE") or str(
        Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl")


# trace-replay: a slice of the Mooncake FAST'25 conversation trace (bench/trace_dataset.py). Its
# turns come minutes apart, so a contiguous slice reuses nothing but the system prompt (the first
# 48 lines: 4% of blocks even with an unbounded cache); one conversation in 20 from the start keeps
# whole conversations: 256 requests over 1,551 s of trace time, 6,529 blocks of 16 tokens (token_scale
# 1: a 512-token trace block is one engine block; outputs scaled alike, ~11 tokens), 4,016 distinct,
# 38.5% reusable with an unbounded cache (the whole trace: 37%). Device pool 192 blocks per worker:
# the slice's longest prompt is 189 blocks (3,024 tokens), so that is about the least that runs every
# request; an LRU of that size per worker (each prompt to the worker with its longest prefix) hits 9%
# of blocks in a trace-level simulation (hash ids only), an unbounded cache 38.5%: device-only cannot
# keep a conversation between its turns. The 0.5 GiB host tier per worker (728 blocks) holds under a
# third of the slice, the 2 GiB disk tier (2,896 blocks of 4 KiB-page files) the rest: both tiers serve hits.
# time_scale 0.1 replays the 1,551 s in 155 s (1.65 req/s, ~670 prompt tokens/s offered to 2
# one-thread workers): near device-only's capacity, under the tiers'. The tiers save at most the
# reusable prefill (~1.35x of the compute here); the rest of any TTFT gain is the queueing that
# recomputing causes, so the ratio depends on the load: 1.43-2.24x in four rounds at 0.1, 1.50x at
# 0.12 (device-only keeps up), 2.98x at 0.08 (it does not) (RESULTS.md). Re-measured 12-06 (each side alone at
# --time-scale 0.05): device-only serves at most 1.97 req/s, the tiers 2.30, so 0.1 is 84% of device-only's
# capacity, its design point still; 2.01x at 0.09 (93%). Until 12-05: 1 conversation
# in 40, 32 requests, time x0.2, 112-block pools; 22% reusable, and device-only already hit 17%, so
# the tiers could not matter (1.00x).
# Since 12-08 the design point is a load, not a time scale: the hosts lent since compute a prompt token
# 1.3-4.5 ms, so x0.1 kept device-only's workers busy 0.28 of the time on one and was past capacity on another.
# TRACE_LOAD is the design point's busy share (stop 47's x0.1 round on the host the design point was set on: 0.73,
# 84% of what device-only served there): a probe of the host that runs it sets the time scale (bench/trace_load.py;
# --time-scale still overrides it).
TRACE_POOL_BLOCKS = 192
TRACE_LOAD = 0.73
TRACE_REPLAY = register(Scenario(
    name="trace-replay",
    summary=f"Mooncake conversation trace, 256 requests (1 conversation in 20, timed to keep device-only's workers "
            f"busy {TRACE_LOAD:g} here: bench/trace_load.py) on 2 local-prefill "
            f"workers of {TRACE_POOL_BLOCKS}-block pools (~1/10 of the slice's distinct blocks): device-only vs "
            "host+disk tiers and peer pulls (host ~1/3 of the slice, disk the rest)",
    baseline=cluster(engine__cache__kv_cache_memory=kv_blocks(TRACE_POOL_BLOCKS), **_tier_cfg),
    candidate=cluster(engine__cache__kv_cache_memory=kv_blocks(TRACE_POOL_BLOCKS), **_tier_cfg),
    candidate_flags=TIER_FLAGS,
    labels=("device-only", "kv-tiers"),
    dataset={"dataset": f"mooncake:{trace_path()}", "token_scale": 1, "time_scale": 0.1, "start": 0,
             "max_requests": 256, "conversation_sample": 20, "ignore_eos": True},
    request_rate=float("inf"),          # unused: the trace's own arrival times
    goodput={"ttft": 5000.0},
    metrics=("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "prefix_cache_hit_rate", "request_goodput",
             "request_throughput"),
    notes=f"arrivals from the trace, time-scaled to a load of {TRACE_LOAD:g}; 2 workers x {TRACE_POOL_BLOCKS} "
          f"device blocks; candidate adds {TIER_FLAGS}; trace file: $PDCLUSTER_TRACE or "
          "../shared/traces/conversation_trace.jsonl",
    load=TRACE_LOAD,
))


# tier-write: trace-replay's candidate on both sides (host + disk tiers, peer pulls), storing blocks
# below only when the device pool evicts them (--kv-tier-write-back) against writing them through as
# they are computed (the default, which a restart needs: kv_transfer/tiers/connector.py). What it
# measures: what write-through costs a busy 2-core CPU host, whose writer threads take CPU from the two
# one-thread workers (bench/kv_tiers.py measures the engine-thread copy on an idle one).
register(replace(
    TRACE_REPLAY, name="tier-write",
    summary="trace-replay's slice, tiers and pulls on both sides: blocks stored below on eviction "
            "(--kv-tier-write-back) vs as they are computed (write-through, the default)",
    baseline=TRACE_REPLAY.candidate, baseline_flags=dict(TIER_FLAGS, **{"--kv-tier-write-back": True}),
    labels=("write-back", "write-through"),
    notes=f"as trace-replay's candidate on both sides ({TIER_FLAGS}); baseline adds --kv-tier-write-back",
))


# prefill-chunk: trace-replay's slice and cluster, device-only on both sides; the candidate caps each
# request's prefill at PREFILL_CHUNK tokens a step (--long-prefill-token-threshold, engine/scheduler.py).
# One-thread float32 workers compute ~450 prompt tokens/s, so a 2,048-token chunk holds a step ~4.5 s:
# every short prompt that arrives meanwhile waits for the long one's last chunk. Capped, the long
# prompt takes 256 tokens a step and the short ones are admitted beside it.
PREFILL_CHUNK = 256
register(replace(
    TRACE_REPLAY, name="prefill-chunk",
    summary=f"trace-replay's slice, device-only: prefill chunks up to the step budget vs at most {PREFILL_CHUNK} "
            "tokens per request per step (--long-prefill-token-threshold)",
    candidate=cluster(engine__cache__kv_cache_memory=kv_blocks(TRACE_POOL_BLOCKS),
                      engine__sched__long_prefill_token_threshold=PREFILL_CHUNK, **_tier_cfg),
    candidate_flags={}, labels=("budget-sized chunks", f"chunks <= {PREFILL_CHUNK}"),
    notes=f"as trace-replay, device-only both sides; candidate: --long-prefill-token-threshold {PREFILL_CHUNK}",
))

# slo-admission (issue 20): trace-replay's slice replayed faster than the 2 workers compute it (time
# x0.07: 2.4 req/s, ~950 prompt tokens/s offered against ~900 computed: a busy share of 1.1 at that host's
# 0.95 busy s a request; since 12-08 that load, SLO_LOAD, on any host: bench/trace_load.py), device-only, the cost model
# on both sides; the candidate refuses at placement a request whose expected TTFT is over the 2 s SLO
# (--admit-ttft 2, router/admission.py slo_refusal). Goodput counts requests with TTFT <= 2 s; a
# refused one counts as failed. The real-cluster counterpart of the simulator's study (b) rows.
SLO_TTFT_S, SLO_LOAD = 2.0, 1.1
register(replace(
    TRACE_REPLAY, name="slo-admission",
    summary=f"trace-replay's slice at a load of {SLO_LOAD:g} (past 2 workers' capacity), device-only, cost model: "
            f"admit everything vs refuse at placement what is expected past a {SLO_TTFT_S:g} s TTFT (--admit-ttft)",
    candidate=cluster(engine__cache__kv_cache_memory=kv_blocks(TRACE_POOL_BLOCKS), router__admit_ttft_s=SLO_TTFT_S,
                      **_tier_cfg),
    candidate_flags={}, labels=("admit all", f"--admit-ttft {SLO_TTFT_S:g}"),
    dataset=dict(TRACE_REPLAY.dataset, time_scale=0.07),
    goodput={"ttft": SLO_TTFT_S * 1e3},
    metrics=("request_goodput", "completed", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "request_throughput"),
    load=SLO_LOAD,
    notes=f"as trace-replay, device-only both sides, load {SLO_LOAD:g}; candidate: --admit-ttft {SLO_TTFT_S:g}; "
          "goodput: TTFT <= 2 s, a refused request counts as failed",
))

# spec-decode (issue 18 point 3): n-gram speculative decoding off vs on (the default) through the
# served cluster, on the copy dataset (a passage asked back word for word) one request at a time,
# where drafts pay; bench/spec_decode.py measures the engine alone, and random prompts at
# concurrency 16 too. Sizes: 6 copy prompts of up to 96 tokens keep a run under a minute here.
register(Scenario(
    name="spec-decode",
    summary="copy prompts at concurrency 1: --speculative off vs ngram (1 prefill + 1 decode worker)",
    baseline=cluster(engine__speculative="off"),
    candidate=cluster(engine__speculative="ngram"),
    labels=("off", "ngram"),
    dataset={"dataset": "copy", "num_prompts": 6, "output_len": 96},
    request_rate=float("inf"),
    max_concurrency=1,
    goodput={"tpot": 200.0},
    metrics=("mean_tpot_ms", "median_tpot_ms", "median_itl_ms", "median_ttft_ms", "output_throughput"),
    notes="concurrency 1, greedy; TPOT target of issue 18: >= 1.8x lower with ngram",
))

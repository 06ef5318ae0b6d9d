"""Study (b) of bench/sim_studies.py (issue 20, point 3): placement policies at equal hardware by
goodput at the TTFT/TPOT SLO, and (b') the cost model's KV-full fallback variants, with optional
cache tiers per instance (sim/tiers.py: host memory and disk below each device prefix cache).
Optional rows: dynamo-kv with Dynamo's request rejection (--b-dynamo-busy, counted as published) and
policies behind this router's TTFT-SLO admission (--b-admit-ttft, RouterConfig.admit_ttft_s)."""
from __future__ import annotations

from dataclasses import replace

from pdcluster.bench.sim_studies import simulate, table
from pdcluster.sim.cluster import PoolSpec, SimConfig


# (b) policies at equal hardware
POLICIES_B = ("round-robin", "least-loaded", "cache-aware", "llm-d", "dynamo-kv", "cost-model")
PUBLISHED = ("llm-d", "dynamo-kv")      # other systems' policies, implemented from their docs


def prefill_hw_b(a) -> str:
    """(b)'s prefill hardware: H200, or with --b-prefill-extra-gb an H200 whose memory (so its prefix
    cache) is that much larger: the upper bound of a host cache tier whose loads cost nothing (real
    tiers with load costs: --b-host-gb / --b-disk-gb, sim/tiers.py)."""
    if not a.b_prefill_extra_gb:
        return "H200"
    from pdcluster.sim.hardware import HARDWARE
    name = f"H200+{a.b_prefill_extra_gb:g}GB"
    HARDWARE[name.lower()] = replace(HARDWARE["h200"], name=name, mem_bytes=HARDWARE["h200"].mem_bytes
                                     + a.b_prefill_extra_gb * 1e9)
    return name


def variants_b(a, cfg: SimConfig) -> dict[str, tuple[SimConfig, bool]]:
    """(b)'s rows: label -> (config, a published system's policy as documented). Besides the six
    policies: dynamo-kv with Dynamo's request rejection (busy thresholds, --b-dynamo-busy), and
    policies with this router's TTFT-SLO admission (--b-admit-ttft, RouterConfig.admit_ttft_s)."""
    out = {p: (replace(cfg, policy=p), p in PUBLISHED) for p in POLICIES_B}
    for spec in filter(None, (a.b_dynamo_busy or "").split(",")):
        tokens, _, blocks = spec.partition(":")
        opts = (("busy_prefill_tokens", int(tokens)),) + ((("busy_decode_blocks", float(blocks)),) if blocks else ())
        out[f"dynamo-kv, rejection {spec}"] = (replace(cfg, policy="dynamo-kv", policy_options=opts), True)
    if a.b_admit_ttft:
        for p in filter(None, a.b_admit_policies.split(",")):
            out[f"{p}, --admit-ttft {a.b_admit_ttft:g}"] = (replace(cfg, policy=p, admit_ttft_s=a.b_admit_ttft), False)
    return out


def study_b(a, reqs_at) -> dict:
    cfg = SimConfig(a.model, **pools_b(a, prefill_hw_b(a)),
                    slo_ttft_s=a.slo_ttft_ms / 1e3, slo_tpot_s=a.slo_tpot_ms / 1e3)
    out = {}
    for rate in a.b_rates:
        reqs = reqs_at(rate)
        for name, (c, published) in variants_b(a, cfg).items():
            s = simulate(c, reqs, a.progress)
            out[f"{name} x{rate}"] = dict(policy=name, rate=rate, published=published, **s)
            print(f"  b | {name} x{rate}: goodput {s['goodput_rps']:.3f} ({s['wall_s']:.0f}s)", flush=True)
    for rate in a.b_rates:
        rows = {k: v for k, v in out.items() if v["rate"] == rate}
        pub = max(v["goodput_rps"] for v in rows.values() if v["published"])
        print(f"\n(b) {a.b_prefill} {cfg.prefill.hw} prefill + {a.b_decode} H20 decode, one zone, rate x{rate}: "
              f"SLO TTFT {a.slo_ttft_ms:g} ms TPOT {a.slo_tpot_ms:g} ms{tiers_label(a)}; best published = the best of "
              f"{', '.join(k for k, v in variants_b(a, cfg).items() if v[1])}")
        print(table(["policy", "goodput req/s", "vs best published", "attainment", "refused", "TTFT p50 s",
                     "TTFT p90 s", "TPOT p90 ms", "cache hit", "local"],
                    [[v["policy"], v["goodput_rps"], f"{v['goodput_rps'] / pub:.2f}x" if pub else "-", v["attainment"],
                      v["refused"] / max(v["requests"], 1), v["ttft_p50"], v["ttft_p90"], v["tpot_p90"] * 1e3,
                      v["cache_hit"], v["local_share"]] for v in rows.values()]))
    return out


def study_b_fallback(a, reqs_at) -> dict:
    """(b') the cost model's KV-full fallback (CostConfig.kv_full_fallback) and the router's wait for
    room (RouterConfig.place_wait_s) on study b's fleet, beside dynamo-kv."""
    cfg = SimConfig(a.model, **pools_b(a),
                    slo_ttft_s=a.slo_ttft_ms / 1e3, slo_tpot_s=a.slo_tpot_ms / 1e3)
    variants = {"dynamo-kv": replace(cfg, policy="dynamo-kv")}
    for v in a.b_fallbacks:
        mode, _, wait = v.partition("@")
        variants[f"cost-model, fallback {v}"] = replace(
            cfg, cost_overrides=(("kv_full_fallback", mode),), **({"place_wait_s": float(wait)} if wait else {}))
    out, rows = {}, []
    for rate in a.b_rates:
        reqs = reqs_at(rate)
        for name, c in variants.items():
            s = simulate(c, reqs, a.progress)
            out[f"{name} x{rate}"] = dict(variant=name, rate=rate, **s)
            rows.append([name, rate, s["goodput_rps"], s["attainment"], s["ttft_p90"], s["tpot_p90"] * 1e3,
                         s["local_share"], s["router_waits"]])
            print(f"  b' | {name} x{rate}: goodput {s['goodput_rps']:.3f} ({s['wall_s']:.0f}s)", flush=True)
    print(f"\n(b') the cost model's KV-full fallback ('variant@seconds': RouterConfig.place_wait_s, default "
          f"{SimConfig.place_wait_s}), {a.b_prefill} H200 prefill + {a.b_decode} H20 decode{tiers_label(a)}")
    print(table(["variant", "rate", "goodput req/s", "attainment", "TTFT p90 s", "TPOT p90 ms", "local",
                 "router waits"], rows))
    return out


def add_b_arguments(ap) -> None:
    ap.add_argument("--b-rates", default="1,1.25", help="(b) arrival-rate scales")
    ap.add_argument("--b-prefill", type=int, default=4, help="(b) H200 prefill instances")
    ap.add_argument("--b-decode", type=int, default=2, help="(b) H20 decode instances")
    ap.add_argument("--b-prefill-extra-gb", type=float, default=0.0,
                    help="(b) prefill instances' prefix cache larger by this many GB of memory (an ideal host tier)")
    ap.add_argument("--b-host-gb", type=float, default=0.0,
                    help="(b, b') GiB of host-memory KV tier per prefill instance (0: none; loads cost PCIe time)")
    ap.add_argument("--b-disk-gb", type=float, default=0.0, help="(b, b') GiB of disk KV tier per prefill instance")
    ap.add_argument("--b-decode-host-gb", type=float, default=0.0,
                    help="(b, b') GiB of host-memory KV tier per decode instance")
    ap.add_argument("--b-dynamo-busy", default=None,
                    help="(b) also dynamo-kv with Dynamo's request rejection, one row per busy-threshold pair "
                         "'prefill_tokens[:decode_blocks]', comma-separated (e.g. 32768:0.85); counted as published")
    ap.add_argument("--b-admit-ttft", type=float, default=0.0,
                    help="(b) also run --b-admit-policies with this router's --admit-ttft at this many seconds "
                         "(0: not run)")
    ap.add_argument("--b-admit-policies", default="cost-model,dynamo-kv,least-loaded",
                    help="(b) the policies run with --b-admit-ttft")
    ap.add_argument("--b-fallbacks", default="wait,cheapest,local,wait@5,wait@30,wait@300",
                    help="(b') cost-model KV-full fallbacks to compare: kv_full_fallback[@place_wait_s]")


def pools_b(a, prefill_hw: str = "H200") -> dict:
    """(b)'s fleet: a.b_prefill prefill + a.b_decode H20 decode instances, with their cache tiers."""
    return dict(prefill=PoolSpec(prefill_hw, a.b_prefill, host_cache_gb=a.b_host_gb, disk_cache_gb=a.b_disk_gb),
                decode=PoolSpec("H20", a.b_decode, host_cache_gb=a.b_decode_host_gb))


def tiers_label(a) -> str:
    return (f"; tiers per prefill host {a.b_host_gb:g} GiB, disk {a.b_disk_gb:g} GiB, per decode host "
            f"{a.b_decode_host_gb:g} GiB" if a.b_host_gb or a.b_disk_gb or a.b_decode_host_gb else "")

"""Hardware profiles: per device peak compute, memory bandwidth and size, price, NIC. Pure Python.

GPU figures are the vendors' dense BF16 tensor peaks and HBM bandwidths. `mfu` and `bw_eff` (the
fractions a serving engine reaches) were measured on an H200 (bench/h200_calibrate.py,
bench/h200-calibration.json): a Llama-3-8B-shaped prefill reached 0.50-0.52 of the bf16 peak at
4k-16k tokens (0.43 at 1k), a decode step's linears (one CUDA graph) read weights at 0.71 of the
HBM bandwidth; the H100 is the same chip and takes both; the H20, A100 and L40S take them as
assumptions (not measured here). `step_overhead_s` (scheduling, sampling) is assumed. Prices are
on-demand cloud list prices per GPU-hour (late 2025, rounded; H20 from Chinese cloud list prices).
Cache tiers (sim/tiers.py): `host_load_bps` is a device's host->device copy rate. Hopper parts (H100,
H200, H20) sit on PCIe Gen5 x16 (64 GB/s per direction raw; pinned cudaMemcpy reaches ~50 GB/s,
assumed, not measured here), A100 and L40S on Gen4 x16 (32 GB/s raw, ~25 assumed). `disk_load_bps`
is a device's share of its node's NVMe (DGX H100/H200: 8 x 3.84 TB U.2 Gen4 drives for 8 GPUs,
~6.5 GB/s sequential read each as rated; 5 GB/s assumed, a 512-token block being tens of MB). The
cpu profile takes the router's own priors (CostConfig.prior_host_load_bps / prior_disk_load_bps).
`cpu` is this machine as bench/engine.py measured it (bench/engine.json, RESULTS "Engine vs
transformers"): fp32 matmul 165 GFLOP/s, read bandwidth 30.9 GB/s; prefill reached 71% of the
matmul rate, decode at batch 1 60% of the weight-read limit; the per-sequence overhead (2 ms)
fits the measured 140 ms batch-32 step (28 ms paged attention + 14 ms gathers beyond the GEMMs).
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float           # FLOP/s per device (dense; GPUs BF16, cpu fp32)
    mem_bw: float               # bytes/s per device
    mem_bytes: float            # bytes per device
    price_per_h: float          # $ per device-hour
    nic_bps: float              # bytes/s per device: its KV link inside a zone (RDMA; cpu: loopback)
    dtype_bytes: int = 2        # weights and KV
    mfu: float = 0.5            # reached fraction of peak_flops
    bw_eff: float = 0.71        # reached fraction of mem_bw (measured on an H200)
    step_overhead_s: float = 0.003      # fixed per engine step (scheduling, launches, sampling)
    per_seq_overhead_s: float = 0.0     # per sequence in a decode step (cpu: attention gathers)
    prefill_overhead_s: float = 0.0     # more per step that computes a prompt chunk (0: none assumed; the
                                        #   fitted cpu profile of sim/validate.py measures it)
    attn_flops: float | None = None     # FLOP/s a prompt's causal attention reaches per device (None: the
                                        #   linears' peak_flops x mfu; sim/validate.py fits it on this CPU,
                                        #   where torch's flash kernel runs slower than the GEMMs)
    mem_util: float = 0.9       # share of memory the engine may use (weights + KV)
    host_load_bps: float = 50 * GB      # bytes/s per device: KV loaded back from the host-memory tier
    disk_load_bps: float = 5 * GB       # bytes/s per device: KV loaded back from the disk tier


HARDWARE: dict[str, Hardware] = {h.name.lower(): h for h in (
    Hardware("H100", 989e12, 3.35e12, 80 * GB, 2.99, 50 * GB),
    Hardware("H200", 989e12, 4.8e12, 141 * GB, 3.79, 50 * GB),
    Hardware("H20", 148e12, 4.0e12, 96 * GB, 1.29, 50 * GB),
    Hardware("A100", 312e12, 2.04e12, 80 * GB, 1.79, 25 * GB, host_load_bps=25 * GB),
    Hardware("L40S", 362e12, 0.864e12, 48 * GB, 0.99, 12.5 * GB, host_load_bps=25 * GB),
    # this host (bench/engine.json): 2 cores, float32; price: none (a dev box)
    Hardware("cpu", 165.0e9, 30.9e9, 24 * GB, 0.0, 1.0 * GB, dtype_bytes=4, mfu=0.71, bw_eff=0.6,
             step_overhead_s=0.002, per_seq_overhead_s=0.002, mem_util=0.3, host_load_bps=2 * GB,
             disk_load_bps=0.5 * GB),
)}


def hardware(name: str) -> Hardware:
    """The profile called `name`, case-insensitive; ValueError naming the choices."""
    h = HARDWARE.get(name.lower())
    if h is None:
        raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join(x.name for x in HARDWARE.values())}")
    return h

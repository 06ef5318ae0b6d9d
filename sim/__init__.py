"""A discrete-event simulator of a prefill/decode fleet that runs the router's own code. Pure Python.

Instances (prefill and decode pools of hardware profiles, sim/hardware.py) step a model
(sim/models.py) at roofline speed (sim/roofline.py) with continuous batching; KV moves over links
(RDMA inside a zone, Ethernet across); each instance keeps a block-LRU prefix cache (sim/cache.py).
Every decision is the router's: placement is `policy.choose` of router/placement/ over the
router's WorkerRegistry loads, the prefix index is router/prefix_index.py fed by the instances'
block events through `WorkerRegistry._ingest` (the status poll), the cost model learns its rates
from the instances' step counters through router/telemetry.py, and pool sizes follow
router/autoscaler.py's PoolAutoscaler on the simulated clock (sim/cluster.py). Input: a Mooncake
trace (sim/trace.py). Results: sim/results.py.
"""

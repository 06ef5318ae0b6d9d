"""Idle-link probes: a KV link that carried no transfer lately is measured by a small probe transfer
from its prefill worker, so the cost model prices it from a measurement rather than a prior."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class LinkProber:
    def __init__(self, workers):
        self.workers = workers                                # router.registry.WorkerRegistry
        self._probed_at: dict[tuple[str, str], float] = {}    # (prefill, decode) -> time.time() of its last probe

    def probe_idle_links(self, now: float) -> None:
        """Links with no transfer for probe_after_s (or never measured) get a probe from their
        prefill worker, in the background: one probe per idle prefill worker at a time, never while
        it has requests (a busy link is measured by its transfers). Its sample reaches the link
        table with that worker's next status poll."""
        reg = self.workers
        loads = reg.loads
        busy = {t.get_name() for t in reg.background}
        idle = [p for p in reg.prefill
                if loads[p].placeable and loads[p].in_flight == 0 and f"probe:{p}" not in busy]
        dsts = [d for d in reg.decode if loads[d].placeable and loads[d].kv_address]
        every = reg.telemetry.cfg.probe_after_s
        for p in idle:
            wanted = [(p, d) for _, d in reg.telemetry.links.probes_needed([p], dsts, now)
                      if now - self._probed_at.get((p, d), -every) >= every]   # at most once per period
            if wanted:
                d = wanted[0][1]
                self._probed_at[(p, d)] = now
                reg.spawn(self._probe(p, d, loads[d].kv_address), name=f"probe:{p}")

    async def _probe(self, p: str, d: str, address: str) -> None:
        client = self.workers.prefill.get(p)
        try:
            bps = await client.probe(address, d) if client is not None else None
        except Exception as e:
            log.info("probe of link %s -> %s failed: %s", p, d, e)
            return
        if bps:
            log.debug("probe of link %s -> %s: %.1f MB/s", p, d, bps / 1e6)

"""Per-worker figures of the cost model's two worker lists as numpy columns, kept across decisions
(router/placement/cost_vector.py prices from them). Pure Python + numpy.

Layout: one row per (list, worker). Rows [0, nD) are the decode list in worker id order, rows
[nD, N) the prefill list in (zone, worker id) order, so an argmin over decode rows takes the lowest
worker id among ties, and each prefill zone is one slice (`pstarts`). Columns over all N rows hold
what both roles price the same way; the decode-only columns have nD rows.

Freshness: a WorkerLoad tells its watchers which object changed on every field write
(load.WorkerLoad.watch), and Telemetry.ingest_status touches the load it learned for, so sync()
refreshes only the rows of the objects written since the last decision. The lists are compared
with the last ones by object identity (list ==: WorkerLoad is eq=False, so a C-speed pass); a
different list, Telemetry.epoch moving (remove_worker, changed()), a row whose worker id or zone
changed (a prefill row would move; the chooser's groups of decode rows are kept per build)
rebuilds every column.
"""
from __future__ import annotations

import numpy as np

from pdcluster.router.placement.load import WorkerLoad

_ROOMY = np.iinfo(np.int64).max         # free_eff of a worker whose KV capacity is not known yet: fits anything


class Columns:
    def __init__(self, cm, zone_index):
        self.cm, self.zone_index = cm, zone_index
        self.dirty: set[int] = set()            # id() of watched WorkerLoads written since the last sync
        self.dloads: list[WorkerLoad] = []      # the decode list as handed in (its order)
        self.ploads: list[WorkerLoad] = []
        self.loads: list[WorkerLoad] = []       # row -> its WorkerLoad
        self.wids: list[str] = []               # row -> worker id
        self.nD = 0
        self.rows_of_obj: dict[int, tuple] = {}     # id(WorkerLoad) -> its rows (two if in both lists)
        self.drow: dict[str, int] = {}          # decode worker id -> row
        self.prow: dict[str, int] = {}          # prefill worker id -> row - nD (its prefill-local row)
        self.prow_g: dict[str, int] = {}        # prefill worker id -> row
        self.unique = True                      # no worker id twice in a list
        self.epoch = None                       # Telemetry.epoch the columns were built at
        self.tel = None                         # ... and that Telemetry
        self.generation = 0                     # rebuilds so far

    def __del__(self):
        for w in self.loads:
            w.unwatch(self.dirty)

    def sync(self, prefills: list[WorkerLoad], decodes: list[WorkerLoad]) -> None:
        tel = self.cm.telemetry
        if decodes != self.dloads or prefills != self.ploads or tel.epoch != self.epoch or tel is not self.tel:
            # (WorkerLoad compares by identity: != is "not the same objects in the same order")
            self._rebuild(prefills, decodes)
        elif self.dirty:
            rows = [r for i in self.dirty for r in self.rows_of_obj.get(i, ())]
            self.dirty.clear()
            loads, wids, zones = self.loads, self.wids, self.zones
            for r in rows:
                w = loads[r]
                if w.worker_id != wids[r] or w.zone != zones[r]:
                    self._rebuild(prefills, decodes)
                    return
                self._fill(r)

    def _rebuild(self, prefills: list[WorkerLoad], decodes: list[WorkerLoad]) -> None:
        for w in self.loads:
            w.unwatch(self.dirty)
        self.dloads, self.ploads = list(decodes), list(prefills)
        self.generation += 1
        self.dirty.clear()
        zi = self.zone_index
        dl = sorted(decodes, key=lambda w: w.worker_id)
        pl = sorted(prefills, key=lambda w: (zi(w.zone), w.worker_id))
        self.loads = dl + pl
        nD, nP = len(dl), len(pl)
        n = self.N = nD + nP
        self.nD = nD
        for w in self.loads:
            w.watch(self.dirty)
        self.tel = self.cm.telemetry
        self.epoch = self.tel.epoch
        self.wids = [w.worker_id for w in self.loads]
        self.zones = [w.zone for w in self.loads]      # row -> zone label (zone: its index)
        rows: dict[int, tuple] = {}
        for r, w in enumerate(self.loads):
            rows[id(w)] = rows.get(id(w), ()) + (r,)
        self.rows_of_obj = rows
        self.drow = {w: r for r, w in enumerate(self.wids[:nD])}
        self.prow = {w: r for r, w in enumerate(self.wids[nD:])}
        self.prow_g = {w: nD + r for w, r in self.prow.items()}
        self.unique = len(self.drow) == nD and len(self.prow) == nP
        pw = self.wids[nD:]
        self.prank = [0] * nP                   # prefill row -> its position in worker id order
        for k, r in enumerate(sorted(range(nP), key=pw.__getitem__)):
            self.prank[r] = k
        self.prank_a = np.array(self.prank, np.int64)
        # all rows
        self.placeable = np.zeros(n, bool)
        self.unplaceable_inf = np.full(n, np.inf)      # 0.0 where placeable, else inf (a price that masks)
        self.rate = np.ones(n)                  # prefill tokens/s (Telemetry.prefill_tps)
        self.q = np.zeros(n)                    # queue seconds: queued / rate (decode: a local prefill's),
        #                                         max(queued, waiting) / rate (prefill: a remote one's)
        self.zone = np.zeros(n, np.int64)       # VectorChooser.zone_index
        # decode rows only
        self.step_n = np.zeros(nD)              # decode step seconds at nseq = max(running, in_flight)
        self.step_n1 = np.zeros(nD)             # ... at nseq + 1
        self.pen_n = np.zeros(nD)               # local_penalty * nseq
        self.busy = np.zeros(nD)                # 1.0 where nseq > 0 (a local prefill stalls its batch)
        self.free_eff = np.zeros(nD, np.int64)  # free blocks; _ROOMY while the KV capacity is unknown
        self.free_cached = np.zeros(nD, np.int64)   # of them, those holding cached blocks (cost_model.kv_fits)
        self.tpot_r = np.zeros(nD, bool)        # a remote option's TPOT guard: max(step at nseq + 1, 0) <= slo
        for r in range(n):
            self._fill(r)
        self.prefill_zones()

    def prefill_zones(self) -> None:
        """pstarts: the first prefill-local row of each zone's slice of the prefill rows (for per-zone
        reductions: np.minimum.reduceat); pzone: each slice's zone index."""
        z = self.zone[self.nD:]
        first = np.ones(len(z), bool)
        first[1:] = z[1:] != z[:-1]
        self.pstarts = first.nonzero()[0]
        self.pzone = z[self.pstarts]

    def _fill(self, r: int) -> None:
        w, cm = self.loads[r], self.cm
        tel = cm.telemetry
        rate = tel.prefill_tps(w)
        ok = w.healthy and not w.draining
        self.placeable[r] = ok
        self.unplaceable_inf[r] = 0.0 if ok else np.inf
        self.rate[r] = rate
        self.zone[r] = self.zone_index(w.zone)
        if r >= self.nD:
            self.q[r] = max(w.queued_tokens, w.waiting_tokens) / rate
            return
        self.q[r] = max(w.queued_tokens, w.waiting_tokens) / rate    # its scheduler's backlog, ours or not
        n = max(w.running, w.in_flight)
        # (step_s on a prefill worker would create its perf as a decode's: decode rows only)
        step_n1 = tel.step_s(w, n + 1)
        self.step_n[r], self.step_n1[r] = tel.step_s(w, n), step_n1
        self.pen_n[r] = cm.cfg.local_penalty * n
        self.busy[r] = 1.0 if n else 0.0
        self.free_eff[r] = w.free_blocks if w.num_blocks > 1 else _ROOMY     # (capacity_known)
        self.free_cached[r] = w.free_cached_blocks
        slo = cm.cfg.tpot_slo_s
        self.tpot_r[r] = slo is None or max(step_n1, 0.0) <= slo

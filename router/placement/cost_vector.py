"""The cost model's `choose` at fleet scale: the same answer as CostModel.choose_scan (and so as
choose_exhaustive), from numpy columns of per-worker figures kept across decisions. Pure Python + numpy.

What one decision costs, and why it does not grow with a Python loop over the workers:
- Per-worker figures that depend on the worker alone (placeable, prefill rate, queue seconds, the
  decode step at its batch and one more, free / total blocks, zone) live in one numpy column per
  figure, per role (_Side). A WorkerLoad tells its watchers which object changed on every field
  write (load.WorkerLoad.watch), and Telemetry.ingest_status touches the load it learned for, so a
  decision refreshes only the rows of the workers that changed since the last one. The lists the
  router hands in are compared by object identity (a C-speed pass); a different list, or
  Telemetry.epoch moving (remove_worker, changed()), rebuilds the columns.
- Prefix hits come from PrefixIndex.match_levels (a memoized walk: levels of workers with the same
  hit) and PrefixIndex.inexact (the few workers whose confidence is below 1): every worker of a
  level gets the same cached-token figure, so the per-worker hit columns are one numpy gather.
- The prices are the float operations estimate_local / estimate_remote / CostModel.choose_scan make,
  in their order, on numpy float64 columns (IEEE double either way: bit-identical). The remote
  side ranks all prefill workers for each group g = (d's zone, cached tokens at d) as a (groups x
  prefills) matrix instead of choose_scan's threshold walk; the window of near-lowest keys, the
  per-d exact cost of each window row and the tie rules (lower cost, then local, then lower decode
  id, then lower prefill id) are choose_scan's. Pairs with a measured link are priced one by one in
  Python, as there.
Not covered here (CostModel.choose then takes choose_scan): prefix hits in host / disk tiers, peer
pulls, worker ids repeated in a list, and the case where no option is KV-feasible (the fallback,
CostModel._fallback_choice).
"""
from __future__ import annotations

import time
from operator import is_

import numpy as np

from pdcluster.kv_transfer.codec_policy import CompressionPolicy
from pdcluster.router.placement.base import Placement
from pdcluster.router.placement.load import WorkerLoad

SCAN = object()         # choose(): "take CostModel.choose_scan" (a case not covered here)


class _Side:
    """The columns of one role's worker list (see the module doc). Row i is self.loads[i]."""

    def __init__(self, owner: "VectorChooser", role: str):
        self.owner, self.role = owner, role
        self.dirty: set[int] = set()        # ids of watched WorkerLoads written since the last sync
        self.loads: list[WorkerLoad] = []
        self.ids: list[int] | None = None   # id() of each row's object
        self.row_of_obj: dict[int, int] = {}
        self.row_of: dict[str, int] = {}    # worker id -> row
        self.wids: list[str] = []
        self.unique = True                  # no worker id twice in the list
        self.epoch = None                   # Telemetry.epoch the columns were built at
        self.tel = None                     # ... and that Telemetry
        self.generation = 0                 # rebuilds so far
        self.memo: dict[int, tuple] = {}    # id(frozenset of worker ids) -> (that set, its rows here)

    def __del__(self):
        for w in self.loads:
            w.unwatch(self.dirty)

    def sync(self, loads: list[WorkerLoad]) -> None:
        tel = self.owner.cm.telemetry
        if (len(loads) != len(self.loads) or not all(map(is_, loads, self.loads)) or tel.epoch != self.epoch
                or tel is not self.tel):
            self._rebuild(loads, list(map(id, loads)))
        elif self.dirty:
            changed = [self.row_of_obj[i] for i in self.dirty if i in self.row_of_obj]
            self.dirty.clear()
            for r in changed:
                if self.loads[r].worker_id != self.wids[r]:
                    self._rebuild(loads, list(map(id, loads)))
                    return
                self._fill(r)

    def _rebuild(self, loads: list[WorkerLoad], ids: list[int]) -> None:
        keep = set(ids)
        for w in self.loads:
            if id(w) not in keep:
                w.unwatch(self.dirty)
        self.loads, self.ids = list(loads), ids
        self.generation += 1
        self.dirty.clear()
        for w in self.loads:
            w.watch(self.dirty)
        n = len(loads)
        self.tel = self.owner.cm.telemetry
        self.epoch = self.tel.epoch
        self.row_of_obj = {i: r for r, i in enumerate(ids)}
        self.wids = [w.worker_id for w in loads]
        self.row_of = {w: r for r, w in enumerate(self.wids)}
        self.unique = len(self.row_of) == n
        order = sorted(range(n), key=lambda r: self.wids[r])
        self.rank = np.empty(n, np.int64)               # row -> position in worker id order
        self.rank[order] = np.arange(n)
        self.placeable = np.zeros(n, bool)
        self.rate = np.ones(n)                          # prefill tokens/s (Telemetry.prefill_tps)
        self.q = np.zeros(n)                            # max(queued, waiting) / rate: a remote queue_s
        self.qloc = np.zeros(n)                         # queued / rate: a local queue_s
        self.nseq = np.zeros(n, np.int64)               # max(running, in_flight)
        self.pen_n = np.zeros(n)                        # local_penalty * nseq
        self.step_n = np.zeros(n)                       # decode step seconds at nseq (decode rows)
        self.step_n1 = np.zeros(n)                      # ... at nseq + 1
        self.free = np.zeros(n, np.int64)
        self.cap_unknown = np.zeros(n, bool)
        self.tpot_r = np.zeros(n, bool)                 # a remote option's TPOT guard: step at nseq + 1 <= slo
        self.num_blocks = np.zeros(n, np.int64)
        self.zone = np.zeros(n, np.int64)               # VectorChooser.zone_index
        self.memo.clear()
        for r in range(n):
            self._fill(r)

    def _fill(self, r: int) -> None:
        w, cm = self.loads[r], self.owner.cm
        tel = cm.telemetry
        rate = tel.prefill_tps(w)
        n = max(w.running, w.in_flight)
        self.placeable[r] = w.placeable
        self.rate[r] = rate
        self.q[r] = max(w.queued_tokens, w.waiting_tokens) / rate
        self.qloc[r] = w.queued_tokens / rate
        self.nseq[r] = n
        self.pen_n[r] = cm.cfg.local_penalty * n
        if self.role == "decode":       # (step_s on a prefill worker would create its perf as a decode's)
            self.step_n[r], self.step_n1[r] = tel.step_s(w, n), tel.step_s(w, n + 1)
        self.free[r] = w.free_blocks
        self.cap_unknown[r] = not w.capacity_known
        slo = cm.cfg.tpot_slo_s
        self.tpot_r[r] = slo is None or max(self.step_n1[r], 0.0) <= slo
        self.num_blocks[r] = w.num_blocks
        self.zone[r] = self.owner.zone_index(w.zone)

    def rows(self, workers: frozenset) -> np.ndarray:
        """Rows of the workers of `workers` in this list (memoized per set object)."""
        hit = self.memo.get(id(workers))
        if hit is not None and hit[0] is workers:
            return hit[1]
        m = self.row_of
        rows = np.fromiter((m[w] for w in workers if w in m), np.int64)
        if len(self.memo) > 4096:
            self.memo.clear()
        self.memo[id(workers)] = (workers, rows)
        return rows


class VectorChooser:
    """One per CostModel: the columns of its prefill and decode lists, kept across decisions."""

    def __init__(self, cm):
        self.cm = cm
        self.zones: list[str] = []
        self._zone_ix: dict[str, int] = {}
        self.P, self.D = _Side(self, "prefill"), _Side(self, "decode")
        self._measured_key = None
        self._zone_key = None
        self._bps = np.zeros((0, 0))
        self._measured: dict[str, list[str]] = {}

    def zone_index(self, zone: str) -> int:
        i = self._zone_ix.get(zone)
        if i is None:
            i = self._zone_ix[zone] = len(self.zones)
            self.zones.append(zone)
        return i

    def _zone_bps(self) -> np.ndarray:
        """[src zone, dst zone] -> bytes/s of a link priced from zone figures (LinkTable.zone_prior)."""
        links = self.cm.telemetry.links
        key = (links.version, len(self.zones))
        if key != self._zone_key:
            n = len(self.zones)
            self._bps = np.array([[links.zone_prior(a, b)[0] for b in self.zones] for a in self.zones]).reshape(n, n)
            self._zone_key = key
        return self._bps

    def _measured_links(self) -> dict[str, list[str]]:
        """decode id -> prefill ids (of the prefill list) with a measured link to it."""
        links = self.cm.telemetry.links
        key = (links.version, len(links.links), self.P.generation)
        if key != self._measured_key:
            self._measured = {}
            for src, dst in links.links:
                if src in self.P.row_of:
                    self._measured.setdefault(dst, []).append(src)
            self._measured_key = key
        return self._measured

    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad], exclude,
               hashes, now):
        """CostModel.choose_scan's Placement, or SCAN for a case this does not cover (module doc)."""
        cm = self.cm
        c, tel, index = cm.cfg, cm.telemetry, cm.index
        if c.peer_pull or index.has_lower_tiers:
            return SCAN
        t = time.time() if now is None else now
        P, D = self.P, self.D
        D.sync(decodes)
        P.sync(prefills)
        if not (D.unique and P.unique):
            return SCAN
        L, bs = prompt_len, c.block_size
        uD = D.placeable.copy()
        uP = P.placeable.copy() if c.allow_remote else np.zeros(len(P.loads), bool)
        for w in exclude:
            r = D.row_of.get(w)
            if r is not None:
                uD[r] = False
            r = P.row_of.get(w)
            if r is not None:
                uP[r] = False
        if not uD.any():
            return None
        # prefix hits: code 0 = none; one code per level, one per inexact worker with a hit
        vals, blks = [0.0], [0]
        codeD = np.zeros(len(D.loads), np.int64)
        codeP = np.zeros(len(P.loads), np.int64)
        levels = index.match_levels(hashes) if hashes else ()
        if levels:
            for n, ws in levels:
                v = cm._cached(n, L, 1.0)
                vals.append(v)
                blks.append(int(v // bs))
                j = len(vals) - 1
                codeD[D.rows(ws)] = j
                codeP[P.rows(ws)] = j
            for w, conf in index.inexact(t).items():
                n = next((n for n, ws in levels if w in ws), 0)
                if not n:
                    continue
                v = cm._cached(n, L, conf)
                vals.append(v)
                blks.append(int(v // bs))
                for side, code in ((D, codeD), (P, codeP)):
                    r = side.row_of.get(w)
                    if r is not None:
                        code[r] = len(vals) - 1
        vals_a, blks_a = np.array(vals), np.array(blks, np.int64)
        cD, cP = vals_a[codeD], vals_a[codeP]
        best_cached = max(float(np.max(cD, where=uD, initial=0.0)), float(np.max(cP, where=uP, initial=0.0)))
        dup_on = bool(c.duplicate_penalty and best_cached)
        local_ok = c.allow_local and (c.local_max_tokens is None or prompt_len <= c.local_max_tokens)
        n_ps = int(uP.sum())
        slo = c.tpot_slo_s
        # decode side: verdicts (the local and remote option of d need the same blocks here: no lower tiers)
        need = -(-prompt_len // bs) + 1
        blocks = np.maximum(0, need - blks_a[codeD])
        kv = uD & (D.cap_unknown | (D.free >= blocks))
        n_kv = int(kv.sum())
        kv_ok_count = (n_kv if local_ok else 0) + (n_ps * n_kv)
        if not n_kv:
            return SCAN                             # nothing KV-feasible: the fallback's case
        inf = np.inf
        cost_l = np.full(len(D.loads), inf)
        tpot_l = np.zeros(len(D.loads), bool)
        if local_ok:                                # estimate_local's cost, its float operations in its order
            comp = (L - cD) / D.rate
            cost_l = ((D.qloc + comp) + D.step_n) + D.pen_n * comp
            if dup_on:
                rep = best_cached - cD
                cost_l = np.where(rep > 0, cost_l + (c.duplicate_penalty * rep) / D.rate, cost_l)
            stall = np.where(D.nseq > 0, D.step_n + np.minimum(L - cD, c.local_chunk_tokens) / D.rate, 0.0)
            tpot_l = np.ones(len(D.loads), bool) if slo is None else np.maximum(D.step_n1, stall) <= slo
        cost_r = np.full(len(D.loads), inf)
        p_r = np.full(len(D.loads), -1, np.int64)
        rmask = kv if n_ps else np.zeros(len(D.loads), bool)
        if n_ps:
            self._remote(prompt_len, cP, uP, cD, codeD, vals, rmask, best_cached, dup_on, cost_r, p_r)
        tpot_r = D.tpot_r
        lmask = kv if local_ok else np.zeros(len(D.loads), bool)
        pick = self._pick(cost_l, lmask & tpot_l, cost_r, rmask & tpot_r)
        if pick is None and not c.tpot_strict:
            pick = self._pick(cost_l, lmask, cost_r, rmask)
        if pick is None:
            return None
        kind, r = pick
        d = D.loads[r]
        if kind == "local":
            e = cm.estimate_local(prompt_len, d, float(cD[r]), 0.0)
            rate = tel.prefill_tps(d)
        else:
            p = P.loads[p_r[r]]
            e = cm.estimate_remote(prompt_len, p, d, float(cP[p_r[r]]), float(cD[r]), t, 0.0)
            rate = tel.prefill_tps(p)
        if dup_on and best_cached - e.cached_tokens > 0:
            e.duplicate_penalty_s = c.duplicate_penalty * (best_cached - e.cached_tokens) / rate
            e.cost_s += e.duplicate_penalty_s
        return Placement(e.prefill, e.decode, e.kind, e.as_dict() | {"options_kv_ok": kv_ok_count})

    def _pick(self, cost_l, lmask, cost_r, rmask):
        """(kind, decode row) of the lowest (cost, remote?, decode id) among the masked options, or None."""
        lo = min(float(cost_l[lmask].min()) if lmask.any() else np.inf,
                 float(cost_r[rmask].min()) if rmask.any() else np.inf)
        if lo == np.inf and not (lmask.any() or rmask.any()):
            return None
        rank = self.D.rank
        for kind, cost, mask in (("local", cost_l, lmask), ("remote", cost_r, rmask)):
            tied = np.flatnonzero(mask & (cost == lo))
            if len(tied):
                return kind, int(tied[np.argmin(rank[tied])])
        return None

    def _remote(self, prompt_len, cP, uP, cD, codeD, vals, rmask, best_cached, dup_on, cost_r, p_r) -> None:
        """Each remote-feasible d's cheapest prefill worker and cost into p_r, cost_r (choose_scan's)."""
        cm, P, D = self.cm, self.P, self.D
        c, tel = cm.cfg, cm.telemetry
        L = prompt_len
        comp = (L - cP) / P.rate
        qc = P.q + comp                             # queue, compute (+ tier load: 0.0 here)
        if dup_on:
            hasdup = best_cached - cP > 0
            dup0 = np.where(hasdup, (c.duplicate_penalty * (best_cached - cP)) / P.rate, 0.0)
        else:
            hasdup, dup0 = np.zeros(len(cP), bool), np.zeros(len(cP))
        drows = np.flatnonzero(rmask)
        # groups g = (d's zone, d's hit code): key zone * K + code; present keys in order
        K = len(vals)
        gkey = D.zone[drows] * K + codeD[drows]
        present = np.bincount(gkey, minlength=len(self.zones) * K) > 0
        gvals = np.flatnonzero(present)
        ginv = (np.cumsum(present) - 1)[gkey]       # group of each remote-feasible d
        G = len(gvals)
        g_zone, g_code = gvals // K, gvals % K
        layers = max(c.num_layers, 1)
        # transfer seconds per (group, p zone) over zone-priced links: CostModel._transfer's
        # operations; the codec of an unmeasured link (CostModel.kv_codec without a measured
        # bandwidth) is the policy's answer without a bandwidth, the same for every transfer
        wire = c.wire_bytes_per_token(CompressionPolicy(c.kv_compression).choose(0, None, None))
        nbytes_k = (L - np.array(vals)) * wire
        tr = nbytes_k[g_code][:, None] / np.maximum(self._zone_bps()[:, g_zone].T, 1.0)     # (G, zones)
        x = tr[:, P.zone]                           # (G, prefills)
        s = qc + np.maximum(x / layers, x - comp)   # queue+compute + _exposed
        key = s + dup0
        key[:, ~uP] = np.inf
        lo_all = key.min(axis=1)
        in_win = key <= (lo_all + 1e-9 * (np.abs(lo_all) + 1.0))[:, None]

        def window(row: int, skip) -> list:
            """choose_scan's _Group.window for group `row`: (s, dup or None, prefill row), sorted by prefill id."""
            k = key[row]
            if skip:
                k = k.copy()
                k[[P.row_of[w] for w in skip]] = np.inf
            lo = float(k.min())
            if lo == np.inf:
                return []
            tol = 1e-9 * (abs(lo) + 1.0)
            best: dict[tuple, int] = {}
            for pr in np.flatnonzero(k <= lo + tol):
                kk = (float(s[row, pr]), float(dup0[pr]) if hasdup[pr] else None)
                if kk not in best or P.wids[pr] < P.wids[best[kk]]:
                    best[kk] = int(pr)
            return sorted(((kk[0], kk[1], pr) for kk, pr in best.items()), key=lambda e: P.wids[e[2]])

        # the common case: one prefill row within rounding of a group's lowest key; the others
        # (several rows) are deduplicated and ordered by prefill id in Python (window)
        gr = np.arange(G)
        p0 = in_win.argmax(axis=1)
        sv, dv, pv = s[gr, p0], dup0[p0], p0        # (G,) row 0 of each group's window
        wins: list = [None] * G
        extra = []                                  # rows 1.. of groups with several
        for g in np.flatnonzero(in_win.sum(axis=1) > 1).tolist():
            wins[g] = w = window(g, ())
            sv[g], dv[g], pv[g] = w[0][0], w[0][1] or 0.0, w[0][2]
            extra.append(g)
        over = c.remote_overhead_s
        step = D.step_n[drows]
        best_c = ((sv[ginv] + step) + over) + dv[ginv]
        best_p = pv[ginv]
        for i in range(1, max((len(wins[g]) for g in extra), default=1)):
            sv = np.full(G, np.inf)
            dv = np.zeros(G)
            pv = np.full(G, -1, np.int64)
            for g in extra:
                if i < len(wins[g]):
                    sv[g], dv[g], pv[g] = wins[g][i][0], wins[g][i][1] or 0.0, wins[g][i][2]
            cost = ((sv[ginv] + step) + over) + dv[ginv]
            better = cost < best_c                  # rows in prefill id order: a tie keeps the lower id
            best_c = np.where(better, cost, best_c)
            best_p = np.where(better, pv[ginv], best_p)
        measured = self._measured_links()
        if measured:
            for j, r in enumerate(drows):
                mine = measured.get(D.wids[r])
                if not mine:
                    continue
                mine = [w for w in mine if uP[P.row_of[w]]]
                if not mine:
                    continue
                d = D.loads[r]
                cdev = float(cD[r])
                cands = []
                for w in mine:
                    pr = P.row_of[w]
                    p = P.loads[pr]
                    bps, src = tel.links.bandwidth(p.worker_id, d.worker_id, p.zone, d.zone)
                    codec = cm.kv_codec(L, p, cdev, bps if src == "measured" else None)
                    sp = float(qc[pr]) + cm._exposed(cm._transfer(L, cdev, codec, bps)[1], float(comp[pr]))
                    cands.append((sp, float(dup0[pr]) if hasdup[pr] else None, pr))
                g = int(ginv[j])
                skip = set(mine)
                plain = wins[g] if wins[g] is not None else window(g, ())
                cands += window(g, skip) if any(P.wids[e[2]] in skip for e in plain) else plain
                step_n = float(D.step_n[r])
                bc = None
                for sp, dup, pr in cands:
                    cost = sp + step_n + over
                    if dup is not None:
                        cost += dup
                    if bc is None or (cost, P.wids[pr]) < (bc[0], P.wids[bc[1]]):
                        bc = (cost, pr)
                best_c[j], best_p[j] = bc
        cost_r[drows] = best_c
        p_r[drows] = best_p

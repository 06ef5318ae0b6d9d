"""The cost model's `choose` at fleet scale: the same answer as CostModel.choose_scan (and so as
choose_exhaustive), from numpy columns of per-worker figures kept across decisions
(cost_columns.py). Pure Python + numpy, priced by one numba-compiled call (cost_kernel.py: the
same float operations, bit for bit) where numba imports, else by the numpy code of cost_numpy.py.

What one decision costs: a fixed number of numpy calls (about a hundred, on the worker rows or on
smaller arrays; with the kernel, one call and a few small arrays), not a Python loop over the
workers.
- Prefix hits come from PrefixIndex.match_levels (a memoized walk: levels of workers with the same
  hit) and PrefixIndex.inexact (the few workers whose confidence is below 1). Each row gets a hit
  code (0: none, one per level, one per inexact worker with a hit); the code column of a levels
  tuple is memoized (the walk returns the same tuple while the index is unchanged along the
  prompt), so the per-row hit figures are one gather of a handful of per-code values.
- The prices are the float operations estimate_local / estimate_remote / CostModel.choose_scan
  make, in their order, on float64 columns (IEEE double either way: bit-identical); the terms both
  roles price alike (compute, queue + compute, duplicate) are computed once over all rows.
- Remote: the answer for each decode worker d is its group's (d's zone, d's hit code) cheapest
  prefill workers. A prefill worker p's key in group g is s + duplicate with
  s = (queue + compute) + max(x / layers, x - compute), x the group's transfer seconds from p's zone,
  so key >= a_p + x / layers and key >= b_p + x (a = queue + compute + duplicate, b = a - compute, up
  to rounding), and key <= a_p + x (max(x / layers, x - compute) <= x: compute >= 0): so each
  group's lowest key is at most ub = min over prefill zones of (the zone's lowest a + x), found
  without pricing. A row within the window of near-lowest keys (1e-9 relative) has
  a_p <= ub - x / layers + m and b_p <= ub - x + m (m = 2e-9 relative to the largest |key| a
  window can hold, far above rounding), so only rows that pass both tests against their zone's
  largest bounds over the groups are priced: the key matrix (groups x those rows), a few rows per
  zone unless many workers nearly tie. The window, the per-d exact cost of
  each window row and the tie rules (lower cost, then local, then lower decode id, then lower
  prefill id) are choose_scan's. Pairs with a measured link are priced one by one in Python, as
  there (with the full key row of their group when the link removes a window row).
Not covered here (CostModel.choose then takes choose_scan): prefix hits in host / disk tiers, peer
pulls, worker ids repeated in a list, and the case where no option is KV-feasible (the fallback,
CostModel._fallback_choice). Figures are taken finite (rates > 0), as the cost model's are.
"""
from __future__ import annotations

import time
from itertools import chain

import numpy as np

from pdcluster.engine.rules import blocks_at_first_token
from pdcluster.kv_transfer.codec_policy import CompressionPolicy
from pdcluster.router.placement.base import Placement
from pdcluster.router.placement.cost_columns import Columns
from pdcluster.router.placement.cost_numpy import _INF, _MAX, SCAN, NumpyPricing  # noqa: F401  (SCAN: choose's answer)

_MEMO = 512             # memoized code columns (and row sets: 8x) before the memo starts over
COMPILED = True         # price with the numba kernel (cost_kernel.py) where numba imports; tests turn it off


def compiled_kernel():
    """cost_kernel (numba-compiled pricing), or None where numba is missing or COMPILED is off."""
    if not COMPILED:
        return None
    try:
        from pdcluster.router.placement import cost_kernel
    except ImportError:
        return None
    return cost_kernel


class VectorChooser(NumpyPricing):
    """One per CostModel: the columns of its prefill and decode lists, kept across decisions."""

    def __init__(self, cm):
        self.cm = cm
        self.zones: list[str] = []
        self._zone_ix: dict[str, int] = {}
        self.cols = Columns(cm, self.zone_index)
        self._measured_key = None
        self._zone_key = None
        self._bps = np.zeros((0, 0))
        self._measured: dict[str, list[str]] = {}
        self._wire = (None, 0.0)
        self._codes: dict[int, list] = {}       # id(levels) -> _codes_of's entry
        self._plain = (None, None)              # (generation, groups of the decode rows without hits)
        self._rows: dict[int, tuple] = {}       # id(frozenset of worker ids) -> (that set, generation, rows)
        self.kernel = compiled_kernel()
        self._buf = (None, None)                # (generation, the kernel's buffers: _Buffers)

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
        key = (links.version, len(links.links), self.cols.generation)
        if key != self._measured_key:
            self._measured = {}
            for src, dst in links.links:
                if src in self.cols.prow:
                    self._measured.setdefault(dst, []).append(src)
            self._measured_key = key
        return self._measured

    def _wire_bytes(self, c) -> float:
        """Wire bytes per token of a transfer over an unmeasured link (CostModel.kv_codec without a
        measured bandwidth: the policy's answer without one, the same for every transfer)."""
        if self._wire[0] is not c:
            self._wire = (c, c.wire_bytes_per_token(CompressionPolicy(c.kv_compression).choose(0, None, None)))
        return self._wire[1]

    def _rows_of(self, ws: frozenset) -> np.ndarray:
        """Rows of the workers of `ws` (worker ids) in either list (memoized per set object)."""
        X = self.cols
        hit = self._rows.get(id(ws))
        if hit is not None and hit[0] is ws and hit[1] == X.generation:
            return hit[2]
        d, p = X.drow, X.prow_g
        rows = np.fromiter(chain(map(d.__getitem__, d.keys() & ws), map(p.__getitem__, p.keys() & ws)), np.int64)
        if len(self._rows) > 8 * _MEMO:
            self._rows.clear()
        self._rows[id(ws)] = (ws, X.generation, rows)
        return rows

    def _codes_of(self, levels: tuple) -> list:
        """[levels, generation, row -> level code (1 + the level's position in `levels`; 0: no hit),
        the decode rows' groups or None until asked]: memoized per levels tuple."""
        X = self.cols
        hit = self._codes.get(id(levels))
        if hit is not None and hit[0] is levels and hit[1] == X.generation:
            return hit
        code = np.zeros(X.N, np.int64)
        for j, (_n, ws) in enumerate(levels, 1):
            code[self._rows_of(ws)] = j
        if len(self._codes) > _MEMO:
            self._codes.clear()
        hit = self._codes[id(levels)] = [levels, X.generation, code, None]
        return hit

    def _groups(self, code, K: int) -> list:
        """[G, group of each decode row, each group's zone, each group's hit code, then four slots
        _remote fills: the link figures' key, (G, zones) bytes/s, the transfer figures' key, (G, zones)
        transfer seconds, the same / layers, their max]: the groups g = (zone, hit code) of the
        decode rows, numbered in (zone, code) order."""
        X = self.cols
        gkey = X.zone[:X.nD] * K
        if code is not None:
            gkey += code[:X.nD]
        present = np.bincount(gkey, minlength=len(self.zones) * K)
        gvals = present.nonzero()[0]
        lut = np.zeros(len(present), np.int64)
        lut[gvals] = np.arange(len(gvals))
        return [len(gvals), lut.take(gkey), gvals // K, gvals % K, None, None, None, None]

    def choose(self, prompt_len: int, prefills, decodes, exclude, hashes, now):
        """CostModel.choose_scan's Placement, or SCAN for a case this does not cover (module doc)."""
        c, index = self.cm.cfg, self.cm.index
        if c.peer_pull or index.has_lower_tiers:
            return SCAN
        t = time.time() if now is None else now
        X = self.cols
        X.sync(prefills, decodes)
        if not X.unique:
            return SCAN
        u, p_all = self._usable(exclude)
        if self.kernel is not None:
            return self._choose_compiled(prompt_len, hashes, t, u)
        if not np.count_nonzero(u[:X.nD]):
            return None
        return self._choose_numpy(prompt_len, hashes, t, u, p_all)

    def _usable(self, exclude) -> tuple[np.ndarray, bool]:
        """(usable rows: the placeable ones less exclude's, and less the prefill rows without
        allow_remote; a copy once one is taken off), every placeable prefill row is usable)."""
        X = self.cols
        u = X.placeable
        if not self.cm.cfg.allow_remote:
            u = u.copy()
            u[X.nD:] = False
        p_all = True
        for w in exclude:
            r, rp = X.drow.get(w), X.prow_g.get(w)
            if r is None and rp is None:
                continue
            if u is X.placeable:
                u = u.copy()
            if r is not None:
                u[r] = False
            if rp is not None:
                u[rp] = p_all = False
        return u, p_all

    def _hits(self, prompt_len: int, hashes, t: float) -> tuple[list, list, np.ndarray | None, list | None]:
        """Prefix hits: (cached tokens per code, blocks per code, a code per row or None where no
        row has a hit, the memo entry of the code column or None where this decision made its own)."""
        cm, X, index = self.cm, self.cols, self.cm.index
        bs = cm.cfg.block_size
        vals, blks = [0.0], [0]
        levels = index.match_levels(hashes) if hashes else ()
        code = memo = None
        if levels:
            memo = self._codes_of(levels)
            code = memo[2]
            for n, _ws in levels:
                v = cm._cached(n, prompt_len, 1.0)
                vals.append(v)
                blks.append(int(v // bs))
            for w, conf in index.inexact(t).items():
                n = next((n for n, ws in levels if w in ws), 0)
                if not n:
                    continue
                v = cm._cached(n, prompt_len, conf)
                vals.append(v)
                blks.append(int(v // bs))
                if memo is not None:            # this decision's own codes (and groups)
                    code, memo = code.copy(), None
                r = X.drow.get(w)
                if r is not None:
                    code[r] = len(vals) - 1
                r = X.prow_g.get(w)
                if r is not None:
                    code[r] = len(vals) - 1
        return vals, blks, code, memo

    def _groups_for(self, code, memo, K: int) -> list:
        """_groups of this decision's codes: memoized with the code column, or per build where no row
        has a hit."""
        X = self.cols
        if memo is not None:
            if memo[3] is None:
                memo[3] = self._groups(code, K)
            return memo[3]
        if code is not None:                    # this decision's own codes (inexact workers)
            return self._groups(code, K)
        if self._plain[0] != X.generation:
            self._plain = (X.generation, self._groups(None, 1))
        return self._plain[1]

    def _transfer_figures(self, L: int, vals_a: np.ndarray, groups: list) -> tuple[np.ndarray, float]:
        """((2, G, zones) [transfer seconds / layers, transfer seconds] per (group, p zone) over
        zone-priced links (CostModel._transfer's operations), their max), kept in the groups memo."""
        c = self.cm.cfg
        layers = max(c.num_layers, 1)
        links_key = (c, self.cm.telemetry.links.version)
        if groups[4] != links_key:
            groups[4:] = links_key, np.maximum(self._zone_bps()[:, groups[2]].T, 1.0), None, None  # (G, zones) bytes/s
        tr_key = (L, vals_a.tobytes(), self._wire_bytes(c), layers)
        if groups[6] != tr_key:
            tr = ((L - vals_a) * self._wire_bytes(c)).take(groups[3])[:, None] / groups[5]
            groups[6:] = tr_key, (np.stack((tr / layers, tr)), float(_MAX(tr, axis=None)))
        return groups[7]

    def _local_ok(self, prompt_len: int) -> bool:
        c = self.cm.cfg
        return c.allow_local and (c.local_max_tokens is None or prompt_len <= c.local_max_tokens)

    def _placement(self, prompt_len: int, t: float, i: int, p_best, cc, best_cached: float, dup_on: bool,
                   kv_ok_count: int) -> Placement:
        """The winner's Placement: option i (< nD: decode row i's local option; else decode row
        i - nD's remote one, from prefill-local row p_best[i - nD]), priced as choose_scan does."""
        cm, X = self.cm, self.cols
        c, tel = cm.cfg, cm.telemetry
        nD = X.nD
        if i < nD:
            d = X.loads[i]
            e = cm.estimate_local(prompt_len, d, float(cc[i]), 0.0)
            rate = tel.prefill_tps(d)
        else:
            r = i - nD
            pr = nD + int(p_best[r])
            d, p = X.loads[r], X.loads[pr]
            e = cm.estimate_remote(prompt_len, p, d, float(cc[pr]), float(cc[r]), t, 0.0)
            rate = tel.prefill_tps(p)
        if dup_on and best_cached - e.cached_tokens > 0:
            e.duplicate_penalty_s = c.duplicate_penalty * (best_cached - e.cached_tokens) / rate
            e.cost_s += e.duplicate_penalty_s
        return Placement(e.prefill, e.decode, e.kind, e.as_dict() | {"options_kv_ok": kv_ok_count})

    def _buffers(self, G: int) -> _Buffers:
        """The kernel's buffers for the columns as built (window entries for G groups)."""
        X = self.cols
        if self._buf[0] != X.generation:
            self._buf = (X.generation, _Buffers(X.N, X.nD))
        b = self._buf[1]
        b.fit_windows(G)
        return b

    def _choose_compiled(self, prompt_len: int, hashes, t: float, u: np.ndarray):
        """_choose_numpy's answer from one cost_kernel.decide call (and, for pairs with a measured
        link, _price_measured between the pricing and the pick)."""
        cm, X, k = self.cm, self.cols, self.kernel
        c = cm.cfg
        nD, L = X.nD, prompt_len
        if not nD:
            return None
        vals, blks, code, memo = self._hits(prompt_len, hashes, t)
        vals_a = np.array(vals)
        groups = self._groups_for(code, memo, len(vals))
        B = self._buffers(groups[0])
        if code is None:
            code = B.no_code
        if X.N > nD:
            tt, tr_max = self._transfer_figures(L, vals_a, groups)
        else:
            tt, tr_max = B.no_tt, 0.0
        local_ok = self._local_ok(prompt_len)
        slo = c.tpot_slo_s
        measured = self._measured_links()
        # (scalars as the kernel was compiled for: floats and bools)
        Lf, guard, slo_f, strict, chunk = (float(L), bool(local_ok and slo is not None),
                                           0.0 if slo is None else float(slo), bool(c.tpot_strict),
                                           float(c.local_chunk_tokens))
        status, i, n_kl, n_kv, n_ps, best_cached = k.decide(
            Lf, blocks_at_first_token(prompt_len, c.block_size), nD, u, code, vals_a, np.array(blks, np.int64),
            X.rate, X.q, X.zone, X.step_n, X.step_n1, X.pen_n, X.busy, X.free_eff, X.free_cached, X.tpot_r,
            X.pstarts, X.pzone, groups[1], tt, tr_max, X.prank_a, float(c.duplicate_penalty), bool(local_ok),
            float(c.remote_overhead_s), slo_f, guard, strict, chunk, not measured,
            B.terms, B.opt, B.mask, B.guarded, B.kv, B.best_p, B.wstart, B.ws, B.wdv, B.wpr, B.rows)
        if status == k.NO_DECODE:
            return None
        if status == k.SCAN:
            return SCAN                             # nothing KV-feasible: the fallback's case
        dup_on = bool(c.duplicate_penalty and best_cached)
        cc = B.terms[3]
        if measured:
            if n_ps:
                dupP = B.terms[4][nD:] if dup_on else None
                ws, wpr, wstart, ccP = B.ws, B.wpr, B.wstart, cc[nD:]

                def plain(g: int) -> list:
                    return [(float(ws[e]), float(dupP[p]) if dupP is not None and best_cached - float(ccP[p]) > 0
                             else None, p) for e in range(wstart[g], wstart[g + 1]) for p in (int(wpr[e]),)]

                self._price_measured(L, cc, B.terms[:3, nD:], dupP, best_cached, u, B.kv, groups, plain,
                                     B.opt[nD:], B.best_p)
            i = k.pick_guarded(B.opt, B.mask, B.guarded, nD, guard, slo_f, strict, chunk, Lf, cc,
                               X.rate, X.step_n, X.step_n1, X.busy)
        if i < 0:
            return None
        kv_ok_count = n_kl + n_ps * n_kv
        return self._placement(prompt_len, t, i, B.best_p, cc, best_cached, dup_on, kv_ok_count)

    def _window(self, s_row, k_row, rows_at, dupP, ccP, best_cached: float) -> list:
        """choose_scan's _Group.window from one group's s and key over prefill rows rows_at:
        (s, dup or None, prefill-local row) per distinct (s, dup), lowest id kept, by prefill id."""
        prank = self.cols.prank
        lo = float(k_row.min())
        if lo == _INF:
            return []
        tol = 1e-9 * (abs(lo) + 1.0)
        best: dict[tuple, int] = {}
        for i in (k_row <= lo + tol).nonzero()[0].tolist():
            pr = int(rows_at[i])
            kk = (float(s_row[i]), float(dupP[pr]) if dupP is not None and best_cached - float(ccP[pr]) > 0
                  else None)
            if kk not in best or prank[pr] < prank[best[kk]]:
                best[kk] = pr
        return sorted(((kk[0], kk[1], pr) for kk, pr in best.items()), key=lambda e: prank[e[2]])

    def _price_measured(self, L, cc, termsP, dupP, best_cached, u, kv, groups, plain, out, best_p) -> None:
        """Pairs with a measured link priced one by one (choose_scan's), beside the rest of their
        group's window (plain(g): the window over every prefill row; priced again without the
        measured ones where one of them is in it): out and best_p of those decode rows updated."""
        cm, X = self.cm, self.cols
        tel = cm.telemetry
        nD = X.nD
        compP, qcP, addP = termsP
        zP, ccP = X.zone[nD:], cc[nD:]
        ginv = groups[1]
        layers = max(cm.cfg.num_layers, 1)
        tr = groups[7][0][1]
        over, step = cm.cfg.remote_overhead_s, X.step_n
        wids = X.wids

        def window_skip(g: int, skip) -> list:
            """The window of group g over every prefill row but those of `skip` (worker ids)."""
            xg = tr[g].take(zP)
            sg = qcP + np.maximum(xg / layers, xg - compP)
            kg = sg + addP
            kg[[X.prow[w] for w in skip]] = _INF
            return self._window(sg, kg, range(len(kg)), dupP, ccP, best_cached)

        uP = u[nD:]
        for dst, srcs in self._measured_links().items():
            r = X.drow.get(dst)
            if r is None or not kv[r]:
                continue
            mine = [w for w in srcs if uP[X.prow[w]]]
            if not mine:
                continue
            d = X.loads[r]
            cdev = float(cc[r])
            cands = []
            for w in mine:
                pr = X.prow[w]
                p = X.loads[nD + pr]
                bps, src = tel.links.bandwidth(p.worker_id, d.worker_id, p.zone, d.zone)
                codec = cm.kv_codec(L, p, cdev, bps if src == "measured" else None)
                sp = float(qcP[pr]) + cm._exposed(cm._transfer(L, cdev, codec, bps)[1], float(compP[pr]))
                cands.append((sp, float(dupP[pr]) if dupP is not None and best_cached - float(ccP[pr]) > 0
                              else None, pr))
            g = int(ginv[r])
            skip = set(mine)
            pl = plain(g)
            cands += window_skip(g, skip) if any(wids[nD + e[2]] in skip for e in pl) else pl
            step_n = float(step[r])
            bc = None
            for sp, dup, pr in cands:
                cost = sp + step_n + over
                if dup is not None:
                    cost += dup
                if bc is None or (cost, wids[nD + pr]) < (bc[0], wids[nD + bc[1]]):
                    bc = (cost, pr)
            out[r], best_p[r] = bc


class _Buffers:
    """What cost_kernel.decide writes (its module doc), for one build of the columns."""

    def __init__(self, N: int, nD: int):
        nP = N - nD
        self.terms = np.zeros((5, N))
        self.opt = np.zeros(2 * nD)
        self.mask = np.zeros(2 * nD, bool)
        self.guarded = np.zeros(2 * nD, bool)
        self.kv = np.zeros(nD, bool)
        self.best_p = np.zeros(nD, np.int64)
        self.rows = np.zeros(max(nP, 1), np.int64)
        self.no_code = np.zeros(N, np.int64)        # the code column where no row has a hit
        self.no_tt = np.zeros((2, 1, 1))            # transfer figures where there is no prefill row
        self.nP, self.G = nP, -1

    def fit_windows(self, G: int) -> None:
        """Room for G groups' windows: each holds at most one entry per prefill row."""
        if G > self.G:
            self.G = G
            self.wstart = np.zeros(G + 1, np.int64)
            n = max(G * self.nP, 1)
            self.ws, self.wdv, self.wpr = np.zeros(n), np.zeros(n), np.zeros(n, np.int64)

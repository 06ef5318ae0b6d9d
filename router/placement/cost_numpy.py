"""VectorChooser's numpy pricing (a mixin of cost_vector.py), where the numba kernel is not used.

The path taken where numba does not import (cost_vector.COMPILED, compiled_kernel), and the reference the
numba kernel (cost_kernel.py) is tested against. Same float operations as the kernel and as
CostModel.choose_scan; cost_vector.py's docstring states the pricing, the bound and the tie rules."""
from __future__ import annotations

import numpy as np

from pdcluster.engine.rules import blocks_at_first_token

SCAN = object()         # choose(): "take CostModel.choose_scan" (a case not covered here)
_INF = np.inf
_MIN, _MAX = np.minimum.reduce, np.maximum.reduce      # ndarray.min / max without their Python wrapper


class NumpyPricing:
    """VectorChooser's numpy path: _choose_numpy, its remote pricing (_remote) and pick (_pick)."""

    def _choose_numpy(self, prompt_len: int, hashes, t: float, u: np.ndarray, p_all: bool):
        cm, X = self.cm, self.cols
        c = cm.cfg
        nD, L, bs = X.nD, prompt_len, c.block_size
        uD = u[:nD]
        vals, blks, code, memo = self._hits(prompt_len, hashes, t)
        need = blocks_at_first_token(prompt_len, bs)
        vals_a = np.array(vals)
        if code is not None:
            cc = vals_a.take(code)              # cached tokens per row
            best_cached = float(_MAX(cc * u))       # (cc >= 0)
            blocks = np.array([max(0, need - b) for b in blks], np.int64).take(code[:nD])
            resident = np.array(blks, np.int64).take(code[:nD])
        else:
            cc, best_cached, blocks, resident = np.zeros(X.N), 0.0, need, 0
        dup_on = bool(c.duplicate_penalty and best_cached)
        local_ok = self._local_ok(prompt_len)
        n_ps = int(np.count_nonzero(u[nD:]))
        # decode verdicts (cost_model.kv_fits; both options of d need the same blocks here: no lower tiers):
        # kv_l a local option's, kv a remote one's (its hits in free cached blocks counted as taken too)
        kv_l = (X.free_eff >= blocks) & uD
        kv = X.free_eff >= blocks + np.minimum(resident, X.free_cached)
        kv &= uD
        n_kv = int(np.count_nonzero(kv))
        kv_ok_count = (int(np.count_nonzero(kv_l)) if local_ok else 0) + (n_ps * n_kv)
        if not kv_ok_count:
            return SCAN                             # nothing KV-feasible: the fallback's case
        # terms both roles price alike: estimate_local's / estimate_remote's operations, all rows
        rem = L - cc
        terms = np.empty((3, X.N))                  # [compute, queue + compute, the price _remote adds]
        comp, qc = terms[0], terms[1]
        np.divide(rem, X.rate, out=comp)
        np.add(X.q, comp, out=qc)                   # queue + compute
        dup0 = None                                 # duplicate penalty per row (0.0, or -0.0, where none)
        if dup_on:
            dup0 = (c.duplicate_penalty * (best_cached - cc)) / X.rate
            dup0 = np.maximum(dup0, 0.0) if c.duplicate_penalty > 0 else np.where(best_cached - cc > 0, dup0, 0.0)
        # the options: [local option of each decode row | remote option of each], so that at equal
        # cost an argmin takes local first, then the lowest decode id (the rows are in id order)
        opt = np.empty(2 * nD)
        mask = np.zeros(2 * nD, bool)
        if local_ok:                                # estimate_local's cost
            ol = opt[:nD]
            np.add(qc[:nD], X.step_n, out=ol)
            ol += X.pen_n * comp[:nD]
            if dup_on:
                ol += dup0[:nD]
            mask[:nD] = kv_l
        p_best = None
        if n_ps:
            groups = self._groups_for(code, memo, len(vals))
            p_add = X.unplaceable_inf[nD:] if p_all else np.where(u[nD:], 0.0, _INF)
            p_best = self._remote(L, cc, terms, dup0, p_add, u, vals_a, kv, best_cached, groups, opt[nD:])
            mask[nD:] = kv
        # TPOT guards: remote from the column; local checked at the winner, the column only if it fails
        slo = c.tpot_slo_s
        guarded = mask.copy()
        guarded[nD:] &= X.tpot_r
        local_guard = local_ok and slo is not None
        while True:
            i = self._pick(opt, guarded)
            if i is None or i >= nD or not local_guard:
                break
            stall = (X.step_n[i] + min(float(rem[i]), c.local_chunk_tokens) / X.rate[i]) * X.busy[i]
            if max(X.step_n1[i], stall) <= slo:
                break
            stall = (X.step_n + np.minimum(rem[:nD], c.local_chunk_tokens) / X.rate[:nD]) * X.busy
            guarded[:nD] &= np.maximum(X.step_n1, stall) <= slo
            local_guard = False
        if i is None and not c.tpot_strict:
            i = self._pick(opt, mask)
        if i is None:
            return None
        return self._placement(prompt_len, t, i, p_best, cc, best_cached, dup_on, kv_ok_count)

    @staticmethod
    def _pick(opt, mask) -> int | None:
        """The lowest-cost masked option's index (the first at equal cost), or None if none is masked."""
        cost = np.where(mask, opt, _INF)
        i = int(cost.argmin())
        if cost[i] != _INF:
            return i
        return int(mask.argmax()) if mask.any() else None     # every masked option costs inf

    def _remote(self, L, cc, terms, dup0, p_add, u, vals_a, kv, best_cached, groups, out) -> np.ndarray:
        """Each decode row's cheapest remote option (choose_scan's): its cost into `out`, and its
        prefill worker (prefill-local row) returned; exact for the KV-feasible rows (kv), which are
        the only ones a pick reads. terms: (3, rows) [compute, queue + compute, free]; p_add: 0.0 for
        a usable prefill row, inf for the others."""
        X = self.cols
        nD = X.nD
        termsP = terms[:, nD:]                      # prefill rows: [compute, queue + compute, addP]
        compP, qcP, addP = termsP
        zP = X.zone[nD:]
        ccP = cc[nD:]
        dupP = dup0[nD:] if dup0 is not None else None
        if dupP is not None:                        # key = s + addP: + duplicate, inf if not usable
            np.add(p_add, dupP, out=addP)
        else:
            addP[:] = p_add
        G, ginv = groups[:2]
        tt, tr_max = self._transfer_figures(L, vals_a, groups)  # (2, G, zones): [seconds / layers, seconds]
        tr = tt[1]

        def price(C):
            """s and key of the (groups x prefill rows C) matrix (x / layers read from tt[0]: the same
            quotients)."""
            compC, qcC, addC = termsP.take(C, axis=1)
            xl, x = tt.take(zP.take(C), axis=2)
            s = qcC + np.maximum(xl, x - compC)     # queue+compute + _exposed
            return s, s + addC                      # + duplicate

        # candidates (module doc): a row's key is at most a + x, so each zone's lowest a bounds each
        # group's lowest key from above (ub); only rows that may be in a window are priced
        ab = np.empty((2, len(qcP)))
        a, b = ab
        np.add(qcP, addP, out=a)
        np.subtract(a, compP, out=b)
        lowest_a = np.minimum.reduceat(a, X.pstarts)          # per zone slice (inf: none usable)
        ub = _MIN(lowest_a + tr.take(X.pzone, axis=1), axis=1)
        # + m, relative to the largest |key| a window can hold (lowest key in [min a, ub])
        ub += 2e-9 * (float(_MAX(np.abs(ub), axis=None)) + abs(float(_MIN(lowest_a))) + tr_max + 1.0)
        # per p zone, the largest a and b a window row can have: [a_max, b_max] (2, zones)
        ab_max = _MAX(ub[:, None] - tt, axis=1)
        cand2 = ab <= ab_max.take(zP, axis=1)
        C = (cand2[0] & cand2[1]).nonzero()[0]
        s, key = price(C)
        gr = np.arange(G)
        i0 = key.argmin(axis=1)
        lo = key[gr, i0]
        win = key <= (lo + 1e-9 * (np.abs(lo) + 1.0))[:, None]
        several = (win.sum(axis=1) > 1).nonzero()[0].tolist() if np.count_nonzero(win) > G else []
        # row 0 of each group's window; groups with several rows are deduplicated, ordered by id
        sv, pv = s[gr, i0], C.take(i0)
        dv = dupP.take(pv) if dupP is not None else np.zeros(G)
        wins: list = [None] * G
        for g in several:
            wins[g] = w = self._window(s[g], key[g], C, dupP, ccP, best_cached)
            sv[g], dv[g], pv[g] = w[0][0], w[0][1] or 0.0, w[0][2]
        over = self.cm.cfg.remote_overhead_s
        step = X.step_n
        np.add(sv.take(ginv), step, out=out)
        out += over
        out += dv.take(ginv)
        best_p = pv.take(ginv)
        for i in range(1, max((len(wins[g]) for g in several), default=1)):
            sv = np.full(G, _INF)
            dv = np.zeros(G)
            pv = np.full(G, -1, np.int64)
            for g in several:
                if i < len(wins[g]):
                    sv[g], dv[g], pv[g] = wins[g][i][0], wins[g][i][1] or 0.0, wins[g][i][2]
            cost = ((sv.take(ginv) + step) + over) + dv.take(ginv)
            better = cost < out                     # rows in prefill id order: a tie keeps the lower id
            out[better] = cost[better]
            best_p[better] = pv.take(ginv)[better]
        if self._measured_links():
            def plain(g: int) -> list:
                return wins[g] if wins[g] is not None else self._window(s[g], key[g], C, dupP, ccP, best_cached)

            self._price_measured(L, cc, termsP, dupP, best_cached, u, kv, groups, plain, out, best_p)
        return best_p

"""The cost model's fleet-scale pricing and pick compiled (numba): one call per decision, bit for bit.

VectorChooser (cost_vector.py) calls decide() once per decision instead of ~80 numpy calls on the
worker columns; it prices the same way with numpy where numba is missing. The functions are
compiled on first use and kept in numba's on-disk cache (cache=True): measured on this host, 3.0 s
CPU to compile (5.2 s wall, shared cores), 0.55 s CPU to import numba and load them in a new
process (warm() does it ahead of the first placement; bench/RESULTS.md).

Same answer, bit for bit: the same IEEE double operations in the same order as cost_vector.py's
numpy code (no fastmath, no reassociation), the same candidate bound, window and tie rules
(cost_vector.py's module doc). Figures are finite (rates > 0), as the cost model's are.

decide(...) -> (status, winner option or -1, KV-feasible local options (0 where local is not allowed), KV-feasible
  decode rows for a remote option, usable prefill rows, best cached)
  status NO_DECODE: no usable decode row (choose answers None); SCAN: no option KV-feasible (the
  fallback's case: CostModel.choose_scan); PRICED: the buffers hold the prices, and with do_pick
  the winner: option i < nD is decode row i's local option, i >= nD decode row i - nD's remote one
  (its prefill-local row in best_p[i - nD]); -1: none passes (None).
Buffers (the caller's, sized by the columns and the groups, written here):
  terms (5, N): [compute, queue + compute, add (prefill rows: duplicate + inf if unusable; the key
  adds it), cached tokens, duplicate penalty (0.0 where none)]; opt, mask, guarded (2 nD): option
  costs, KV-feasible, and TPOT-guarded; kv (nD): each decode row's remote KV verdict; best_p (nD);
  each group g's window (choose_scan's: one entry per distinct (s, duplicate), lowest prefill id
  kept, by prefill id) in entries
  wstart[g]:wstart[g + 1] of ws (s), wdv (the duplicate its cost adds), wpr (prefill-local row);
  rows_buf (nP) scratch.
"""
from __future__ import annotations

import numpy as np
from numba import njit

NO_DECODE, SCAN, PRICED = 0, 1, 2
_INF = np.inf


@njit(cache=True, nogil=True)
def _np_max(a, b):
    """np.maximum's choice for non-NaN a, b: a when a >= b."""
    return a if a >= b else b


@njit(cache=True, nogil=True)
def pick(opt, mask):
    """cost_vector.VectorChooser._pick: the lowest-cost masked option (the first at equal cost),
    else the first masked one (every masked option costs inf), else -1."""
    best, bi, first = _INF, -1, -1
    for j in range(opt.shape[0]):
        if mask[j]:
            if first < 0:
                first = j
            if opt[j] < best:
                best, bi = opt[j], j
    return bi if bi >= 0 else first


@njit(cache=True, nogil=True)
def pick_guarded(opt, mask, guarded, nD, local_guard, slo, strict, chunk, L, cc, rate, step_n, step_n1, busy):
    """The pick under the TPOT guards (cost_vector.VectorChooser.choose's loop): a local winner's
    chunk stall is checked at the winner, every local option's only if it fails."""
    while True:
        i = pick(opt, guarded)
        if i < 0 or i >= nD or not local_guard:
            break
        rem = L - cc[i]
        stall = (step_n[i] + min(rem, chunk) / rate[i]) * busy[i]
        if _np_max(step_n1[i], stall) <= slo:
            break
        for d in range(nD):
            rem = L - cc[d]
            stall = (step_n[d] + min(rem, chunk) / rate[d]) * busy[d]
            guarded[d] = guarded[d] and _np_max(step_n1[d], stall) <= slo
        local_guard = False
    if i < 0 and not strict:
        i = pick(opt, mask)
    return i


@njit(cache=True, nogil=True)
def decide(L, need, nD, u, code, vals, blks, rate, q, zone, step_n, step_n1, pen_n, busy, free_eff, free_cached,
           tpot_r, pstarts, pzone, ginv, tt, tr_max, prank, dup_pen, local_ok, over, slo, local_guard, strict, chunk,
           do_pick, terms, opt, mask, guarded, kv, best_p, wstart, ws, wdv, wpr, rows_buf):
    N = u.shape[0]
    nP = N - nD
    comp, qc, cc, dup0 = terms[0], terms[1], terms[3], terms[4]       # (terms[2]: _remote's)
    # prefix hits: cached tokens per row, the most cached on a usable row
    best_cached = 0.0
    for r in range(N):
        c = vals[code[r]]
        cc[r] = c
        if u[r] and c > best_cached:
            best_cached = c
    # decode verdicts (cost_model.kv_fits): a local option's into mask[d], a remote one's into kv[d]
    n_ud = 0
    n_kl = 0
    n_kv = 0
    for d in range(nD):
        b = need - blks[code[d]]
        if b < 0:
            b = 0
        kl = u[d] and free_eff[d] >= b
        k = u[d] and free_eff[d] >= b + min(blks[code[d]], free_cached[d])
        mask[d] = kl
        kv[d] = k
        n_ud += u[d]
        n_kl += kl
        n_kv += k
    if n_ud == 0:
        return NO_DECODE, -1, 0, 0, 0, best_cached
    n_ps = 0
    for p in range(nD, N):
        n_ps += u[p]
    if not local_ok:
        n_kl = 0
    if n_kl + n_ps * n_kv == 0:
        return SCAN, -1, 0, 0, n_ps, best_cached
    # terms both roles price alike
    dup_on = dup_pen != 0.0 and best_cached != 0.0
    for r in range(N):
        x = (L - cc[r]) / rate[r]
        comp[r] = x
        qc[r] = q[r] + x
        y = 0.0
        if dup_on:
            y = (dup_pen * (best_cached - cc[r])) / rate[r]
            if dup_pen > 0.0:
                y = _np_max(y, 0.0)
            elif not best_cached - cc[r] > 0.0:
                y = 0.0
        dup0[r] = y
    # local options (estimate_local's cost)
    for d in range(nD):
        if local_ok:
            v = qc[d] + step_n[d]
            v = v + pen_n[d] * comp[d]
            if dup_on:
                v = v + dup0[d]
            opt[d] = v
        else:
            opt[d] = _INF
            mask[d] = False
        guarded[d] = mask[d]
    for d in range(nD):
        opt[nD + d] = _INF
        mask[nD + d] = False
        guarded[nD + d] = False
    if n_ps:
        _remote(L, nD, nP, u, zone, step_n, pstarts, pzone, ginv, tt, tr_max, prank, over, dup_on, best_cached,
                terms, opt, best_p, wstart, ws, wdv, wpr, rows_buf)
        for d in range(nD):
            mask[nD + d] = kv[d]
            guarded[nD + d] = kv[d] and tpot_r[d]
    i = -1
    if do_pick:
        i = pick_guarded(opt, mask, guarded, nD, local_guard, slo, strict, chunk, L, cc, rate, step_n, step_n1, busy)
    return PRICED, i, n_kl, n_kv, n_ps, best_cached


@njit(cache=True, nogil=True)
def _remote(L, nD, nP, u, zone, step_n, pstarts, pzone, ginv, tt, tr_max, prank, over, dup_on, best_cached,
            terms, opt, best_p, wstart, ws, wdv, wpr, rows_buf):
    """cost_vector.VectorChooser._remote without the measured links: each decode row's cheapest
    remote option (opt[nD + d], best_p[d]) and each group's window."""
    G, Z = tt.shape[1], tt.shape[2]
    trl, tr = tt[0], tt[1]
    comp, qc, add, cc, dup0 = terms[0], terms[1], terms[2], terms[3], terms[4]
    # key = s + add: + duplicate, inf if not usable; a = queue + compute + add, b = a - compute
    for p in range(nP):
        r = nD + p
        x = 0.0 if u[r] else _INF
        if dup_on:
            x = x + dup0[r]
        add[r] = x
    # each zone slice's lowest a; each group's upper bound ub on its lowest key (+ margin)
    nZ = pstarts.shape[0]
    lowest_a = np.empty(nZ)
    min_low = _INF
    for k in range(nZ):
        hi = pstarts[k + 1] if k + 1 < nZ else nP
        m = _INF
        for p in range(pstarts[k], hi):
            r = nD + p
            a = qc[r] + add[r]
            if a < m:
                m = a
        lowest_a[k] = m
        if m < min_low:
            min_low = m
    ub = np.empty(G)
    max_abs = 0.0
    for g in range(G):
        m = _INF
        for k in range(nZ):
            v = lowest_a[k] + tr[g, pzone[k]]
            if v < m:
                m = v
        ub[g] = m
        if abs(m) > max_abs:
            max_abs = abs(m)
    margin = 2e-9 * (((max_abs + abs(min_low)) + tr_max) + 1.0)
    for g in range(G):
        ub[g] = ub[g] + margin
    # per p zone, the largest a and b a window row can have
    a_max = np.full(Z, -_INF)
    b_max = np.full(Z, -_INF)
    for g in range(G):
        for z in range(Z):
            a_max[z] = _np_max(a_max[z], ub[g] - trl[g, z])
            b_max[z] = _np_max(b_max[z], ub[g] - tr[g, z])
    nC = 0
    for p in range(nP):
        r = nD + p
        a = qc[r] + add[r]
        z = zone[r]
        if a <= a_max[z] and a - comp[r] <= b_max[z]:
            rows_buf[nC] = p
            nC += 1
    # price the candidates per group; each group's window
    s = np.empty(nC)
    key = np.empty(nC)
    nw = 0
    for g in range(G):
        wstart[g] = nw
        lo = _INF
        for j in range(nC):
            r = nD + rows_buf[j]
            z = zone[r]
            sv = qc[r] + _np_max(trl[g, z], tr[g, z] - comp[r])
            s[j] = sv
            kk = sv + add[r]
            key[j] = kk
            if kk < lo:
                lo = kk
        lim = lo + 1e-9 * (abs(lo) + 1.0)
        first = nw
        for j in range(nC):
            if key[j] <= lim:
                p = rows_buf[j]
                has = dup_on and best_cached - cc[nD + p] > 0.0
                e = first
                while e < nw:           # one entry per distinct (s, duplicate or none): fewer where rows tie
                    q_ = nD + wpr[e]
                    if ws[e] == s[j] and (dup_on and best_cached - cc[q_] > 0.0) == has and (
                            not has or dup0[q_] == dup0[nD + p]):
                        break
                    e += 1
                if e < nw:
                    if prank[p] < prank[wpr[e]]:
                        wpr[e] = p
                else:
                    ws[nw], wdv[nw], wpr[nw] = s[j], dup0[nD + p], p
                    nw += 1
        for e in range(first + 1, nw):  # by prefill id
            sv, dv, p = ws[e], wdv[e], wpr[e]
            f = e
            while f > first and prank[wpr[f - 1]] > prank[p]:
                ws[f], wdv[f], wpr[f] = ws[f - 1], wdv[f - 1], wpr[f - 1]
                f -= 1
            ws[f], wdv[f], wpr[f] = sv, dv, p
    wstart[G] = nw
    # each decode row's cheapest entry of its group's window (a tie keeps the lower prefill id)
    for d in range(nD):
        g = ginv[d]
        st = step_n[d]
        best, bp = _INF, -1
        for e in range(wstart[g], wstart[g + 1]):
            cost = ((ws[e] + st) + over) + wdv[e]
            if bp < 0 or cost < best:
                best, bp = cost, wpr[e]
        opt[nD + d] = best
        best_p[d] = bp


def warm() -> None:
    """Compile decide (and what it calls), or load it from numba's cache: one decision on one
    decode row and one prefill row."""
    f, i, b = np.ones(2), np.zeros(2, np.int64), np.ones(2, bool)
    decide(16.0, 2, 1, b, i, np.zeros(1), np.zeros(1, np.int64), f, f, i, f[:1], f[:1], f[:1], f[:1], i[:1], i[:1], b[:1],
           i[:1], i[:1], i[:1], np.zeros((2, 1, 1)), 0.0, i[:1], 0.0, True, 0.0, 0.0, False, False, 512.0, True,
           np.zeros((5, 2)), f.copy(), b.copy(), b.copy(), b[:1].copy(), i[:1].copy(), np.zeros(2, np.int64),
           np.zeros(1), np.zeros(1), np.zeros(1, np.int64), np.zeros(1, np.int64))

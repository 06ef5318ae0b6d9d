"""n-gram drafting ("prompt lookup"): the tokens that followed the latest earlier occurrence of the
sequence's last n tokens. Pure numpy; no model.

For n from n_max down to n_min: find the latest start j < len - n with seq[j:j+n] == seq[-n:];
the draft is seq[j+n : j+n+k] (at least one token, since j + n < len). Longest n first: a longer
match predicts the continuation better.
"""
from __future__ import annotations

import numpy as np


def propose(tokens: list[int] | np.ndarray, k: int, n_max: int = 4, n_min: int = 2,
            window: int = 4096) -> list[int]:
    """Up to k draft tokens for `tokens` (prompt + outputs so far); [] when nothing matches.
    Only the last `window` tokens are searched (bounded cost per step on long contexts)."""
    if k <= 0:
        return []
    seq = np.asarray(tokens[-window:], dtype=np.int64)
    L = len(seq)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        tail = seq[L - n:]
        # windows starting at 0 .. L-n-1 (every earlier start; the tail itself excluded)
        win = np.lib.stride_tricks.sliding_window_view(seq[:L - 1], n)
        hit = np.flatnonzero((win == tail).all(axis=1))
        if hit.size:
            j = int(hit[-1]) + n
            return seq[j:j + k].tolist()
    return []

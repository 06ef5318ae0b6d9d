"""The greedy token of a float32 LM head, screened through an int8 copy of it (kernels/greedy_head.cpp).

    w      float32 [V, E]   the head (SmolLM2: the tied embedding, 49,152 x 576)
    q      int8    [V, E]   round(w / scale) per row, scale = |w[v]|_max / 127
    slack  float32 [V]      see below
    h      float32 [N, E]   -> int64 [N]: argmax over v of the float32 score h . w[v]

A greedy row needs only the argmax, and reading all of w costs ~9 ms a step on one core. The screen reads q
(a quarter of the bytes) and bounds every real logit L[v] = h . w[v]:
  - approx[v] = scale[v] * fl(h . q[v]) is within |h|_1 * err[v] of L[v] from the rounding of w
    (err[v] = max_i |w[v, i] - scale[v] q[v, i]|), plus its own float error, at most gamma |h|_1 |w[v]|_max
    (|q| <= 127, so scale[v] * sum |h_i q_i| <= |h|_1 |w[v]|_max; gamma = gamma_{E+2} = n u / (1 - n u), u = 2^-24:
    Higham's bound for a float32 dot of E terms and the scaling);
  - the float32 score S[v] (what the full head computes, up to summation order) is within gamma |h|_1 |w[v]|_max
    of L[v].
So with b[v] = |h|_1 slack[v], slack[v] = err[v] + 2 gamma |w[v]|_max (rounded up), every S[v] lies in
approx[v] +- b[v], and the v* with the largest S has approx[v*] + b[v*] >= approx[u] - b[u] for every u: the
candidates {v : approx[v] + b[v] >= max_u(approx[u] - b[u])} hold it. Only they are scored in float32 (1-5 rows
in a typical step, at most ~75 seen on SmolLM2's outputs). The answer is the float32 argmax itself, not an
approximation: it may differ from the full head's only where two scores are equal to within float32 rounding,
where the summation order decides either way.

Built only for a finite w (a NaN weight would make q meaningless); a non-finite h row answers -1 and the caller
takes the full logits, where clean_logits handles it.
"""
from __future__ import annotations

import torch

from pdcluster.engine import hugepages

QMAX = 127
CHUNK_ROWS = 4096               # head rows quantized at a time (load-time memory)
# Past MAX_ROWS rows a step takes the full head: the screen's int8 dot products grow with the rows, the full head's
# read does not (1 thread: 2.14x at 16 rows, 1.28x at 32, 1.06x at 48, 0.81x at 64; bench/RESULTS.md, "Greedy tokens
# through an int8 screen").
MAX_ROWS = 32
_U = 2.0 ** -24                 # float32 unit roundoff


def gamma(n: int) -> float:
    """Higham's gamma_n for float32: a dot of n terms is within gamma_n * sum |a_i b_i| of the real one."""
    return n * _U / (1 - n * _U)


def quantize_head(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w float32 [V, E] (finite) -> (q int8 [V, E] in huge pages, scale float32 [V], slack float32 [V]).
    CHUNK_ROWS rows at a time, so the float64 error check holds ~CHUNK_ROWS * E * 24 bytes at once, not w's
    size several times over."""
    if w.dtype != torch.float32 or w.dim() != 2:
        raise ValueError(f"greedy_head: w must be float32 [V, E], got {w.dtype} {tuple(w.shape)}")
    V, E = w.shape
    q = hugepages.empty((V, E), torch.int8)              # read every greedy step (engine/hugepages.py)
    scale, slack = torch.empty(V), torch.empty(V)
    g = 2 * gamma(E + 2)
    for a in range(0, V, CHUNK_ROWS):
        c = w[a:a + CHUNK_ROWS]
        if not bool(torch.isfinite(c).all()):
            raise ValueError("greedy_head: w has non-finite entries")
        amax = c.abs().amax(1)
        s = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
        qc = torch.round(c / s[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        qd, sd = qc.double(), s.double()
        err = (c.double() - qd * sd[:, None]).abs().amax(1)
        # |q| * scale may pass amax by a rounding: take the larger as |w[v]|_max's stand-in
        wmax = torch.maximum(amax.double(), qd.abs().amax(1) * sd)
        q[a:a + len(c)] = qc
        scale[a:a + len(c)] = s
        slack[a:a + len(c)] = ((err + g * wmax) * (1 + 2.0 ** -10)).float()
    return q, scale, slack


def candidates_ref(h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """bool [N, V]: the v the screen keeps for each row (the argmax of the float32 scores is among them)."""
    approx = (h.double() @ q.double().T) * scale.double()
    b = h.double().abs().sum(1, keepdim=True) * slack.double()
    return approx + b >= (approx - b).amax(1, keepdim=True)


def greedy_head_ref(h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, slack: torch.Tensor,
                    w: torch.Tensor) -> torch.Tensor:
    """The screen in torch: int64 [N], per row the first v of the largest float32 h . w[v] among the candidates."""
    keep = candidates_ref(h, q, scale, slack)
    scores = torch.where(keep, h @ w.T, torch.full((), float("-inf")))
    return scores.max(1).indices


def greedy_head_cpu(h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, slack: torch.Tensor,
                    w: torch.Tensor) -> torch.Tensor:
    """pdcluster::greedy_head (greedy_head.cpp, built by engine/cpu_ext.py): int64 [N], -1 for a non-finite row."""
    return torch.ops.pdcluster.greedy_head(h, q, scale, slack, w)


class GreedyHead:
    """A float32 head's greedy screen: `tokens(h)` -> int64 [N] (-1: take the full logits for that row)."""

    __slots__ = ("w", "q", "scale", "slack")

    def __init__(self, w: torch.Tensor):
        self.w = w.contiguous()
        self.q, self.scale, self.slack = quantize_head(self.w)

    @property
    def nbytes(self) -> int:
        """Bytes held beside w: the int8 copy and its two per-row vectors."""
        return self.q.numel() + 4 * (self.scale.numel() + self.slack.numel())

    def tokens(self, h: torch.Tensor) -> torch.Tensor:
        return greedy_head_cpu(h.contiguous(), self.q, self.scale, self.slack, self.w)

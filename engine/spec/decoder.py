"""Per-request speculation policy: who drafts, how many tokens, and what acceptance says. Pure Python.

Adaptive draft length. Each request keeps a decayed count of draft tokens accepted and examined
(a step that accepts a of k examines a + 1 tokens when it stops at a rejection, a when all stand);
alpha = accepted / examined estimates the chance the next draft token is accepted. The j-th draft
token is worth proposing while alpha^j (the chance it is reached and accepted) is at least
min_gain, so k = the largest j <= k_max with alpha^j >= min_gain, and 0 once alpha < min_gain.
A request not drafting gains `recover` pseudo-acceptances per step, so it probes again later (its
text may turn repetitive). A step whose n-gram lookup finds nothing drafts nothing and learns nothing.

Batch-level: drafts are handed out (in running order) only while the step has fewer than
max_step_tokens rows (one per running request plus the drafts so far). A decode step is
memory-bound (it reads every weight once, whatever its row count) only up to some row count; past
it the step is compute-bound and a drafted row costs what its token would cost in a step of its
own, so speculation cannot pay there. On this repository's 2-core CPU host in float32, compute
(~60-165 GFLOP/s) matches the weight reads (~10-30 GB/s) at ~11 rows; a GPU's ridge is far higher
(raise spec_max_step_tokens there).

Who may draft (`eligible`): a request without penalties (they depend on every earlier output, the
drafts' included), grammar (its matcher would have to follow, then roll back, each draft), logprobs
(not computed on verification rows) or seed (a seeded stream stays the exact one it draws without
speculation, whatever else runs). Those decode one token per step as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdcluster.engine.request import Request
from pdcluster.engine.spec.ngram import propose


@dataclass
class _Accept:
    accepted: float = 2.0           # decayed counts; prior alpha = 2/3
    examined: float = 3.0

    @property
    def alpha(self) -> float:
        return self.accepted / self.examined


@dataclass
class SpecStats:
    """Totals over the engine's life (bench and metrics)."""
    steps: int = 0                  # verification runs (a request's step with drafts)
    proposed: int = 0               # draft tokens scheduled
    accepted: int = 0               # draft tokens accepted

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass
class SpecDecoder:
    k_max: int = 4                  # most draft tokens per request per step
    n_max: int = 4                  # longest n-gram matched
    n_min: int = 2                  # shortest
    min_gain: float = 0.25          # propose the j-th token while alpha^j >= this
    max_step_tokens: int = 16       # drafts only while a step has fewer rows (its requests + drafts)
    decay: float = 0.7              # weight of the past in the acceptance counts, per verification
    recover: float = 0.02           # pseudo-acceptances per step while not drafting
    stats: SpecStats = field(default_factory=SpecStats)
    _state: dict[str, _Accept] = field(default_factory=dict)

    @staticmethod
    def eligible(req: Request) -> bool:
        p = req.params
        return (not p.has_penalties and not p.shapes_logits and p.structured is None and p.logprobs is None
                and (p.seed is None or p.greedy))

    def num_drafts(self, request_id: str) -> int:
        """k for the request's next step (adaptive, above)."""
        a = self._state.setdefault(request_id, _Accept()).alpha
        if a >= 1.0:
            return self.k_max
        if a < self.min_gain:
            return 0
        return min(self.k_max, int(math.log(self.min_gain) / math.log(a) + 1e-9)) if a > 0 else 0

    def drafts(self, req: Request, limit: int) -> list[int]:
        """Draft tokens for req's next step, at most `limit` (what the step budget, max_tokens and
        the context length leave). [] for an ineligible request or when nothing matches."""
        if limit <= 0 or not self.eligible(req):
            return []
        k = min(self.num_drafts(req.request_id), limit)
        if k == 0:
            st = self._state[req.request_id]
            st.accepted = min(st.accepted + self.recover, st.examined)
            return []
        return propose(req.token_ids, k, self.n_max, self.n_min)

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """A verification: num_accepted of num_drafts draft tokens stood."""
        st = self._state.setdefault(request_id, _Accept())
        examined = num_accepted + (num_accepted < num_drafts)
        st.accepted = self.decay * st.accepted + num_accepted
        st.examined = self.decay * st.examined + examined
        self.stats.steps += 1
        self.stats.proposed += num_drafts
        self.stats.accepted += num_accepted

    def release(self, request_id: str) -> None:
        self._state.pop(request_id, None)

"""MultiConnector: a worker's cache tiers beside its transfer connector, as the engine's one connector.

    engine --> MultiConnector --> TierConnector     (loads from host/disk, keeps evicted blocks)
                              \\--> inner           (ReceiveConnector, SendConnector, or none)

external_tokens asks both: the tiers (this worker's host / disk hits) and the inner connector (a peer
pull's blocks, kv_transfer/pull.py; the other transfer connectors offer none). One source supplies a
request's external tokens: the inner one when it offers more, the tiers otherwise (a local copy
beats a pull of the same blocks). step_tokens asks the tiers. after_alloc goes to whichever said it
would supply the tokens, the inner connector otherwise: a remote prefill's reservation
(reserve_remote) gives its first blocks to the tiers when step_tokens offered them, the rest to the
inner one. Every other hook goes to both; wait_loaded waits for both, take_loaded asks
the inner one and the tiers (a reservation's host-tier blocks may have failed to load).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pdcluster.engine.kv_connector import KVConnector

if TYPE_CHECKING:
    from pdcluster.kv_transfer.tiers.connector import TierConnector


class MultiConnector(KVConnector):
    def __init__(self, tiers: TierConnector, inner: KVConnector):
        self.tiers, self.inner = tiers, inner
        self.saves = inner.saves or tiers.saves
        self.loads = inner.loads or tiers.loads
        self._from_tiers: set[str] = set()      # ids whose external tokens the tiers promised
        self._tier_load: str | None = None      # the id after_alloc last gave the tiers (load_in_step asks next)

    # scheduler side
    def external_tokens(self, request, num_local_tokens: int) -> int:
        n = self.tiers.external_tokens(request, num_local_tokens)
        pulled = self.inner.external_tokens(request, num_local_tokens)   # a pull plan's (its range is kept
        if pulled > n:                                                   # until after_alloc or request_finished)
            self._from_tiers.discard(request.request_id)
            return pulled
        if n > 0:
            self._from_tiers.add(request.request_id)
        else:
            self._from_tiers.discard(request.request_id)
        return n

    def step_tokens(self, request, num_local_tokens: int) -> int:
        n = self.tiers.step_tokens(request, num_local_tokens)
        if n > 0:
            self._from_tiers.add(request.request_id)
        return n

    def after_alloc(self, request, block_ids: list[int], num_external_tokens: int) -> None:
        if request.request_id in self._from_tiers:
            self._from_tiers.discard(request.request_id)
            self._tier_load = request.request_id
            self.tiers.after_alloc(request, block_ids, num_external_tokens)
        else:
            self._tier_load = None
            self.inner.after_alloc(request, block_ids, num_external_tokens)

    def load_in_step(self, request) -> bool:
        src = self.tiers if request.request_id == self._tier_load else self.inner
        self._tier_load = None
        return src.load_in_step(request)

    def request_finished(self, request_id: str, block_ids: list[int]) -> bool:
        self._from_tiers.discard(request_id)
        held = self.tiers.request_finished(request_id, block_ids)
        return self.inner.request_finished(request_id, block_ids) or held

    def finished_loading(self) -> list[tuple[str, bool]]:
        return self.tiers.finished_loading() + self.inner.finished_loading()

    def failed_in_step(self) -> list[str]:
        return self.tiers.failed_in_step() + self.inner.failed_in_step()

    def finished_sending(self) -> list[str]:
        return self.tiers.finished_sending() + self.inner.finished_sending()

    def evicted(self, block_ids: list[int], hashes: list[int]) -> None:
        self.tiers.evicted(block_ids, hashes)
        self.inner.evicted(block_ids, hashes)

    def computed(self, block_ids: list[int], hashes: list[int]) -> None:
        self.tiers.computed(block_ids, hashes)
        self.inner.computed(block_ids, hashes)

    # worker side
    def register_caches(self, k_caches, v_caches) -> None:
        self.tiers.register_caches(k_caches, v_caches)
        try:
            self.inner.register_caches(k_caches, v_caches)
        except BaseException:       # the tiers' threads and disk directory are nobody's to close otherwise
            self.tiers.close()
            raise

    def wait_layer(self, layer: int) -> None:
        if self.tiers.loads:
            self.tiers.wait_layer(layer)
        if self.inner.loads:
            self.inner.wait_layer(layer)

    def save_layer(self, layer, k_caches, v_caches, completing) -> None:
        if self.inner.saves:
            self.inner.save_layer(layer, k_caches, v_caches, completing)
        if self.tiers.saves:
            self.tiers.save_layer(layer, k_caches, v_caches, completing)

    def wait_loaded(self, request_id: str, timeout_s: float) -> None:
        """Both loads, within one timeout_s."""
        deadline = time.monotonic() + timeout_s
        self.tiers.wait_loaded(request_id, timeout_s)      # a reservation's blocks from a tier, if any
        self.inner.wait_loaded(request_id, max(0.0, deadline - time.monotonic()))

    def take_loaded(self, request_id: str) -> str | None:
        tiers = self.tiers.reservation_failed(request_id)  # a TierConnector
        inner = self.inner.take_loaded(request_id)        # asked either way: it forgets the request
        return tiers or inner

    def request_aborted(self, request_id: str) -> None:
        self.tiers.request_aborted(request_id)
        self.inner.request_aborted(request_id)

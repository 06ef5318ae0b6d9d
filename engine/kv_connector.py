"""The seam between the engine and KV transfer, after vLLM v1's KV connector.

An engine holds one KVConnector and calls it on the engine thread only (wait_loaded aside). A
connector is handed request ids, block ids and the per-layer cache tensors, never the scheduler,
the block pool or the runner: what lies outside engine/ reaches the engine through this and
LLMEngine's public methods alone.

Save side (a prefill worker):
  save_layer(layer, k_caches, v_caches, completing)  after each layer of a step: `completing` names
      the prompts whose last chunk is in this step, with their block ids; layer `layer` of their KV
      is in the cache now (the rest of the step still computes).
Load side (a decode worker):
  start_load(request_id, block_ids, k_caches, v_caches)  the scheduler reserved these blocks for a
      prompt whose KV comes from outside (the request waits in WAITING_FOR_REMOTE_KV);
  wait_loaded(request_id, timeout_s)  blocks (any thread) until that KV is in or failed;
  take_loaded(request_id) -> None, or why the KV is not all there; forgets the request.
Either side:
  request_aborted(request_id)  the request ended early: stop moving its KV, fence late bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # annotations only: the scheduler imports this module and stays torch-free
    import torch


class NoKVCapacity(Exception):
    """Not enough free KV blocks to reserve a prompt's KV right now (LLMEngine.reserve_remote; a
    router places the request elsewhere)."""


@dataclass(frozen=True)
class CompletingPrompt:
    request_id: str
    block_ids: tuple[int, ...]      # the request's blocks in order, the whole prompt's


class KVConnector:
    """No transfer: the engine computes every token itself (the offline engine, local prefill)."""

    saves = False                   # save_layer wanted (the engine skips the per-step bookkeeping if not)

    def save_layer(self, layer: int, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                   completing: list[CompletingPrompt]) -> None:
        pass

    def start_load(self, request_id: str, block_ids: list[int], k_caches: list[torch.Tensor],
                   v_caches: list[torch.Tensor]) -> None:
        raise NotImplementedError("this engine's connector receives no KV from outside")

    def wait_loaded(self, request_id: str, timeout_s: float) -> None:
        pass

    def take_loaded(self, request_id: str) -> str | None:
        return "this engine's connector receives no KV from outside"

    def request_aborted(self, request_id: str) -> None:
        pass

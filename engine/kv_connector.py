"""The seam between the engine and KV transfer, after vLLM v1's KV connector.

An engine holds one KVConnector and calls it on the engine thread only (wait_loaded aside). A
connector is handed requests, block ids and the per-layer cache tensors, never the scheduler, the
block pool or the runner: what lies outside engine/ reaches the engine through this and LLMEngine's
public methods alone.

Scheduler side (pure Python, asked while the scheduler admits and finishes requests):
  external_tokens(request, num_local_tokens)  prompt tokens past the local prefix hits that this
      connector can supply (another cache tier, a peer); the scheduler allocates blocks for them and
      parks the request in WAITING_FOR_REMOTE_KV until finished_loading names it;
  after_alloc(request, block_ids, num_external_tokens)  those blocks are the request's now: start
      filling them (a remote prefill's reservation takes this path too, with every prompt token
      external);
  step_tokens(request, num_local_tokens)  as external_tokens, but only tokens it can load inside a
      step (load_in_step): a remote prefill's reservation (add_remote) takes those from here and
      has the prefill worker send only the rest;
  load_in_step(request) -> bool  asked right after after_alloc: True when those tokens load inside
      the request's next forward pass, layer by layer (wait_layer), so the scheduler counts them as
      computed at once and runs the request's tail in this very step, overlapped with the load (vLLM
      v1's load_async=False). It is never named by finished_loading; if it fails (a source turned out
      corrupt), failed_in_step names the request before wait_layer lets a step past the missing
      layer. False: the request waits for finished_loading;
  failed_in_step() -> request ids  in-step loads that failed since last asked: their blocks lack
      KV from some layer on. The engine asks before scheduling and after each forward pass (before
      sampling): such a request's results of that step are dropped, its blocks freed (none was
      published) and its prompt recomputed (vLLM v1's recompute policy for KV load errors);
  request_finished(request_id, block_ids) -> hold  True keeps the blocks allocated after the request
      ends, because the connector still reads them; finished_sending later names the ids to free;
  finished_loading() / finished_sending()  polled once per engine step.
  evicted(block_ids, hashes)  cached blocks the pool is handing out again, before this step's
      forward pass overwrites them: a lower cache tier copies their KV out here (kv_transfer/tiers/);
      it runs on the step's path, so it copies and returns (the writing happens elsewhere).
  computed(block_ids, hashes)  blocks just published to the prefix cache (full, computed, hashed;
      once per request and step): a tier that writes through copies them out here, so they
      outlive a crash even if never evicted (kv_transfer/tiers/ write_through). Same rules as evicted.
Worker side (the per-layer caches are float tensors [num_blocks, block_size, kv_heads, head_dim], or
engine/kv_quant.QuantKV, codes + scales, when the engine's kv_cache_dtype is int8 / fp8):
  register_caches(k_caches, v_caches)  once, when the engine takes the connector;
  wait_layer(layer)  before each layer of a step (if `loads`): returns once layer `layer` of every
      load that load_in_step accepted so far is in the cache (vLLM v1's wait_for_layer_load);
  save_layer(layer, k_caches, v_caches, completing)  after each layer of a step: `completing` names
      the prompts whose last chunk is in this step, with their block ids; layer `layer` of their KV
      is in the cache now (the rest of the step still computes);
  wait_loaded(request_id, timeout_s)  blocks (any thread) until a remote prefill's KV is in or failed
      (and its blocks loaded in step from a cache tier, if any);
  take_loaded(request_id) -> None, or why the KV is not all there; forgets the request;
  request_aborted(request_id)  the request ended early: stop moving its KV, fence late bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # annotations only: the scheduler imports this module and stays torch-free
    import torch

    from pdcluster.engine.request import Request


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
    loads = False                   # wait_layer wanted (loads inside the step: load_in_step may say True)

    # scheduler side
    def external_tokens(self, request: Request, num_local_tokens: int) -> int:
        """Tokens after the first num_local_tokens this connector can load; < the prompt's length
        minus num_local_tokens (the last prompt token is always computed here, for its logits)."""
        return 0

    def after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        """block_ids (in order) receive the request's next num_external_tokens tokens from outside.
        An exception undoes the allocation."""
        if num_external_tokens:
            raise NotImplementedError("this engine's connector receives no KV from outside")

    def step_tokens(self, request: Request, num_local_tokens: int) -> int:
        return 0

    def load_in_step(self, request: Request) -> bool:
        return False

    def request_finished(self, request_id: str, block_ids: list[int]) -> bool:
        return False

    def finished_loading(self) -> list[tuple[str, bool]]:
        """(request id, its KV is all in) for the loads external_tokens started that ended."""
        return []

    def failed_in_step(self) -> list[str]:
        return []

    def finished_sending(self) -> list[str]:
        """Ids whose blocks request_finished held and that may be freed now."""
        return []

    def evicted(self, block_ids: list[int], hashes: list[int]) -> None:
        """Cached blocks block_ids (chain hashes `hashes`) leave the prefix cache; their KV is intact
        until this step's forward pass runs."""

    def computed(self, block_ids: list[int], hashes: list[int]) -> None:
        """Blocks block_ids entered the prefix cache under chain hashes `hashes` (their KV is final)."""

    # worker side
    def register_caches(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        pass

    def wait_layer(self, layer: int) -> None:
        pass

    def save_layer(self, layer: int, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                   completing: list[CompletingPrompt]) -> None:
        pass

    def wait_loaded(self, request_id: str, timeout_s: float) -> None:
        pass

    def take_loaded(self, request_id: str) -> str | None:
        return "this engine's connector receives no KV from outside"

    def request_aborted(self, request_id: str) -> None:
        pass

"""The engine's KV connectors (engine/kv_connector.py) over this package's transports.

ReceiveConnector (decode side): the blocks the scheduler reserves for a remote prefill are handed to
    the KVReceiver that every KV server of the worker feeds; the transfer's state decides whether the
    request may run.
SendConnector (prefill side): after each layer, the prompts completing in this step that have a
    destination get that layer of their blocks (those the decode worker lacks) handed to their
    LayerwiseSender, which streams it while the next layer computes; whole-request mode hands over
    every layer after the last one instead. A quantized cache (QuantKV) ships its blocks dequantized
    to the model's dtype: the transfer's codec then encodes them (int8 over an int8 cache gives back
    the same codes wherever a block's largest code is +-127, i.e. its scale was set by one write).
"""
from __future__ import annotations

import torch

from pdcluster.engine.kv_connector import CompletingPrompt, KVConnector
from pdcluster.engine.kv_quant import QuantKV
from pdcluster.kv_transfer.receiver import KVReceiver, PendingTransfer, TransferState, cache_writer
from pdcluster.kv_transfer.transport import LayerwiseSender


class ReceiveConnector(KVConnector):
    def __init__(self, receiver: KVReceiver, num_layers: int):
        self.receiver, self.num_layers = receiver, num_layers
        self._pending: dict[str, PendingTransfer] = {}       # engine thread writes; wait_loaded reads
        self._write = None                                   # into the engine's caches, once registered

    def register_caches(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        self._write = cache_writer(k_caches, v_caches)

    def after_alloc(self, request, block_ids: list[int], num_external_tokens: int) -> None:
        """A remote prefill's reservation: the KVReceiver expects its blocks from now on."""
        rid = request.request_id
        self._pending[rid] = self.receiver.expect(rid, block_ids, self.num_layers, self._write)

    def transfer(self, request_id: str) -> PendingTransfer | None:
        """The transfer filling request_id's reservation (its state, bytes so far), if one is expected."""
        return self._pending.get(request_id)

    def wait_loaded(self, request_id: str, timeout_s: float) -> None:
        p = self._pending.get(request_id)
        if p is not None:
            p.wait(max(0.0, timeout_s))

    def take_loaded(self, request_id: str) -> str | None:
        p = self._pending.pop(request_id, None)
        if p is None:
            return "no transfer expected"
        if p.state is not TransferState.COMPLETE:
            self.receiver.abort(request_id)
            return p.state.value
        return None

    def request_aborted(self, request_id: str) -> None:
        self.receiver.abort(request_id)          # fences the id: late frames are dropped
        self._pending.pop(request_id, None)


class SendConnector(KVConnector):
    saves = True

    def __init__(self, layerwise: bool = True):
        self.layerwise = layerwise
        self.sends: dict[str, tuple[LayerwiseSender, int, str]] = {}   # rid -> (sender, skip_blocks, codec)
        self._shipping: list[tuple[LayerwiseSender, torch.Tensor]] = []   # this step's, set at layer 0

    def add(self, request_id: str, sender: LayerwiseSender, skip_blocks: int, codec: str) -> None:
        self.sends[request_id] = (sender, skip_blocks, codec)

    def pop(self, request_id: str) -> tuple[LayerwiseSender, int, str] | None:
        return self.sends.pop(request_id, None)

    def save_layer(self, layer: int, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                   completing: list[CompletingPrompt]) -> None:
        if layer == 0:   # which prompts ship this step, and their source blocks: once per step
            dev = k_caches[0].device
            self._shipping = [(e[0], torch.tensor(p.block_ids[e[1]:], dtype=torch.int64, device=dev))
                              for p in completing if (e := self.sends.get(p.request_id)) is not None]
        if self.layerwise:
            layers = (layer,)
        else:
            layers = range(len(k_caches)) if layer == len(k_caches) - 1 else ()
        for sender, ids in self._shipping:
            for li in layers:
                sender.send_layer(li, _blocks(k_caches[li], ids), _blocks(v_caches[li], ids))

    def request_aborted(self, request_id: str) -> None:
        entry = self.sends.pop(request_id, None)
        if entry:
            entry[0].abort()


def _blocks(cache, ids: torch.Tensor) -> torch.Tensor:
    """Blocks `ids` of a layer's cache as float CPU blocks (a quantized cache's dequantized)."""
    return (cache.dequant(ids) if isinstance(cache, QuantKV) else cache.index_select(0, ids)).cpu()

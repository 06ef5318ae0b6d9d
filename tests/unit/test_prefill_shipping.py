"""The prefill worker's layer hook: layer-wise streaming hands each layer to the sender as it is
computed; whole-request mode (kv_layerwise=False) hands every layer over after the last one."""
from types import SimpleNamespace

import pytest
import torch

from pdcluster.prefill_worker.worker import PrefillWorker

LAYERS, BLOCKS = 4, 6


class Sender:
    def __init__(self):
        self.sent = []                     # (layer, number of blocks, hook layer when sent)
        self.at = None

    def send_layer(self, layer, k, v):
        self.sent.append((layer, k.shape[0], self.at))


def fake_worker(layerwise: bool, sender: Sender):
    caches = [torch.zeros(BLOCKS, 16, 1, 2) for _ in range(LAYERS)]
    runner = SimpleNamespace(k_caches=caches, v_caches=caches)
    return SimpleNamespace(engine=SimpleNamespace(runner=runner), kv_layerwise=layerwise, _shipping=[],
                           _sends={"r": (sender, 1)})       # the decode worker holds the first block


def run_step(w, sender):
    req = SimpleNamespace(request_id="r", block_ids=[0, 1, 2, 3])
    batch = SimpleNamespace(reqs=[req], samples=lambda i: True)     # the step completes the prompt
    for layer in range(LAYERS):
        sender.at = layer
        PrefillWorker._on_layer(w, layer, batch)


@pytest.mark.parametrize("layerwise", [True, False])
def test_each_layer_once_layerwise_as_computed_whole_request_at_the_end(layerwise):
    s = Sender()
    run_step(fake_worker(layerwise, s), s)
    assert [layer for layer, _, _ in s.sent] == list(range(LAYERS))
    assert all(n == 3 for _, n, _ in s.sent)                    # blocks 1..3: the skipped one is not sent
    when = [at for _, _, at in s.sent]
    assert when == (list(range(LAYERS)) if layerwise else [LAYERS - 1] * LAYERS)

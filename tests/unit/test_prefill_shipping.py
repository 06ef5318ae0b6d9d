"""The prefill side's KV connector (kv_transfer/connectors.py SendConnector): layer-wise streaming
hands each layer to the sender as it is computed; whole-request mode (kv_layerwise=False) hands
every layer over after the last one; only the blocks the decode worker lacks, only for prompts that
complete in the step and have a destination."""
import pytest
import torch

from pdcluster.engine.kv_connector import CompletingPrompt
from pdcluster.kv_transfer.connectors import SendConnector

LAYERS, BLOCKS = 4, 6


class Sender:
    def __init__(self):
        self.sent = []                     # (layer, number of blocks, hook layer when sent)
        self.at = None
        self.aborted = False

    def send_layer(self, layer, k, v):
        self.sent.append((layer, k.shape[0], self.at))

    def abort(self):
        self.aborted = True


def run_step(c: SendConnector, sender: Sender, completing):
    caches = [torch.zeros(BLOCKS, 16, 1, 2) for _ in range(LAYERS)]
    for layer in range(LAYERS):
        sender.at = layer
        c.save_layer(layer, caches, caches, completing)


@pytest.mark.parametrize("layerwise", [True, False])
def test_each_layer_once_layerwise_as_computed_whole_request_at_the_end(layerwise):
    s, c = Sender(), SendConnector(layerwise)
    c.add("r", s, 1, "none")                                    # the decode worker holds the first block
    run_step(c, s, [CompletingPrompt("r", (0, 1, 2, 3)), CompletingPrompt("local", (4, 5))])
    assert [layer for layer, _, _ in s.sent] == list(range(LAYERS))
    assert all(n == 3 for _, n, _ in s.sent)                    # blocks 1..3: the skipped one is not sent
    when = [at for _, _, at in s.sent]
    assert when == (list(range(LAYERS)) if layerwise else [LAYERS - 1] * LAYERS)


def test_a_prompt_not_completing_ships_nothing_and_abort_stops_its_sender():
    s, c = Sender(), SendConnector()
    c.add("r", s, 0, "none")
    run_step(c, s, [])                                          # a middle chunk: nothing to ship yet
    assert s.sent == [] and not s.aborted
    c.request_aborted("r")
    assert s.aborted and c.pop("r") is None

"""How a prefill worker opens a request's KV send. Its "auto" compression prices a transfer in the
bytes the sender ships uncompressed: a quantized (int8) pool's blocks go out dequantized to the
model's dtype, 4x the pool's bytes for a float32 model. Before, it was priced in the pool's bytes,
and a link too slow for the real bytes was judged fast enough to send them uncompressed. A send
its transport cannot open leaves no request behind. The embedded model, a real PrefillWorker, no Ray."""
import time

import pytest
import torch

from pdcluster.engine.llm_engine import LLMEngine, build_config
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.kv_transfer.connectors import _blocks
from pdcluster.messages import KVDestination
from pdcluster.prefill_worker.worker import PrefillWorker

pytestmark = pytest.mark.timeout(120)


def test_auto_compression_prices_the_bytes_the_wire_carries():
    eng = LLMEngine(build_config(kv_cache_memory=8 * 2**20, num_threads=1, kv_cache_dtype="int8"))
    shipped = _blocks(eng.runner.k_caches[0], torch.tensor([0]))        # what the sender sends of one block
    wire_block = 2 * shipped.numel() * shipped.element_size() * eng.cfg.model.num_layers
    assert wire_block == eng.kv_block_model_bytes() > 3 * eng.kv_block_bytes()
    p = PrefillWorker("p", eng, transport="tcp", kv_compression="auto")
    try:
        n = 20
        dest = KVDestination(address="127.0.0.1:1", dst_id="d", skip_blocks=0, dst_block_ids=list(range(n)))
        eng.stats.prefill_tokens, eng.stats.prefill_s = 1000, 1.0        # a learned 1,000 tokens/s
        compute_s = n * eng.cfg.cache.block_size / 1000
        bw = n * wire_block / (2 * compute_s)          # the real bytes take twice the compute: compress
        p.meter.record("p", "d", int(bw), 1.0)
        assert p._codec(dest, n * eng.cfg.cache.block_size) == "int8"
        p.meter.record("p", "d", int(bw * 8), 1.0)     # a link fast enough for them: send them as they are
        p.meter.record("p", "d", int(bw * 8), 1.0)
        p.meter.record("p", "d", int(bw * 8), 1.0)
        assert p._codec(dest, n * eng.cfg.cache.block_size) == "none"
    finally:
        p.close()


def test_a_send_the_transport_refuses_to_open_leaves_no_request_computing():
    eng = LLMEngine(build_config(kv_cache_memory=8 * 2**20, num_threads=1))
    p = PrefillWorker("p", eng, transport="tcp")
    try:
        dest = KVDestination(address="no-port-here", dst_id="d", skip_blocks=0, dst_block_ids=[0, 1])
        with pytest.raises(ValueError):
            p.prefill("r", list(range(100, 132)), SamplingParams(max_tokens=2, temperature=0), dest)
        time.sleep(0.5)                                 # a step would have computed it by now
        assert p.engine_thread.run(lambda e: (e.scheduler.requests, e.stats.prefill_tokens)) == ({}, 0)
    finally:
        p.close()

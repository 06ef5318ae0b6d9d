"""A decode worker refusing a call for an id already running (a duplicate generate, a start of a
request that is not reserved) leaves the running request's token stream alone. Before, the refused
call's stream replaced the live one's listener and its cleanup then removed it: the live request ran
on with nobody hearing its tokens or its finish. The embedded model, a real DecodeWorker, no Ray."""
import pytest

from pdcluster.decode_worker.worker import DecodeWorker
from pdcluster.engine.llm_engine import LLMEngine, build_config
from pdcluster.engine.sampling_params import SamplingParams
from tests.unit.kv_workers import tokens

pytestmark = pytest.mark.timeout(120)


def test_a_refused_duplicate_generate_or_start_leaves_the_live_stream_alone():
    d = DecodeWorker("d", lambda: LLMEngine(build_config(kv_cache_memory=8 * 2**20, num_threads=1)),
                     kv_transport="tcp")
    try:
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        first = d.generate("x", list(range(100, 140)), params)
        with pytest.raises(ValueError, match="already in flight"):
            d.generate("x", list(range(100, 140)), params)
        with pytest.raises(KeyError):
            d.start("x", 5)                             # running, not reserved
        assert len(tokens(first)) == 24                 # every token and the finish
        assert "x" not in d.engine_thread.listeners
    finally:
        d.close()

"""engine/engine_thread.py: given a builder, the engine is built on its own thread (all its torch work
on one thread, one OpenMP team), and a failing build raises in the constructor."""
import threading

import pytest

from pdcluster.engine.engine_thread import EngineThread
from pdcluster.engine.sampling_params import SamplingParams
from tests.unit.kv_workers import engine


def test_a_builder_runs_on_the_engine_thread_which_then_serves():
    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return engine()
    t = EngineThread(build, name="engine-under-test")
    try:
        assert built_on == ["engine-under-test"] and t.engine is not None
        stepped_on = []
        t.listeners["r"] = lambda o: stepped_on.append((threading.current_thread().name, o.new_token_ids, o.finished))
        t.run(lambda e: e.add_request([1, 2, 3], SamplingParams(max_tokens=2, temperature=0), "r", detokenize=False))
        for _ in range(200):                # the engine thread steps it to its end (2 tokens)
            if stepped_on and stepped_on[-1][2]:
                break
            t.run(lambda e: None)
        assert [s[0] for s in stepped_on] == ["engine-under-test"] * 2 and stepped_on[-1][2]
    finally:
        t.stop()


def test_a_failing_builder_raises_in_the_constructor():
    def build():
        raise ValueError("no such model")
    with pytest.raises(ValueError, match="no such model"):
        EngineThread(build)

"""engine/engine_thread.py: given a builder, the engine is built on its own thread (all its torch work
on one thread, one OpenMP team), and a failing build raises in the constructor."""
import threading

import pytest

from pdcluster.engine.engine_thread import EngineThread
from pdcluster.engine.llm_engine import LLMEngine, build_config
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


def _serve(t: EngineThread, rids: list[str], poisoned, max_tokens: int = 3) -> dict[str, list]:
    """Adds rids (all queued before the first step), steps them to their ends; each one's outputs (tokens,
    finish reason). `poisoned(engine)` installs the fault."""
    seen = {r: [] for r in rids}

    def add(e):
        poisoned(e)
        for r in rids:
            t.listeners[r] = lambda o, r=r: seen[r].append((o.new_token_ids, o.finish_reason))
            e.add_request([5 + len(r), 6, 7, 8], SamplingParams(max_tokens=max_tokens, temperature=0), r,
                          detokenize=False)
    t.run(add)
    for _ in range(400):
        if all(s and s[-1][1] for s in seen.values()):
            break
        t.run(lambda e: None)
    return seen


def test_a_failed_step_aborts_its_batch_and_the_waiting_requests_go_on():
    """Before, a step that raised aborted every queued request: one request whose step fails (a kernel
    error on its shape, say) ended every other one on the worker. Now only its batch's requests end
    (aborted); the waiting ones were never in the forward pass and run to their ends."""
    t = EngineThread(lambda: LLMEngine(build_config(num_threads=1, max_num_seqs=1, kv_cache_memory=48 * 2**20)))

    def poison(e):
        run = e.runner.run

        def failing(batch, *a, **k):
            if any(r.request_id == "bad" for r in batch.reqs):
                raise RuntimeError("a kernel failed on this batch")
            return run(batch, *a, **k)
        e.runner.run = failing
    try:
        seen = _serve(t, ["bad", "ok1", "ok2"], poison)
        assert seen["bad"] == [([], "abort")]
        for r in ("ok1", "ok2"):
            assert [o[1] for o in seen[r]] == [None, None, "length"] and all(len(o[0]) == 1 for o in seen[r])
        assert t.failed_steps == 0 and t.run(lambda e: e.has_work()) is False
    finally:
        t.stop()


def test_a_request_the_failed_step_finished_hears_an_abort_not_a_clean_end():
    """A step that fails after the scheduler finished a request (its last token recorded, not delivered):
    its listener hears "abort", not "length" with its last token missing."""
    t = EngineThread(lambda: LLMEngine(build_config(num_threads=1, kv_cache_memory=48 * 2**20)))

    def poison(e):
        update = e.scheduler.update

        def failing(batch, sampled):
            update(batch, sampled)
            raise RuntimeError("failed after the update")
        e.scheduler.update = failing
    try:
        seen = _serve(t, ["a"], poison, max_tokens=1)
        assert seen["a"] == [([], "abort")]
        assert t.run(lambda e: e.has_work()) is False
    finally:
        t.stop()

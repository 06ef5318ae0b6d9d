"""Runs an LLMEngine on its own thread so a worker's RPC side never blocks on a forward pass.

The engine is single-threaded by design: every mutation (add, abort, reserve, ...) is a command
queued to this thread and run between steps; results come back as concurrent Futures. Step
outputs are delivered to the per-request listener registered with the command that created it.

Given a builder instead of an engine, the thread builds it (load, warm-up) before its loop, so all
the engine's torch work runs on this one thread. That matters on CPU: libgomp keeps an OpenMP
thread team per thread that runs torch ops, and once a process holds more team threads than cores
(a team for the loading thread, another for this one) idle threads sleep at every barrier, whatever
OMP_WAIT_POLICY says. On one thread the policy is the process's choice (pdcluster/worker_actor.py).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from pdcluster.engine.llm_engine import LLMEngine, StepOutput
from pdcluster.engine.request import Status

log = logging.getLogger(__name__)

Listener = Callable[[StepOutput], None]


class EngineThread:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], name: str = "engine"):
        """engine, or a function that builds one: then it runs on the new thread, and its exception,
        if any, is raised here."""
        self.listeners: dict[str, Listener] = {}
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        built: Future = Future()
        self._thread = threading.Thread(target=self._main, args=(engine, built), name=name, daemon=True)
        self._thread.start()
        self.engine: LLMEngine = built.result()

    def _main(self, engine, built: Future) -> None:
        try:
            self.engine = engine() if callable(engine) else engine
        except BaseException as e:  # the constructor raises it; this thread ends
            built.set_exception(e)
            return
        built.set_result(self.engine)
        self._run()

    def call(self, fn: Callable[..., Any], *args) -> Future:
        """Run fn(engine, *args) on the engine thread between steps."""
        fut: Future = Future()
        self._cmds.put((fn, args, fut))
        if not self._thread.is_alive():     # ended (or ending) meanwhile: nothing will run it
            self._fail_queued()
        return fut

    def run(self, fn: Callable[..., Any], *args, timeout: float | None = 60.0) -> Any:
        self.check_alive()
        return self.call(fn, *args).result(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def check_alive(self) -> None:
        """RuntimeError once the engine thread has ended, died or stopped: nothing it queues would ever run
        (a prefill's wait, a decode stream's heartbeats and every later command end at once)."""
        if not self.alive:
            raise self._ended()

    def _ended(self) -> RuntimeError:
        """Why nothing queued will run any more: the thread died, or it was stopped."""
        return RuntimeError(f"engine thread died: {self.died!r}" if self.died is not None
                            else "engine stopped (the worker is shutting down)")

    def check_healthy(self) -> None:
        """What a worker's status poll asks (one that raises marks the worker unhealthy: no placements):
        check_alive, and RuntimeError while its steps keep failing (FAILING_STEPS in a row, the last
        FAILING_FOR_S ago at most: each failure aborts its batch, and an emptied worker would draw the
        next requests to the same end); after that long it takes requests again."""
        self.check_alive()
        if self.failed_steps >= self.FAILING_STEPS and time.monotonic() - self.last_failure < self.FAILING_FOR_S:
            raise RuntimeError(f"engine steps failing: the last {self.failed_steps} failed")

    def stop(self) -> None:
        self._stop.set()
        self._cmds.put(None)
        self._thread.join(timeout=10)

    def _drain(self, block: bool) -> None:
        try:
            item = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, args, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine, *args))
                except BaseException as e:  # the caller sees it; the loop goes on
                    fut.set_exception(e)
            try:
                item = self._cmds.get_nowait()
            except queue.Empty:
                return

    died: BaseException | None = None     # what ended the engine thread, if anything did
    failed_steps = 0                        # steps failed in a row (0 after one that succeeds)
    last_failure = 0.0                      # time.monotonic() of the last failed step
    FAILING_STEPS = 3                       # this many in a row, the last within FAILING_FOR_S: a failing engine
    FAILING_FOR_S = 60.0

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:      # not a step's failure (those are caught below): the loop's own;
            self.died = e               # the thread ends, check_alive reports it
            log.exception("engine thread died")
        finally:                        # commands queued behind the end: their callers hear of it now
            self._fail_queued()

    def _fail_queued(self) -> None:
        why = self._ended()
        while True:
            try:
                item = self._cmds.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[2].set_running_or_notify_cancel():
                item[2].set_exception(why)

    def _failed_batch(self) -> list:
        """The requests a failed step ran (the engine's `stepping`): the rest of the queue never reached the
        forward pass and stays. Every queued request if it failed before its batch was known (scheduling)."""
        batch = getattr(self.engine, "stepping", None)
        return self.engine.scheduler.queued() if batch is None else batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_work())
            if self._stop.is_set() or not self.engine.has_work():
                continue
            try:
                outs = self.engine.step()
                self.failed_steps = 0
            except Exception:
                self.failed_steps += 1
                self.last_failure = time.monotonic()
                log.exception("engine step failed; aborting its batch")
                for req in self._failed_batch():
                    try:                # each on its own: one that fails must not end the loop (every
                        self.engine.abort(req.request_id)       # later command would hang)
                    except Exception:
                        log.exception("aborting %s after the failed step failed too", req.request_id)
                    cb = self.listeners.pop(req.request_id, None)
                    if cb:
                        # one the step had finished lost its last tokens with it: its end is an abort too
                        req.status = Status.FINISHED_ABORTED
                        try:
                            cb(StepOutput(req, [], "", True))
                        except Exception:
                            log.exception("listener for %s failed", req.request_id)
                continue
            for o in outs:
                rid = o.request.request_id
                cb = self.listeners.get(rid)
                if o.finished:
                    self.listeners.pop(rid, None)
                if cb is not None:
                    try:
                        cb(o)
                    except Exception:
                        log.exception("listener for %s failed", rid)

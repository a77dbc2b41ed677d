"""The engine's own thread: the server's only way to reach core.engine.Engine, which is not thread-safe.

One thread owns the engine. Everything else — the asyncio event loop serving HTTP, a test, /metrics — hands it
commands (add these requests, abort those, read the stats) through a thread-safe queue and gets the answer
back as a concurrent.futures.Future. Between commands the thread steps the engine while it has work, and
sleeps on the queue when it has none. Each request's tokens reach its HTTP handler through the callback given
to `add`, called on this thread; the handler's side turns it into an asyncio wake-up.

>>> worker = EngineWorker(model.engine())                                       # doctest: +SKIP
>>> worker.start()                                                              # doctest: +SKIP
>>> reqs = worker.add([EngineRequest(...)], on_output=print).result()           # doctest: +SKIP
>>> worker.stop()                                                               # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable

from .errors import ServeError
from .log import logger
from .serve_metrics import Metrics

_STOP = object()


class EngineWorker:
    """Runs an Engine on one dedicated thread; thread-safe `add`, `abort`, `call`, `stats` and `stop`."""

    def __init__(self, engine, metrics: Metrics | None = None):
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders "closed" against queueing, so no command is left unanswered
        self._closed = False
        self.thread = threading.Thread(target=self._run, name="archkit-engine", daemon=True)

    # -- any thread ----------------------------------------------------------------------------------
    def start(self) -> "EngineWorker":
        """Start the engine thread (once)."""
        self.thread.start()
        return self

    @property
    def alive(self) -> bool:
        """True while the engine thread runs and takes commands."""
        return self.thread.is_alive() and not self._closed

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread; its result (or exception) comes back in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                fut.set_exception(ServeError("the engine has stopped (the server is shutting down)"))
                return fut
            self._commands.put((fn, fut))
        return fut

    def add(self, requests, on_output: Callable, arrival: float | None = None) -> concurrent.futures.Future:
        """Queue engine requests (core.serve_protocol.EngineRequest) all at once: every one is added or none is.

        on_output(index, StepOutput) is called on the engine thread for each token and at the end of each request
        (index: the request's position in `requests`). The future holds the engine Requests, or the error of the
        first that could not be added (QueueFullError, ContextOverflowError, GenerationError).
        """
        arrival = time.monotonic() if arrival is None else arrival
        return self.call(lambda engine: self._add_all(engine, list(requests), on_output, arrival))

    def abort(self, requests) -> None:
        """Cancel requests (finished ones are left alone); their KV blocks are freed on the engine thread."""
        requests = [r for r in requests if not r.finished]
        if requests:
            self.call(lambda engine: [engine.abort(r) for r in requests])

    def stats(self, timeout: float = 30.0) -> dict:
        """engine.stats(), read on the engine thread (blocks until it answers)."""
        return self.call(lambda engine: engine.stats()).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Abort every request, end the engine thread and wait for it (at most `timeout` seconds)."""
        with self._lock:
            if not self._closed:
                self._commands.put((_STOP, None))
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------------
    def _add_all(self, engine, requests, on_output, arrival) -> list:
        added = []
        try:
            for i, spec in enumerate(requests):
                cb = self._callback(i, on_output, arrival)
                added.append(engine.add(spec.prompt, spec.params, spec.max_new_tokens, spec.stops, True,
                                        spec.logprobs, callback=cb))
        except BaseException:
            for r in added:  # all or nothing: a choice cannot be dropped from a response
                engine.abort(r)
            raise
        return added

    def _callback(self, index: int, on_output: Callable, arrival: float) -> Callable:
        metrics = self.metrics

        def callback(out):
            # Called inside engine.step(): whatever goes wrong here must not stop the engine for everyone.
            try:
                metrics.on_output(out, arrival)
                on_output(index, out)
            except Exception:
                logger.exception("archkit serve: delivering a token failed (request %s)", out.request.id)
        return callback

    def _run(self) -> None:
        try:
            while True:
                if self._execute_commands(block=not self.engine.has_work()):
                    return
                if self.engine.has_work():
                    self._step()
        finally:
            self._close()

    def _execute_commands(self, block: bool) -> bool:
        """Run the queued commands (waiting for one when `block`); True once told to stop."""
        try:
            cmd = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            fn, fut = cmd
            if fn is _STOP:
                return True
            if fut.set_running_or_notify_cancel():  # False: the caller gave up before it ran
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:
                    fut.set_exception(e)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return False

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:
            # A bug in a forward pass: fail what was in flight (each client gets an error) and keep serving.
            logger.exception("archkit serve: an engine step failed; failing the requests in flight")
            self._abort_all(e)

    def _abort_all(self, error: Exception | None) -> None:
        for r in list(self.engine.waiting) + list(self.engine.running):
            if error is not None:
                r.error = error
            try:
                self.engine.abort(r)
            except Exception:
                logger.exception("archkit serve: aborting request %s failed", r.id)

    def _close(self) -> None:
        """Abort what is in flight (their handlers see 'abort') and answer every command still queued."""
        with self._lock:
            self._closed = True
        self._abort_all(None)
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(ServeError("the engine has stopped (the server is shutting down)"))

"""The model worker: one thread owns the model; requests queue up and run as mixed-adapter batches.

The event loop never touches the model. A request becomes one :class:`Job` per row (a prompt,
a text) and goes into a bounded queue; the worker takes the oldest job, waits at most
``window_s`` for more (or until ``max_batch`` are waiting), and runs every waiting job of the
same kind together - whatever adapters they name, up to ``max_resident`` distinct ones per batch
(the LRU could not hold more). Adapters are made resident first (:class:`AdapterStore`); a job
whose adapter fails to load gets its 422 and the rest of the batch runs. The backend then runs
the batch as ONE forward with per-row adapters (:func:`lorafit.adapter_batch`).

Why one thread: the model, its adapters and the layers' stacked-weight caches are mutated by
loads and evictions; one owner needs no locks, and torch already uses every core inside an op.
Why a window: on a loaded server requests arrive a few ms apart; waiting that long to batch them
costs one window of latency and divides the number of forwards by the batch size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorafit.serve.adapters import AdapterStore, ServeError
from lorafit.serve.metrics import Metrics

log = logging.getLogger("lorafit.serve")


@dataclass
class Job:
    """One row of work.

    Attributes:
        kind: which backend batch runner takes it ("generate", "classify", ...); one kind per batch.
        adapter: the adapter's name in DIR, or None for the base.
        work: the backend's input for this row (a :class:`lorafit.serve.generate.Row`, token ids...).
        deliver: (result or ServeError) -> None; called once, from the worker thread.
    """

    kind: str
    adapter: str | None
    work: Any
    deliver: Callable[[Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    _done: bool = False

    def finish(self, result: Any) -> None:
        if not self._done:
            self._done = True
            self.deliver(result)


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere): hands freed heap pages back to the OS."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """After a batch that loaded or evicted adapters: return the freed pages to the OS.

    A load re-stacks every resident adapter on the next forward and frees the old stacks; glibc
    keeps such freed blocks in the process heap, so the server's RSS would grow with LRU churn
    although the tensors it holds do not. One ``malloc_trim`` per such batch costs about a
    millisecond (1.3 ms median measured after forwards of the benchmark's 384-wide Llama), and
    batches that load nothing skip it.
    """
    if _TRIM is not None:
        _TRIM(0)


class Engine:
    """Queue + worker thread + adapter LRU around one backend (see module docstring).

    Args:
        backend: has ``run(kind, jobs, keys, admit)`` (keys[i]: the internal adapter key of jobs[i] or
            None) and finishes every job it is given; ``admit(n_live, live_keys) -> (jobs, keys)`` hands
            it jobs that arrived since, for a backend that can join them to the running batch.
        store: the adapters.
        max_batch: rows per batch at most.
        window_s: how long the first job of a batch waits for company.
        max_queue: jobs waiting at most; beyond it ``submit`` raises a 503 ServeError.
    """

    def __init__(self, backend, store: AdapterStore, metrics: Metrics, max_batch: int = 16, window_s: float = 0.005,
                 max_queue: int = 1024):
        self.backend, self.store, self.metrics = backend, store, metrics
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self.queue: deque[tuple[float, Job]] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.busy_since: float | None = None
        self.running: list[Job] = []  # the jobs of the batch being run (worker thread)

    # ---------------------------------------------------------------- any thread
    def start(self) -> None:
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._loop, name="lorafit-serve-worker", daemon=True)
            self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for job in self.running:  # rows decoding now end at the next step instead of running to max_tokens
            job.cancelled.set()
        if self.thread is not None:
            self.thread.join(timeout)
            self.thread = None
        with self.cond:
            left = [job for _, job in self.queue]
            self.queue.clear()
        for job in left:
            job.finish(ServeError(503, "the server is shutting down", "server_error"))

    def submit(self, jobs: list[Job]) -> None:
        """Queue every job of one request, or none (503 when the queue would overflow)."""
        with self.cond:
            if self.stopping:
                raise ServeError(503, "the server is shutting down", "server_error")
            if len(self.queue) + len(jobs) > self.max_queue:
                raise ServeError(503, f"the server is overloaded ({len(self.queue)} rows queued, --max-queue "
                                      f"{self.max_queue}); retry later", "server_error")
            now = time.monotonic()
            self.queue.extend((now, job) for job in jobs)
            self.cond.notify_all()

    def queued(self) -> int:
        return len(self.queue)

    # ---------------------------------------------------------------- worker thread
    def _take(self) -> list[Job] | None:
        """Wait for the next batch: jobs of the first job's kind, up to max_batch rows and max_resident adapters."""
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait(0.5)
            if self.stopping:
                return None
            first_at = self.queue[0][0]
            while len(self.queue) < self.max_batch and not self.stopping:
                left = first_at + self.window_s - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return self._select(self.queue[0][1].kind, self.max_batch, set())

    def _select(self, kind: str, room: int, adapters: set[str]) -> list[Job]:
        """Take queued jobs of ``kind`` in order: at most ``room``, adapters (with ``adapters``) <= max_resident.

        Called with ``self.cond`` held. Cancelled jobs are answered and dropped; the rest stay in order.
        """
        batch, rest = [], deque()
        while self.queue:
            at, job = self.queue.popleft()
            if job.cancelled.is_set():
                job.finish(ServeError(499, "the client closed the request", "cancelled"))
                continue
            fits = job.kind == kind and len(batch) < room and (
                job.adapter is None or job.adapter in adapters or len(adapters) < self.store.max_resident)
            if fits:
                batch.append(job)
                if job.adapter is not None:
                    adapters.add(job.adapter)
            else:
                rest.append((at, job))
        self.queue = rest
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self.busy_since = time.monotonic()
                try:
                    self._run(batch)
                except Exception as exc:  # noqa: BLE001 - the worker must survive anything a batch raises
                    log.error("batch failed before it ran:\n%s", traceback.format_exc())
                    err = ServeError(500, f"internal error ({type(exc).__name__})", "server_error")
                    for job in batch + self.running:
                        job.finish(err)
                finally:
                    self.busy_since, self.running = None, []

    def _resolve(self, batch: list[Job], keep: set[str]) -> tuple[list[Job], list[str | None]]:
        """Make the batch's adapters resident (``keep`` is not evicted); failed loads answer their jobs."""
        names = list(dict.fromkeys(j.adapter for j in batch if j.adapter is not None))
        keys = self.store.ensure(names, keep=keep | set(names))
        ok, ok_keys = [], []
        for job in batch:
            key = keys.get(job.adapter) if job.adapter is not None else None
            if isinstance(key, ServeError):
                job.finish(key)
            else:
                ok.append(job)
                ok_keys.append(key)
        if ok:
            self.metrics.batch_run(len(ok), len(set(ok_keys)))
        return ok, ok_keys

    def _admitter(self, kind: str, running: list[Job]):
        """``admit(n_live, live_keys) -> (jobs, keys)`` for a backend that can join rows to a running batch."""
        def admit(n_live: int, live_keys: set) -> tuple[list[Job], list[str | None]]:
            room = self.max_batch - n_live
            if room <= 0 or not self.queue or self.stopping:
                return [], []
            keep = {n for n, r in self.store.resident.items() if r.key in live_keys}
            with self.cond:
                # as for a new batch: wait one window for company, unless enough rows wait already
                # (each admission is a prefill of its own plus a copy of the running KV cache)
                if not self.queue or (len(self.queue) < room and time.monotonic() - self.queue[0][0] < self.window_s):
                    return [], []
                new = self._select(kind, room, set(keep))
            ok, keys = self._resolve(new, keep)
            running.extend(ok)
            return ok, keys
        return admit

    def _run(self, batch: list[Job]) -> None:
        churn = self.metrics.loads + self.metrics.evictions
        try:
            self._run_batch(batch)
        finally:
            if self.metrics.loads + self.metrics.evictions != churn:
                release_freed_memory()

    def _run_batch(self, batch: list[Job]) -> None:
        ok, ok_keys = self._resolve(batch, set())
        if not ok:
            return
        running = self.running = list(ok)  # every job of this batch, joined ones included: a failure answers all
        try:
            self.backend.run(ok[0].kind, ok, ok_keys, self._admitter(ok[0].kind, running))
        except ServeError as exc:
            for job in running:
                job.finish(exc)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving; the batch gets a 500
            log.error("batch of %d rows failed:\n%s", len(running), traceback.format_exc())
            err = ServeError(500, f"internal error while running the batch ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})", "server_error")
            for job in running:
                job.finish(err)

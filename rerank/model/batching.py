"""Micro-batching of concurrent rerank requests into one forward pass (for CUDA).

On a GPU one forward pass over ``B`` requests costs about as much as over one, so concurrent calls
gain by sharing it. :class:`MicroBatcher` owns one worker thread and a **bounded** queue: a caller's
request waits at most ``max_wait_ms`` (counted from the first request of a batch) for others to join,
up to ``max_batch`` requests per pass. A full queue refuses at once (:class:`Overloaded`), so a burst
cannot pile up unbounded latency; the rerank call turns that into a fail-open ``overloaded`` result.

``Reranker`` uses one automatically when its model sits on a CUDA device (``micro_batch=None``);
``micro_batch=True`` forces it on the CPU too (tests, benchmarks), where it mostly adds the wait.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Sequence

from indexing.errors import ConfigError, FusionRankError

log = logging.getLogger(__name__)


class Overloaded(FusionRankError):
    """The micro-batch queue is full: the request was not queued."""


class MicroBatcher:
    def __init__(self, ranker: Any, *, max_batch: int = 32, max_wait_ms: float = 2.0, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or not max_wait_ms >= 0:
            raise ConfigError(f"micro-batching needs max_batch >= 1, max_queue >= 1, max_wait_ms >= 0; got {max_batch}, {max_queue}, {max_wait_ms}")
        self.ranker, self.max_batch, self.max_wait_s = ranker, int(max_batch), float(max_wait_ms) / 1000.0
        self._q: queue.Queue[tuple[Any, Future] | None] = queue.Queue(maxsize=int(max_queue))
        self._lock = threading.Lock()
        self._batches = self._requests = self._largest = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fusionrank-microbatch", daemon=True)
        self._thread.start()

    def submit(self, request: Any) -> Future:
        """Queue one request (a :func:`rerank.model.inputs.build_request_features` result); its
        future gives the ``ScoredRequest``. Raises :class:`Overloaded` when the queue is full."""
        if self._closed:
            raise FusionRankError("the micro-batcher is closed")
        fut: Future = Future()
        try:
            self._q.put_nowait((request, fut))
        except queue.Full:
            raise Overloaded(f"micro-batch queue full ({self._q.maxsize} requests waiting)") from None
        return fut

    def score(self, request: Any, timeout_s: float | None = None) -> Any:
        """Queue ``request`` and wait for its result (``TimeoutError`` after ``timeout_s``)."""
        return self.submit(request).result(timeout=timeout_s)

    @property
    def stats(self) -> dict[str, float]:
        with self._lock:
            n, b = self._requests, self._batches
            return {"requests": n, "batches": b, "mean_batch": round(n / b, 3) if b else 0.0, "largest_batch": self._largest,
                    "queued": self._q.qsize()}

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish what is queued, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        self._thread.join(timeout_s)

    def _collect(self, first: tuple[Any, Future]) -> tuple[list[tuple[Any, Future]], bool]:
        batch, stop = [first], False
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                item = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            live = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                outs: Sequence[Any] = self.ranker.score_requests([r for r, _ in live])
            except BaseException as e:  # every waiting caller gets the error (they fail open)
                for _, f in live:
                    f.set_exception(e)
                continue
            for (_, f), out in zip(live, outs):
                f.set_result(out)
            with self._lock:
                self._batches += 1
                self._requests += len(live)
                self._largest = max(self._largest, len(live))


__all__ = ["MicroBatcher", "Overloaded"]

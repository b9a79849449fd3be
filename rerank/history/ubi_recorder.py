"""What the service served, written into the store's UBI tables off the request path: :class:`UbiRecorder`.

Each ``/search`` and ``/rerank`` answer carries a ``query_id``; :meth:`UbiRecorder.record` puts the search (query
text, client, user, the served product ids in order) on a bounded in-memory queue and returns at once (a
``put_nowait``: no I/O, no lock held for long on the request path). One background thread drains the queue in
batches into ``ubi_queries`` and ``ubi_shown`` (positions 1..n), with ``ON CONFLICT DO NOTHING``: a query id the
store has already (a retried request, the shop's own UBI log) is kept as first stored.

Fail-open: a full queue drops the search (``dropped``), a store that fails drops that batch after one retry
(``failed``), and neither ever reaches the request; :meth:`stats` gives the counters (the service exports them in
``/metrics``). A shop's front end then only sends events (impressions, clicks, carts) with that ``query_id`` to
``POST /events``; the click models join them by query id when the log is read.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import datetime, timezone
from typing import Any, Sequence

log = logging.getLogger(__name__)

_Q_COLS = ("query_id", "user_query", "client_id", "user_id", "application", "ts", "hits")
_S_COLS = ("query_id", "position", "product_id")
_STOP = object()


class UbiRecorder:
    """A background writer of served searches into the UBI tables of ``store`` (a :class:`~rerank.history.HistoryStore`)."""

    def __init__(self, store: Any, *, application: str = "fusionrank", max_queue: int = 10_000, batch_size: int = 500,
                 max_shown: int = 100):
        self.store = store
        self.application = application
        self.batch_size = batch_size
        self.max_shown = max_shown
        self._q: "queue.Queue[Any]" = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._counts = {"recorded": 0, "written": 0, "dropped": 0, "failed": 0}
        self._last_error_log = 0.0
        self._thread = threading.Thread(target=self._run, name="fusionrank-ubi-recorder", daemon=True)
        self._thread.start()

    def record(self, query_id: str, query: str, hit_ids: Sequence[str], *, user_id: str | None = None, client_id: str | None = None) -> bool:
        """Queue one served search; False (and counted as dropped) when the queue is full. Never raises for the store."""
        if user_id is not None and len(user_id) > 128:  # the column's width (an id that long is kept out, not the search)
            user_id = None
        item = (query_id[:100], query, client_id[:100] if client_id else None, user_id, datetime.now(timezone.utc),
                tuple(hit_ids[: self.max_shown]))
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self._count("dropped")
            return False
        self._count("recorded")
        return True

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "queued": self._q.qsize()}

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (or dropped); True when it was within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._q.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        try:
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        while True:
            first = self._q.get()
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = any(x is _STOP for x in batch)
            items = [x for x in batch if x is not _STOP]
            if items:
                self._write(items)
            for _ in batch:
                self._q.task_done()
            if stop:
                return

    def _write(self, items: list[tuple[Any, ...]]) -> None:
        by_id: dict[str, tuple[Any, ...]] = {}
        for it in items:
            by_id.setdefault(it[0], it)  # one query id twice in a batch: the first answer counts
        qrows = [(qid, q, cid, uid, self.application, ts, len(hits)) for qid, q, cid, uid, ts, hits in by_id.values()]
        srows = [(qid, pos, pid) for qid, _q, _c, _u, _t, hits in by_id.values() for pos, pid in enumerate(hits, 1)]
        for attempt in (1, 2):
            try:
                self.store.insert_rows("ubi_queries", _Q_COLS, qrows)
                if srows:
                    self.store.insert_rows("ubi_shown", _S_COLS, srows)
                self._count("written", len(items))
                return
            except Exception as e:  # the store is down, locked, not migrated...: fail open
                if attempt == 2:
                    self._count("failed", len(items))
                    now = time.monotonic()
                    if now - self._last_error_log > 30:
                        self._last_error_log = now
                        log.warning("UBI recording failed for %d searches (dropped; requests are not affected): %s: %s",
                                    len(items), type(e).__name__, e)
                else:
                    time.sleep(0.2)


__all__ = ["UbiRecorder"]

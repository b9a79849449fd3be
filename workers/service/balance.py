"""Least-connections rebalancing of keep-alive connections across ``fusionrank serve --workers N`` processes.

Why: the worker processes share one listening socket, and a connection stays with the worker that accepted it.
Which worker accepts is decided by whichever event loop wakes first, so long-lived keep-alive connections (a load
generator's, or the connection pool of OpenSearch's ML connector) land unevenly: ``bench serve`` at concurrency 8
with two workers had 5 connections on one and 3 on the other (seen with ``ss``), and splits of 6/2 and 7/1 are
as likely as a coin says. Each process serves one rerank call at a time, so the worker with 5 keeps a queue of ~4
while the one with 3 queues ~2: p99 ~2x p50, and the split changed from run to run.

How: each worker publishes how many client connections it has seen in the last ``window_s`` seconds into its slot
of a small shared file (the supervisor names it in ``FUSIONRANK_SERVE_BALANCE_FILE``; a worker claims a free slot
with an exclusive ``flock`` on the slot's lock file, held for its lifetime, so a restarted worker takes the slot of
the one it replaces). When a worker answers a request while it holds more than one connection above the least-loaded live
worker, that response carries ``Connection: close``: the client opens a new connection (every HTTP client does;
nothing is lost, the response is complete), which the listening socket hands to a worker again, most likely one
whose event loop is not busy. Repeated, the connections even out; a balanced split is left alone.

The counts are approximate (a connection closed by its client is forgotten after ``window_s``), which is enough:
the rule acts on a difference of two or more.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

BALANCE_FILE_ENV = "FUSIONRANK_SERVE_BALANCE_FILE"
WORKERS_ENV = "FUSIONRANK_SERVE_WORKERS"
SLOT = struct.Struct("<qd")  # connections seen in the window, wall time of the update (a dead worker goes stale)
STALE_S = 10.0  # a slot not updated for this long (a live worker updates it every second) belongs to no worker


class ConnectionBalancer:
    """One worker's view of the shared table. :meth:`should_close` is called once per response."""

    def __init__(self, path: Path | str, workers: int, *, window_s: float = 2.0, heartbeat_s: float | None = 1.0,
                 clock: Callable[[], float] = time.time):
        if workers < 2:
            raise ValueError(f"connection balancing needs at least 2 workers, got {workers}")
        self.path, self.workers, self.window_s, self.clock = Path(path), int(workers), float(window_s), clock
        size = SLOT.size * self.workers
        self.slot, self._slot_fd = self._claim()  # the lock file stays open: closing it would give the slot away
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except Exception:
            os.close(self._slot_fd)
            raise
        finally:
            os.close(fd)  # the mapping keeps the file
        self._clients: OrderedDict[Any, float] = OrderedDict()
        self._lock = threading.Lock()
        self.closed = 0
        self._publish(0)
        self._stop = threading.Event()
        if heartbeat_s:  # an idle worker stays alive in the table (stale means gone), its old connections age out
            threading.Thread(target=self._beat, args=(float(heartbeat_s),), name="fusionrank-balance", daemon=True).start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with self._lock:
                if self._stop.is_set():
                    return
                self._prune(self.clock())
                self._publish(len(self._clients))

    def _prune(self, now: float) -> None:
        seen = self._clients
        while seen:
            _, t = next(iter(seen.items()))
            if now - t <= self.window_s:
                break
            seen.popitem(last=False)

    def _claim(self) -> tuple[int, int]:
        """The first slot whose lock file (``<path>.<slot>.lock``) this process can lock exclusively (``flock``: held
        per open file, released when the process ends, so a restarted worker finds its predecessor's slot free)."""
        for i in range(self.workers):
            fd = os.open(f"{self.path}.{i}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return i, fd
            except OSError:
                os.close(fd)
        raise RuntimeError(f"{self.path}: all {self.workers} worker slots are taken")

    def _publish(self, n: int) -> None:
        SLOT.pack_into(self._map, self.slot * SLOT.size, n, self.clock())

    def counts(self) -> list[int | None]:
        """Each slot's published connection count; ``None`` for a slot not updated in the last :data:`STALE_S` s."""
        now = self.clock()
        out: list[int | None] = []
        for i in range(self.workers):
            n, t = SLOT.unpack_from(self._map, i * SLOT.size)
            out.append(int(n) if now - t <= STALE_S else None)
        return out

    def should_close(self, client: Any) -> bool:
        """Note a request on ``client`` (the connection's peer address); True when its response should close it."""
        if client is None:
            return False
        now = self.clock()
        with self._lock:
            seen = self._clients
            seen[client] = now
            seen.move_to_end(client)
            self._prune(now)
            mine = len(seen)
            others = [n for i, n in enumerate(self.counts()) if i != self.slot and n is not None]
            close = bool(others) and mine > min(others) + 1
            if close:
                del seen[client]
                mine -= 1
                self.closed += 1
            self._publish(mine)
        return close

    def close(self) -> None:
        """Give the slot back (a worker that stops; the table keeps its last count until it goes stale)."""
        with self._lock:
            self._stop.set()
            try:
                self._map.close()
            finally:
                os.close(self._slot_fd)


def from_settings(settings: Any) -> ConnectionBalancer | None:
    """The balancer ``fusionrank serve --workers N`` asked for (its ``serve_balance_file`` and ``serve_workers``
    settings, which it sets for its workers), or None (one process, tests)."""
    path, n = settings.serve_balance_file, settings.serve_workers
    if not path or not n or n < 2:
        return None
    b = ConnectionBalancer(path, n)
    log.info("connection balancing: worker slot %d of %d (%s)", b.slot, b.workers, path)
    return b


__all__ = ["BALANCE_FILE_ENV", "WORKERS_ENV", "ConnectionBalancer", "from_settings"]

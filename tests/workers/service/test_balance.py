"""Least-connections rebalancing of keep-alive connections across serve worker processes (workers.service.balance)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from workers.service.balance import STALE_S, ConnectionBalancer, from_settings
from workers.settings import load_settings


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _pair(tmp_path, clock, workers=2, window_s=2.0):
    path = tmp_path / "connections"
    return [ConnectionBalancer(path, workers, window_s=window_s, heartbeat_s=None, clock=clock) for _ in range(workers)]


def test_slots_are_claimed_once_and_freed_on_close(tmp_path):
    a, b = _pair(tmp_path, Clock())
    assert {a.slot, b.slot} == {0, 1}
    with pytest.raises(RuntimeError, match="all 2 worker slots are taken"):
        ConnectionBalancer(tmp_path / "connections", 2, heartbeat_s=None)
    a.close()
    c = ConnectionBalancer(tmp_path / "connections", 2, heartbeat_s=None)  # a restarted worker takes the freed slot
    assert c.slot == a.slot
    with pytest.raises(ValueError, match="at least 2 workers"):
        ConnectionBalancer(tmp_path / "x", 1)
    b.close(), c.close()


def test_the_worker_with_two_connections_more_than_the_least_loaded_closes_one(tmp_path):
    clock = Clock()
    a, b = _pair(tmp_path, clock)
    # connections arrive alternately: a1 b1 a2 b2 a3 b3 a4 (4 against 3: balanced enough) ...
    order = [(a, 1), (b, 1), (a, 2), (b, 2), (a, 3), (b, 3), (a, 4)]
    assert [w.should_close((f"10.0.0.{1 if w is a else 2}", p)) for w, p in order] == [False] * 7
    assert a.counts() == ([4, 3] if a.slot == 0 else [3, 4])
    # ... then a fifth lands on a: 5 > 3 + 1, and that response closes it
    assert a.should_close(("10.0.0.1", 5)) is True
    assert a.counts()[a.slot] == 4 and a.closed == 1  # the closed one is forgotten at once
    clock.t += 0.5
    assert not any(a.should_close(("10.0.0.1", p)) for p in range(1, 5))  # the others are left alone
    # the closed client reconnects (a new port) and lands on b: 4 / 4
    assert b.should_close(("10.0.0.1", 99)) is False and b.counts() == [4, 4]
    # an idle worker (0 connections) draws them from one with 2 or more
    a.close(), b.close()
    (tmp_path / "idle").mkdir()
    c, d = _pair(tmp_path / "idle", Clock())
    assert [c.should_close(("10.0.0.3", p)) for p in range(3)] == [False, True, True]
    c.close(), d.close()


def test_connections_not_seen_for_the_window_are_forgotten(tmp_path):
    clock = Clock()
    a, b = _pair(tmp_path, clock, window_s=2.0)
    for p in range(5):
        a.should_close(("10.0.0.1", p))
    clock.t += 3.0  # the five went quiet (closed by their clients)
    assert a.should_close(("10.0.0.1", 100)) is False and a.counts()[a.slot] == 1
    a.close(), b.close()


def test_a_stale_slot_is_ignored_and_a_lone_worker_never_closes(tmp_path):
    clock = Clock()
    a, b = _pair(tmp_path, clock)
    b.should_close(("10.0.0.2", 1))
    clock.t += STALE_S + 1  # b stopped updating its slot: a dead worker
    assert not any(a.should_close(("10.0.0.1", p)) for p in range(6))
    assert a.counts()[b.slot] is None
    assert a.should_close(None) is False  # no peer address: nothing to count
    a.close(), b.close()


def test_the_heartbeat_keeps_an_idle_worker_alive_and_ages_its_connections(tmp_path):
    path = tmp_path / "connections"
    a = ConnectionBalancer(path, 2, window_s=0.2, heartbeat_s=0.05)
    b = ConnectionBalancer(path, 2, window_s=0.2, heartbeat_s=None)
    a.should_close(("10.0.0.1", 1))
    assert b.counts()[a.slot] == 1
    deadline = time.time() + 5
    while b.counts()[a.slot] != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert b.counts()[a.slot] == 0  # aged out by the heartbeat, not by a request
    a.close(), b.close()


_CLAIM = """
import sys, time
from workers.service.balance import ConnectionBalancer
b = ConnectionBalancer(sys.argv[1], 2, heartbeat_s=None)
print(b.slot, flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_processes_claim_different_slots_and_a_dead_one_frees_its_slot(tmp_path):
    path = str(tmp_path / "connections")
    first = subprocess.Popen([sys.executable, "-c", _CLAIM, path, "30"], stdout=subprocess.PIPE, text=True)
    try:
        s1 = int(first.stdout.readline())
        second = subprocess.run([sys.executable, "-c", _CLAIM, path, "0"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert {s1, int(second.stdout)} == {0, 1}
    finally:
        first.kill()
        first.wait()
    third = subprocess.run([sys.executable, "-c", _CLAIM, path, "0"], capture_output=True, text=True, timeout=60)
    assert int(third.stdout) == 0  # the killed process's lock went with it


def test_the_workers_settings_need_the_file_and_two_workers(monkeypatch, tmp_path):
    # what `fusionrank serve --workers N` sets in its workers' environment, read through the settings
    monkeypatch.delenv("FUSIONRANK_SERVE_BALANCE_FILE", raising=False)
    assert from_settings(load_settings()) is None
    monkeypatch.setenv("FUSIONRANK_SERVE_BALANCE_FILE", str(tmp_path / "c"))
    monkeypatch.setenv("FUSIONRANK_SERVE_WORKERS", "1")
    assert from_settings(load_settings()) is None
    monkeypatch.setenv("FUSIONRANK_SERVE_WORKERS", "3")
    b = from_settings(load_settings())
    assert b is not None and b.workers == 3 and b.slot == 0
    b.close()


def test_the_app_closes_the_connection_of_an_overloaded_worker(tmp_path):
    from fastapi.testclient import TestClient

    from workers.service.app import create_app
    from workers.service.state import ServiceState
    from workers.settings import load_settings

    clock = Clock()
    path = tmp_path / "connections"
    mine = ConnectionBalancer(path, 2, heartbeat_s=None, clock=clock)
    other = ConnectionBalancer(path, 2, heartbeat_s=None, clock=clock)
    clock.t += STALE_S + 1  # the other worker is not up yet: nothing to balance against
    st = ServiceState.loading(load_settings(data_dir=str(tmp_path)), auth=False)
    with TestClient(create_app(st, balancer=mine)) as client:
        first = client.get("/healthz")  # this worker: the test client's connection ...
        assert first.status_code == 200 and "connection" not in first.headers
        assert [mine.should_close(("10.0.0.1", p)) for p in (1, 2)] == [False, False]  # ... and two more
        other.should_close(("10.0.0.2", 1))  # the other worker comes up with one: 3 > 1 + 1
        r = client.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}  # a complete answer, then the close
        assert r.headers["connection"] == "close"
        metrics = client.get("/metrics").text
    assert "fusionrank_rebalanced_connections_total 1.0" in metrics
    mine.close(), other.close()

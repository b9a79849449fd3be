"""``fusionrank drill``: the dependencies-down, hostile-input and load drills against real local servers.

The slow test runs the real command (a private PostgreSQL and Redis, a served synthetic world, a minute of
load, as CI runs it) and checks the report: nothing accepted and lost, no 5xx beyond the documented refusals,
every dependency's outage visible (503s, fail-open counts in ``/metrics``), recovery without a restart, and
RSS flat under load. The fast tests pin the report's bookkeeping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workers.drill.drill import DRILLS, Rec, Traffic, degraded_counts

ROOT = Path(__file__).resolve().parents[2]


def test_degraded_counts_read_from_prometheus_text() -> None:
    text = (
        "# HELP fusionrank_degraded_total rerank calls that failed open\n"
        "# TYPE fusionrank_degraded_total counter\n"
        'fusionrank_degraded_total{reason="history_error"} 3.0\n'
        'fusionrank_degraded_total{reason="model_error"} 12.0\n'
        'fusionrank_degraded_created{reason="model_error"} 1.7e9\n'
        'fusionrank_requests_total{endpoint="/search",status="200"} 40.0\n'
    )
    assert degraded_counts(text) == {"history_error": 3, "model_error": 12}


def test_a_refusal_is_expected_only_from_a_request_in_flight_during_its_fault() -> None:
    t = Traffic("http://x", "k", "a")
    t.faults.append(("postgres_down", 10.0, 20.0))
    assert t.expected(Rec("postgres_down", "/events", 503, t0=12.0, t1=12.5))
    assert t.expected(Rec("baseline", "/events", 503, t0=9.0, t1=10.5))  # sent before, answered during
    assert not t.expected(Rec("postgres_down", "/events", 503, t0=21.0, t1=21.5))  # after recovery: unexpected
    assert not t.expected(Rec("postgres_down", "/search", 503, t0=12.0, t1=12.5))  # searches fail open instead
    assert not t.expected(Rec("postgres_down", "/events", 500, t0=12.0, t1=12.5))


@pytest.mark.slow
@pytest.mark.integration
def test_drill_loses_nothing_and_recovers(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "workers.cli", "drill", "--json", "--load-seconds", "60", "--hold-seconds", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    (tmp_path / "drill.err").write_text(proc.stderr)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    (tmp_path / "drill.json").write_text(json.dumps(report, indent=1))
    drills = report["drills"]
    assert list(drills) == list(DRILLS)
    for name, d in drills.items():
        assert d["requests"] > 0, name
        assert d["lost"] == 0, (name, d)
        assert d["unexpected_5xx"] == 0, (name, d["unexpected"])
        assert d["transport_errors"] == 0, (name, d["unexpected"])
        if "recovered" in d:
            assert d["recovered"] is True, (name, d)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # each outage showed: the documented refusals, and fail-open counts in /metrics
    assert drills["redis_down"]["answers"].get("/admin/reindex 503", 0) > 0
    assert drills["postgres_down"]["answers"].get("/events 503", 0) > 0
    assert drills["postgres_down"]["degraded"].get("history_error", 0) > 0
    assert drills["engine_down"]["answers"].get("/search 503", 0) > 0
    assert drills["engine_down"]["degraded"].get("engine_error", 0) > 0
    assert drills["opensearch_refused"]["degraded"].get("engine_error", 0) > 0
    assert drills["model_raises"]["degraded"].get("model_error", 0) > 0
    # searches kept answering through the broker and history outages
    for name in ("redis_down", "postgres_down", "model_raises"):
        assert drills[name]["answers"].get("/search 200", 0) > 0 and drills[name]["answers"].get("/rerank 200", 0) > 0, name
    assert drills["baseline"]["failed"] == 0 and drills["baseline"]["degraded"] == {}
    assert drills["hostile_input"]["wrong_answers"] == []
    assert drills["access"]["routes"] >= 8 and drills["access"]["wrong_answers"] == []
    assert report["secrets_seen"] == {"logs": 0, "responses": 0, "metrics": 0}

    load = drills["load"]
    assert load["failed"] == 0 and load["degraded"] == {}
    assert load["rss_growth_pct"] < 10.0, load
    assert report["events"]["accepted"] > 0 and report["events"]["stored"] == report["events"]["accepted"]
    assert report["reindex_tasks"]["accepted"] >= 2 and report["reindex_tasks"]["queued"] == report["reindex_tasks"]["accepted"]

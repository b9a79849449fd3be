"""``fusionrank bench history``: the benchmark runs small on both databases and reports sane numbers."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from workers.bench.history import run_history_bench

KEYS = {
    "import_events_per_s",
    "profile_ms_p50_cold",
    "profile_ms_p99_cold",
    "profile_ms_p50_warm",
    "profile_ms_p99_warm",
    "database",
    "vectors",
}


def _check(r: dict, database: str) -> None:
    assert KEYS <= set(r)
    assert r["database"] == database and "synthetic in-memory" in r["vectors"]
    assert r["machine"]["cpu_count"] and "cpu_isa" in r["machine"]  # every bench JSON names its machine
    assert r["stored"] == 3000 and r["rejected"] == 0
    assert r["import_events_per_s"] > 100
    assert 0 < r["profile_ms_p50_cold"] <= r["profile_ms_p99_cold"]
    assert 0 < r["profile_ms_p50_warm"] <= r["profile_ms_p99_warm"]
    assert r["profile_ms_p50_warm"] < r["profile_ms_p50_cold"]  # the cache is faster than SQL
    assert 1 <= r["profile_items_mean"] <= r["k"]
    assert r["cache_hits"] >= r["profile_samples"]


def test_bench_history_on_sqlite_through_the_cli() -> None:
    from workers.cli import app

    res = CliRunner().invoke(app, ["bench", "history", "--json", "--users", "60", "--events", "3000", "--products", "300", "--samples", "60"])
    assert res.exit_code == 0, res.output
    _check(json.loads(res.stdout), "sqlite")


@pytest.mark.integration
def test_bench_history_on_postgres_cleans_up_its_schema(postgres_url: str) -> None:
    from sqlalchemy import text

    from rerank.history.store import make_engine

    r = run_history_bench(postgres_url, users=60, events=3000, products=300, samples=60)
    _check(r, "postgresql")
    engine = make_engine(postgres_url)
    with engine.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'fr_bench_%'")).scalar()
    engine.dispose()
    assert left == 0


def test_timing_the_retrain_task_needs_the_settings_and_an_existing_log(tmp_path) -> None:
    from indexing.errors import ConfigError
    from workers.cli import app

    with pytest.raises(ConfigError, match="needs the settings"):
        run_history_bench(None, users=10, events=10, products=10, samples=1, retrain_log=tmp_path)
    res = CliRunner().invoke(app, ["bench", "history", "--json", "--users", "10", "--events", "10", "--products", "10",
                                   "--retrain-log", str(tmp_path / "missing")])
    assert res.exit_code != 0 and "--retrain-log not found" in str(res.exception or res.output)

"""Ingestion: validation, idempotency, file import (CSV/JSONL/gz), the CLI, concurrent writers (SQLite + PostgreSQL)."""

from __future__ import annotations

import csv
import gzip
import json
import multiprocessing as mp
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from indexing.errors import ConfigError, NotMigratedError
from rerank.history.ingest import (
    EventRejected,
    IngestSummary,
    derive_event_id,
    import_events_file,
    parse_timestamp,
    record_events,
    validate_event,
)
from rerank.history.store import HistoryStore, upgrade
from tests.rerank import history_support
from tests.rerank.history_support import DEV_EVENTS, DEV_EVENTS_ROWS, import_in_process

# the shared fixtures (each test runs on SQLite and on PostgreSQL)
db_url = history_support.db_url
store = history_support.store

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)
T0 = int(datetime(2026, 2, 1, tzinfo=timezone.utc).timestamp())


def ev(user: str = "u1", product: str = "p1", event: str = "view", ts: object = T0, **extra: object) -> dict:
    return {"user_id": user, "product_id": product, "event": event, "timestamp": ts, **extra}


# --------------------------------------------------------------------------- validation (pure)
@pytest.mark.parametrize(
    "raw, reason",
    [
        (ev(event="like"), "unknown event type 'like'; valid: view, click, add_to_cart, purchase"),
        (ev(event=""), "missing event type"),
        (ev(user=""), "missing user_id"),
        ({"product_id": "p", "event": "view", "timestamp": T0}, "missing user_id"),
        (ev(product=None), "missing product_id"),
        (ev(ts="yesterday"), "unparseable timestamp 'yesterday'"),
        (ev(ts=None), "missing timestamp"),
        (ev(ts=float("nan")), "unparseable timestamp"),
        (ev(ts=T0 * 1000), "epoch seconds expected, not milliseconds"),
        (ev(ts=(NOW + timedelta(days=2)).timestamp()), "is in the future"),
        (ev(user=["u"]), "user_id must be a string"),
        (ev(user="u" * 129), "user_id is longer than 128"),
        (ev(event_id="x" * 65), "event_id is longer than 64"),
        (["u1", "p1"], "an event must be an object, got list"),
    ],
)
def test_bad_events_are_rejected_with_a_reason(raw: object, reason: str) -> None:
    with pytest.raises(EventRejected) as info:
        validate_event(raw, now=NOW)
    assert reason in str(info.value)


def test_timestamps_parse_from_epoch_iso_and_datetimes() -> None:
    expect = datetime(2026, 2, 1, tzinfo=timezone.utc)
    assert parse_timestamp(T0) == parse_timestamp(str(T0)) == parse_timestamp(float(T0)) == expect
    assert parse_timestamp("2026-02-01T00:00:00Z") == parse_timestamp("2026-02-01T05:30:00+05:30") == expect
    assert parse_timestamp("2026-02-01 00:00:00") == expect  # naive: UTC
    assert parse_timestamp(datetime(2026, 2, 1)) == expect
    assert parse_timestamp(" 1769904000.25 ") == expect + timedelta(seconds=0.25)
    # a day of clock skew is tolerated, more is not
    assert validate_event(ev(ts=(NOW + timedelta(hours=23)).timestamp()), now=NOW).ts > NOW


def test_derived_event_ids_follow_the_natural_key() -> None:
    a = validate_event(ev(), now=NOW)
    assert a.event_id == derive_event_id("u1", "p1", "view", datetime(2026, 2, 1, tzinfo=timezone.utc))
    assert len(a.event_id) == 32
    # the same event written differently (ISO, padded, CSV string) is the same event
    assert validate_event(ev(ts="2026-02-01T00:00:00+00:00", user=" u1 "), now=NOW).event_id == a.event_id
    assert validate_event(ev(ts=str(T0)), now=NOW).event_id == a.event_id
    others = {
        validate_event(e, now=NOW).event_id
        for e in (ev(user="u2"), ev(product="p2"), ev(event="click"), ev(ts=T0 + 1), ev(ts=T0 + 0.000001))
    }
    assert len(others) == 5 and a.event_id not in others
    assert validate_event(ev(event_id="evt-7"), now=NOW).event_id == "evt-7"


def test_summary_json_has_exactly_the_four_keys_and_caps_errors() -> None:
    s = IngestSummary(stored=3, duplicates=1, rejected=150, errors=tuple((i, "bad") for i in range(150)))
    d = s.to_dict()
    assert list(d) == ["stored", "duplicates", "rejected", "errors"]
    assert len(d["errors"]) == 100 and d["errors"][0] == {"row": 0, "reason": "bad"}
    assert d["rejected"] == 150


# --------------------------------------------------------------------------- record_events on both databases
def test_record_events_stores_the_good_and_reports_the_bad(store: HistoryStore) -> None:
    events = [
        ev(product="p1"),
        ev(product="p2", event="purchase", session_id="s1", query="red shoes"),
        ev(event="wishlist"),
        ev(product="p1"),  # the same event again in the same call
        ev(user="", product="p3"),
        ev(product="p4", ts=(NOW + timedelta(days=30)).timestamp()),
        ev(user="u2", product="p9", event="click", event_id="evt-1"),
    ]
    s = record_events(store, events, now=NOW, batch_size=2)
    assert (s.stored, s.duplicates, s.rejected) == (3, 1, 3)
    assert [row for row, _ in s.errors] == [2, 4, 5]
    assert "unknown event type 'wishlist'" in s.errors[0][1]
    assert "missing user_id" in s.errors[1][1] and "future" in s.errors[2][1]
    assert store.count_events("u1") == 2 and store.count_events("u2") == 1

    again = record_events(store, events, now=NOW)
    assert (again.stored, again.duplicates, again.rejected) == (0, 4, 3)
    assert store.count_events() == 3


def test_max_errors_caps_the_list_but_not_the_count(store: HistoryStore) -> None:
    s = record_events(store, [ev(event="bad")] * 30, now=NOW, max_errors=5)
    assert s.rejected == 30 and len(s.errors) == 5 and s.stored == 0


# --------------------------------------------------------------------------- files
def test_import_dev_events_twice_stores_nothing_the_second_time(db_url: str, shared_data: Path) -> None:
    """Through the CLI: ``fusionrank db upgrade`` then ``events import FILE --json`` twice."""
    from workers.cli import app

    runner = CliRunner()
    path = str(shared_data / DEV_EVENTS)
    r = runner.invoke(app, ["db", "upgrade", "--sql-url", db_url])
    assert r.exit_code == 0, r.output
    first = runner.invoke(app, ["events", "import", path, "--json", "--sql-url", db_url, "--no-progress"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == {"stored": DEV_EVENTS_ROWS, "duplicates": 0, "rejected": 0, "errors": []}
    second = runner.invoke(app, ["events", "import", path, "--json", "--sql-url", db_url])
    assert json.loads(second.stdout) == {"stored": 0, "duplicates": DEV_EVENTS_ROWS, "rejected": 0, "errors": []}
    with HistoryStore(db_url) as s:
        assert s.count_events() == DEV_EVENTS_ROWS
        assert s.count_users() == 1073


def test_csv_errors_carry_line_numbers(store: HistoryStore, tmp_path: Path) -> None:
    p = tmp_path / "events.csv"
    p.write_text(
        "user_id,product_id,event,timestamp,session_id\n"
        f"u1,p1,view,{T0},s1\n"
        f"u1,p2,clik,{T0}\n"
        f"u1,,view,{T0}\n"
        f"u1,p3,view,{T0},s1,extra\n"
        f"u2,p1,purchase,2026-02-03T10:00:00Z,\n"
    )
    s = import_events_file(store, p, now=NOW)
    assert (s.stored, s.duplicates, s.rejected) == (2, 0, 3)
    assert [row for row, _ in s.errors] == [3, 4, 5]
    assert "unknown event type 'clik'" in s.errors[0][1] and "missing product_id" in s.errors[1][1]
    assert "6 fields, the header has 5" in s.errors[2][1]


def test_jsonl_and_gzip_import_and_the_same_events_in_another_format_are_duplicates(store: HistoryStore, tmp_path: Path) -> None:
    rows = [ev(user=f"u{i % 3}", product=f"p{i}", event="click", ts=T0 + i) for i in range(20)]
    csv_path = tmp_path / "a.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["user_id", "product_id", "event", "timestamp"])
        w.writeheader()
        w.writerows(rows)
    assert import_events_file(store, csv_path, now=NOW).stored == 20

    jl = tmp_path / "b.jsonl.gz"
    with gzip.open(jl, "wt") as f:
        for r in rows:  # same events, ISO timestamps and "type" instead of "event"
            iso = datetime.fromtimestamp(r["timestamp"], timezone.utc).isoformat()
            f.write(json.dumps({"user_id": r["user_id"], "product_id": r["product_id"], "type": "click", "ts": iso}) + "\n")
        f.write("\n{not json\n[1, 2]\n")
        f.write(json.dumps(ev(user="u9", product=12889, ts=T0)) + "\n")  # numeric ids are fine
    s = import_events_file(store, jl, now=NOW)
    assert (s.stored, s.duplicates, s.rejected) == (1, 20, 2)
    assert [row for row, _ in s.errors] == [22, 23]
    assert "invalid JSON" in s.errors[0][1] and "expected a JSON object, got list" in s.errors[1][1]
    assert store.recent_events("u9", 5)[0][0] == "12889"


def test_file_level_problems_raise_config_errors(store: HistoryStore, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        import_events_file(store, tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match=r"must end in \.csv, \.jsonl or \.ndjson"):
        import_events_file(store, tmp_path / "events.parquet")
    bad = tmp_path / "bad.csv"
    bad.write_text("user,product_id,event,timestamp\nu1,p1,view,1\n")
    with pytest.raises(ConfigError, match=r"has no column user_id; its header is"):
        import_events_file(store, bad)
    assert store.count_events() == 0


def test_cli_refuses_an_unmigrated_database_with_one_clear_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from workers.cli import main

    f = tmp_path / "e.csv"
    f.write_text(f"user_id,product_id,event,timestamp\nu1,p1,view,{T0}\n")
    monkeypatch.setattr(sys, "argv", ["fusionrank", "events", "import", str(f), "--json"])  # default SQLite in the data dir
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no history database" in err and "fusionrank db upgrade" in err

    # `db upgrade` with no URL uses the settings' default: then the same import works
    from workers.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    assert "up to date" in runner.invoke(app, ["db", "current"]).stdout
    r = runner.invoke(app, ["events", "import", str(f)])
    assert r.exit_code == 0 and "stored 1, duplicates 0, rejected 0" in r.stdout
    from rerank.history.store import _script_directory, head_revision

    previous = _script_directory().get_revision(head_revision()).down_revision
    r = runner.invoke(app, ["db", "downgrade"])
    assert r.exit_code == 0 and f"at revision {previous}" in r.stdout
    r = runner.invoke(app, ["events", "import", str(f)])
    assert isinstance(r.exception, NotMigratedError)


# --------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_two_processes_importing_at_once_lose_nothing_and_duplicate_nothing(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    n, overlap = 6000, 3000
    events = [ev(user=f"u{i % 97}", product=f"p{i % 501}", event=("view", "click")[i % 2], ts=T0 + i) for i in range(n + overlap)]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for path, rows in ((a, events[:n]), (b, list(reversed(events[n - overlap :])))):  # B walks the overlap backwards
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["user_id", "product_id", "event", "timestamp"])
            w.writeheader()
            w.writerows(rows)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=import_in_process, args=(db_url, str(p), 200, barrier, results)) for p in (a, b)]
    for p in procs:
        p.start()
    got = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    stored = sum(g[1] for g in got)
    duplicates = sum(g[2] for g in got)
    assert stored == n + overlap  # nothing lost
    assert duplicates == overlap  # each shared event stored by exactly one of them
    assert all(g[3] == 0 for g in got)
    with HistoryStore(db_url) as s:
        assert s.count_events() == n + overlap  # nothing twice
        assert s.count_users() == 97

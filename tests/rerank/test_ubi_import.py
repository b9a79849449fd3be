"""UBI 1.3 logs in: validation against the shipped JSON Schemas, the import into SQLite and PostgreSQL (idempotent,
bad input counted, history fed), the CLI, and --from-opensearch on the real node."""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rerank.history import ubi
from rerank.history.store import HistoryStore
from rerank.history.ubi_ingest import import_ubi, import_ubi_path
from tests.rerank import history_support

db_url = history_support.db_url
store = history_support.store

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)
SPEC = Path(__file__).resolve().parents[3] / "shared" / "ubi-spec" / "schema-1.3.0"


def q(qid: str, text: str = "black shoes", hits=("p1", "p2", "p3"), ts: str = "2026-11-01T10:00:00Z", **extra) -> dict:
    return {"query_id": qid, "user_query": text, "client_id": f"c-{qid}", "timestamp": ts, "query_response_hit_ids": list(hits), **extra}


def e(action: str, qid: str | None, obj: str | None, pos: int | None, ts: str = "2026-11-01T10:00:05Z", user: str | None = "u1", **extra) -> dict:
    attrs: dict = {}
    if obj is not None:
        attrs["object"] = {"object_id": obj, "object_id_field": "product_id"}
    if pos is not None:
        attrs["position"] = {"ordinal": pos}
    rec = {"action_name": action, "timestamp": ts, "client_id": "c1", "event_attributes": attrs, **extra}
    if qid is not None:
        rec["query_id"] = qid
    if user is not None:
        rec["user_id"] = user
    return rec


# --------------------------------------------------------------------------- validation against the schemas
def _schemas():
    import jsonschema

    ev = json.loads((SPEC / "event.schema.json").read_text())
    # the two stated readings: action_name's oneOf as anyOf; a position without ordinal/xy is kept (no position)
    ev["properties"]["action_name"]["anyOf"] = ev["properties"]["action_name"].pop("oneOf")
    attrs = ev["properties"]["event_attributes"]
    attrs["required"] = []
    pos = attrs["properties"]["position"]
    pos["anyOf"] = pos.pop("oneOf") + [{"type": "object", "not": {"anyOf": [{"required": ["ordinal"]}, {"required": ["xy"]}]}}]
    qs = json.loads((SPEC / "query.request.schema.json").read_text())
    return jsonschema.Draft202012Validator(ev), jsonschema.Draft202012Validator(qs)


GOOD_EVENTS = [
    e("click", "q1", "p1", 1),
    e("impression", "q1", "p2", 2),
    e("add_to_cart", "q1", 17, 3),  # an integer object id
    e("page_exit", None, None, None, user=None),  # a custom action, no object, no position
    e("purchase", "q1", "p1", None),  # no position: kept
    {**e("click", "q1", "p1", 1), "event_attributes": {"object": {"object_id": "p1"}, "position": {}}},  # the spec's own sample has {}
    {**e("click", "q1", "p1", None), "event_attributes": {"object": {"object_id": "p1"}, "position": {"xy": {"x": 1.5, "y": 2}}}},
    {**e("view", "q1", "p1", 1), "session_id": "s" * 100, "message": "m" * 1024, "message_type": "INTERACTION"},
]
BAD_EVENTS = [
    ({k: v for k, v in e("click", "q1", "p1", 1).items() if k != "action_name"}, "missing action_name"),
    ({k: v for k, v in e("click", "q1", "p1", 1).items() if k != "timestamp"}, "missing timestamp"),
    (e("c" * 101, "q1", "p1", 1), "action_name is longer than 100"),
    (e(7, "q1", "p1", 1), "action_name must be a string"),  # type: ignore[arg-type]
    (e("click", "q" * 101, "p1", 1), "query_id is longer than 100"),
    (e("click", 5, "p1", 1), "query_id must be a string"),  # type: ignore[arg-type]
    ({**e("click", "q1", "p1", 1), "event_attributes": {"object": {"object_id": 1.5}, "position": {"ordinal": 1}}}, "object_id must be a string or an integer"),
    ({**e("click", "q1", "p1", 1), "event_attributes": {"object": {}, "position": {"ordinal": 1}}}, "has no object_id"),
    ({**e("click", "q1", "p1", 1), "event_attributes": {"position": {"ordinal": "1"}}}, "ordinal must be an integer"),
    ({**e("click", "q1", "p1", 1), "event_attributes": "p1"}, "event_attributes must be an object"),
    ({**e("click", "q1", "p1", 1), "message": "m" * 1025}, "message is longer than 1024"),
]
GOOD_QUERIES = [q("q1"), {"user_query": "shoes"}, q("q2", hits=()), {**q("q3"), "query_attributes": {"experiment": "a"}, "user_id": "u9"}]
BAD_QUERIES = [
    ({"query_id": "q1"}, "missing user_query"),
    ({**q("q1"), "user_query": 3}, "user_query must be a string"),
    ({**q("q1"), "query_response_hit_ids": [1, 2]}, "items must be strings"),
    ({**q("q1"), "query_response_hit_ids": "p1"}, "must be an array"),
    ({**q("q1"), "client_id": "c" * 101}, "client_id is longer than 100"),
    ({**q("q1"), "query_attributes": []}, "query_attributes must be an object"),
]


def test_the_validator_agrees_with_jsonschema_on_the_shipped_schemas() -> None:
    ev_schema, q_schema = _schemas()
    for rec in GOOD_EVENTS:
        assert ev_schema.is_valid(rec), list(ev_schema.iter_errors(rec))
        ubi.validate_event(rec, now=NOW)
    for rec, reason in BAD_EVENTS:
        assert not ev_schema.is_valid(rec), rec
        with pytest.raises(ubi.UbiRejected, match=reason):
            ubi.validate_event(rec, now=NOW)
    for rec in GOOD_QUERIES:
        assert q_schema.is_valid(rec)
        ubi.validate_query(rec, now=NOW)
    for rec, reason in BAD_QUERIES:
        assert not q_schema.is_valid(rec), rec
        with pytest.raises(ubi.UbiRejected, match=reason):
            ubi.validate_query(rec, now=NOW)


def _mutations(rec: dict) -> list[dict]:
    """``rec`` with each field, at every level, removed, nulled, emptied, retyped, at and over its length limit, plus an
    unknown key at every level."""
    import copy

    values = [None, "", "x", "x" * 100, "x" * 101, "x" * 256, "x" * 257, "x" * 1025, 0, 7, -1, True, 1.5, [], ["p1"], {}, {"ordinal": 2},
              "2026-11-01T10:00:05Z", "2026-11-01T10:00:05", "2030-01-01T00:00:00Z", "yesterday"]
    out = []

    def walk(node: dict, path: tuple) -> None:
        for key in [*node, "extra_key"]:
            for v in [..., *values]:  # ...: the key removed
                m = copy.deepcopy(rec)
                target = m
                for k in path:
                    target = target[k]
                if v is ...:
                    if key not in target:
                        continue
                    del target[key]
                else:
                    target[key] = v
                out.append(m)
            if isinstance(node.get(key), dict):
                walk(node[key], (*path, key))

    walk(rec, ())
    return out


def test_the_fast_event_check_answers_as_the_field_by_field_one_on_every_mutation(monkeypatch) -> None:
    """validate_event's fast path takes the common shape itself and hands everything else to validate_event_checked: on
    thousands of mutated events both give the same event, or the same rejection (the reason named by the checked one)."""
    bench_shape = {"action_name": "impression", "query_id": "sq0-1", "client_id": "c-u1", "user_id": "u1", "application": "bench",
                   "message_type": "INTERACTION", "timestamp": "2026-11-01T10:00:05Z",
                   "event_attributes": {"object": {"object_id": "p5", "object_id_field": "product_id", "object_id_type": "product"},
                                        "position": {"ordinal": 5}}}
    records = [r for base in (bench_shape, *GOOD_EVENTS, *(b for b, _ in BAD_EVENTS)) for r in _mutations(base)]
    assert len(records) > 3000
    checked_calls = []
    real_checked = ubi.validate_event_checked
    monkeypatch.setattr(ubi, "validate_event_checked", lambda raw, *, now: checked_calls.append(1) or real_checked(raw, now=now))
    fast = accepted = 0
    for rec in records:
        for _ in range(2):  # the second time its timestamp is known (the fast path needs a parsed one)
            try:
                want = real_checked(rec, now=NOW)
            except ubi.UbiRejected as err:
                with pytest.raises(ubi.UbiRejected) as got:
                    ubi.validate_event(rec, now=NOW)
                assert str(got.value) == str(err), rec
                continue
            n = len(checked_calls)
            assert ubi.validate_event(rec, now=NOW) == want, rec
            accepted += 1
            fast += len(checked_calls) == n
    assert accepted > 1000 and fast > 500  # both paths are exercised, and both ways of answering
    ubi.validate_event(bench_shape, now=NOW)
    n = len(checked_calls)
    assert ubi.validate_event(bench_shape, now=NOW).position == 5 and len(checked_calls) == n  # the common shape: fast
    later = NOW + timedelta(days=400)  # the same (cached) timestamp against another clock: still checked against it
    with pytest.raises(ubi.UbiRejected, match="in the future"):
        ubi.validate_event({**bench_shape, "timestamp": "2028-01-01T00:00:00Z"}, now=later)
        ubi.validate_event({**bench_shape, "timestamp": "2028-01-01T00:00:00Z"}, now=NOW)


def test_an_event_is_its_own_ubi_events_row() -> None:
    from rerank.history.ubi_ingest import _E_COLS

    assert tuple("action_name" if f == "action" else f for f in ubi.UbiEvent._fields) == _E_COLS


def test_the_1_3_schema_as_published_rejects_click_and_we_do_not() -> None:
    import jsonschema

    raw = jsonschema.Draft202012Validator(json.loads((SPEC / "event.schema.json").read_text()))
    rec = e("click", "q1", "p1", 1)
    assert any("oneOf" in str(err.validator) for err in raw.iter_errors(rec))  # both branches match "click"
    assert ubi.validate_event(rec, now=NOW).action == "click"


def test_future_timestamps_are_rejected_and_event_ids_follow_the_content() -> None:
    with pytest.raises(ubi.UbiRejected, match="in the future"):
        ubi.validate_event(e("click", "q1", "p1", 1, ts=(NOW + timedelta(days=2)).isoformat()), now=NOW)
    ubi.validate_event(e("click", "q1", "p1", 1, ts=(NOW + timedelta(hours=23)).isoformat()), now=NOW)  # a day of skew
    a = ubi.validate_event(e("click", "q1", "p1", 1), now=NOW)
    assert a.event_id == ubi.validate_event(e("click", "q1", "p1", 1, ts="2026-11-01T11:00:05+01:00"), now=NOW).event_id
    others = {ubi.validate_event(x, now=NOW).event_id for x in (e("click", "q1", "p2", 2), e("click", "q2", "p1", 1), e("view", "q1", "p1", 1),
                                                                 e("click", "q1", "p1", 1, ts="2026-11-01T10:00:06Z"))}
    assert len(others) == 4 and a.event_id not in others
    assert ubi.validate_query({"user_query": "x"}, now=NOW).query_id.startswith("derived-")


# --------------------------------------------------------------------------- the import (SQLite and PostgreSQL)
def _write_log(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    queries = [q("q1", hits=("p1", "p2", "p3")), q("q2", "red dress", hits=("p4", "p1"), user_id="u2"), q("q1", hits=("p1", "p2", "p3"))]
    with gzip.open(d / "ubi_queries.jsonl.gz", "wt") as f:
        for rec in queries:
            f.write(json.dumps(rec) + "\n")
        f.write("{not json\n")  # line 4
    events = [
        e("impression", "q1", "p1", 1), e("impression", "q1", "p2", 2), e("click", "q1", "p2", 2),
        e("purchase", "q2", "p4", 1, user="u2"),
        e("click", "q-never", "p3", 1),  # orphaned
        e("click", "q2", "p1", None, user="u2"),  # no position
        e("click", "q1", "p1", 1, ts="2027-06-01T00:00:00Z"),  # future: rejected
        e("click", "q1", "p-gone", 3),  # a product the catalog does not have
        e("impression", "q1", "p1", 1),  # the same event twice in one file
    ]
    with open(d / "ubi_events.jsonl", "w") as f:
        for rec in events[:5]:
            f.write(json.dumps(rec) + "\n")
        f.write("[1, 2]\n")  # line 6
        for rec in events[5:]:
            f.write(json.dumps(rec) + "\n")
    return d


def test_import_stores_searches_positions_and_events_once_and_counts_the_bad(store: HistoryStore, tmp_path: Path) -> None:
    d = _write_log(tmp_path / "log")
    catalog = {"p1", "p2", "p3", "p4"}
    s = import_ubi_path(store, d, catalog_ids=catalog, now=NOW, batch_size=3)
    assert (s.queries_stored, s.queries_duplicate) == (2, 1)
    assert (s.events_stored, s.events_duplicate) == (7, 1)
    assert s.rejected == 3
    assert [(src, line) for src, line, _ in s.errors] == [("ubi_queries.jsonl.gz", 4), ("ubi_events.jsonl", 6), ("ubi_events.jsonl", 8)]
    assert "invalid JSON" in s.errors[0][2] and "expected a JSON object" in s.errors[1][2] and "in the future" in s.errors[2][2]
    assert (s.orphaned, s.without_position, s.unknown_products) == (1, 1, 1)
    assert store.count_rows("ubi_queries") == 2 and store.count_rows("ubi_shown") == 5 and store.count_rows("ubi_events") == 7
    # history: click q1/p2 (u1), purchase q2/p4 (u2), orphan click p3 (u1), click without position p1 (u2); not p-gone, not impressions
    assert s.history_events_stored == 4
    assert sorted(p for p, _, _ in store.recent_events("u1", 10)) == ["p2", "p3"]
    assert sorted(t for _, t, _ in store.recent_events("u2", 10)) == ["click", "purchase"]

    again = import_ubi_path(store, d, catalog_ids=catalog, now=NOW)
    assert (again.queries_stored, again.events_stored, again.history_events_stored) == (0, 0, 0)
    assert (again.queries_duplicate, again.events_duplicate, again.rejected) == (3, 8, 3)
    assert store.count_rows("ubi_events") == 7 and store.count_events() == 4

    queries, events = store.ubi_log()
    assert {x.query_id: x.hit_ids for x in queries} == {"q1": ("p1", "p2", "p3"), "q2": ("p4", "p1")}
    assert sorted((x.action, x.query_id, x.position) for x in events if x.action == "click")[0] == ("click", "q-never", 1)


def test_an_event_before_its_query_is_not_orphaned_once_the_query_is_stored(store: HistoryStore) -> None:
    s1 = import_ubi(store, [("a", 1, e("click", "q1", "p1", 1))], now=NOW)
    assert s1.orphaned == 1  # its query was not known at the time
    s2 = import_ubi(store, [("b", 1, q("q1")), ("b", 2, e("click", "q1", "p2", 2))], now=NOW)
    assert s2.orphaned == 0 and s2.queries_stored == 1


def test_cli_imports_a_ubi_folder_and_csv_still_works(db_url: str, tmp_path: Path) -> None:
    from workers.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade", "--sql-url", db_url]).exit_code == 0
    d = _write_log(tmp_path / "log")
    cat = tmp_path / "catalog.csv"
    cat.write_text("product_id,title\np1,a\np2,b\np3,c\np4,d\n")
    r = runner.invoke(app, ["events", "import", str(d), "--json", "--sql-url", db_url, "--catalog", str(cat)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["events_stored"] == 7 and out["rejected"] == 3  # the 2027 event is in the future of the real clock too
    assert out["unknown_products"] == 1 and out["orphaned_events"] == 1
    assert out["errors"][0] == {"source": "ubi_queries.jsonl.gz", "line": 4, "reason": out["errors"][0]["reason"]}
    r2 = runner.invoke(app, ["events", "import", str(d), "--json", "--sql-url", db_url])
    assert json.loads(r2.output)["events_stored"] == 0
    csv_file = tmp_path / "ev.csv"
    csv_file.write_text("user_id,product_id,event,timestamp\nu7,p1,click,1767352534\n")
    r3 = runner.invoke(app, ["events", "import", str(csv_file), "--json", "--sql-url", db_url])
    assert json.loads(r3.output)["stored"] == 1


@pytest.mark.opensearch
def test_from_opensearch_reads_the_ubi_indices_of_a_real_node(opensearch_node, tmp_path: Path) -> None:
    from opensearchpy import helpers

    from workers.cli import app

    eng = opensearch_node.engine()
    client = eng.client
    qi, ei = "ubi_queries_fr_test", "ubi_events_fr_test"
    for idx in (qi, ei):
        if client.indices.exists(index=idx):
            client.indices.delete(index=idx)
    d = _write_log(tmp_path / "log")
    records = list(ubi.iter_records(d))
    docs = [r for _, _, r in records if isinstance(r, dict)]
    # as the UBI plugin writes them: a query's timestamp as epoch milliseconds
    qdocs = [{**x, "timestamp": 1_761_991_200_000} for x in docs if "action_name" not in x]
    edocs = [x for x in docs if "action_name" in x]
    helpers.bulk(client, [{"_index": qi, "_source": x} for x in qdocs] + [{"_index": ei, "_source": x} for x in edocs], refresh=True)
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade", "--sql-url", url]).exit_code == 0
    args = ["events", "import", "--from-opensearch", "--opensearch-url", opensearch_node.url, "--queries-index", qi, "--events-index", ei,
            "--json", "--sql-url", url]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["queries_stored"] == 2 and out["queries_duplicate"] == 1
    assert out["events_stored"] == 7 and out["events_duplicate"] == 1 and out["rejected"] == 1 and out["orphaned_events"] == 1 and out["events_without_position"] == 1
    again = json.loads(runner.invoke(app, args).output)
    assert again["events_stored"] == 0 and again["queries_stored"] == 0
    with HistoryStore(url) as s:
        assert s.count_rows("ubi_shown") == 5
    for idx in (qi, ei):
        client.indices.delete(index=idx)
    eng.close()


def test_text_with_tabs_newlines_and_backslashes_round_trips(store: HistoryStore) -> None:
    odd = "shoes\twith\\back\nslash\r"
    s = import_ubi(store, [("a", 1, q("q1", text=odd, hits=("p\t1", "p\\2"))), ("a", 2, e("click", "q1", "p\t1", 1))], now=NOW)
    assert s.queries_stored == 1 and s.events_stored == 1
    queries, events = store.ubi_log()
    assert queries[0].user_query == odd and queries[0].hit_ids == ("p\t1", "p\\2")
    assert events[0].object_id == "p\t1" and events[0].ts == datetime(2026, 11, 1, 10, 0, 5, tzinfo=timezone.utc)


def test_a_batch_of_searches_shown_lists_and_events_is_stored_whole_or_not_at_all(store: HistoryStore) -> None:
    from indexing.errors import HistoryError
    from rerank.history.ubi_ingest import _E_COLS, _Q_COLS, _S_COLS

    ts = datetime(2026, 11, 1, 10, tzinfo=timezone.utc)
    queries = ("ubi_queries", _Q_COLS, [("q1", "shoes", "c1", None, None, ts, 2)])
    shown = ("ubi_shown", _S_COLS, [("q1", "1", "p1"), ("q1", "2", "p2")])
    good = ("ubi_events", _E_COLS, [("e1", "click", ts, "q1", "p1", 1, "c1", "u1", None, None)])
    bad = ("ubi_events", _E_COLS, [("e2", None, ts, "q1", "p1", 1, "c1", "u1", None, None)])  # action_name is NOT NULL
    history = [{"event_id": "e1", "user_id": "u1", "product_id": "p1", "type": "click", "ts": ts, "query": "shoes"}]
    with pytest.raises(HistoryError):
        store.insert_ubi_batch([queries, shown, bad], history)
    assert [store.count_rows(t) for t in ("ubi_queries", "ubi_shown", "ubi_events")] == [0, 0, 0] and store.count_events() == 0
    assert store.insert_ubi_batch([queries, shown, good], history) == ([1, 2, 1], ["e1"])
    assert store.insert_ubi_batch([queries, shown, good], history) == ([0, 0, 0], [])  # idempotent
    assert store.insert_ubi_batch([queries, ("ubi_shown", _S_COLS, [])]) == ([0, 0], [])

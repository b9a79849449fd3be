"""UBI out: every /search and /rerank answer carries a query_id (the caller's, from ext.ubi, or a new one), the service
records what it served at which position into the store's UBI tables (off the request path, fail-open and counted),
and UBI events sent to POST /events with that id are joined to it by the click models."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from tests.workers.service.world import API_KEY

H = {"X-API-Key": API_KEY}


def _shown(store, qid):
    with store.engine.connect() as conn:
        q = conn.exec_driver_sql("SELECT user_query, client_id, user_id, hits FROM ubi_queries WHERE query_id = ?", (qid,)).one_or_none()
        shown = [p for _, p in sorted(conn.exec_driver_sql("SELECT position, product_id FROM ubi_shown WHERE query_id = ?", (qid,)).all())]
    return q, shown


@pytest.fixture()
def client(service_world):
    st = service_world.state()
    with TestClient(__import__("workers.service.app", fromlist=["create_app"]).create_app(st)) as c:
        yield c, st


def test_search_answers_carry_a_query_id_and_what_was_served_is_recorded(client, service_world):
    c, st = client
    r = c.post("/search", json={"query": "black shoes", "size": 5, "user_id": "u1", "client_id": "browser-7"}, headers=H)
    assert r.status_code == 200
    body = r.json()
    qid = body["query_id"]
    assert uuid.UUID(qid) and body["fusionrank"]["query_id"] == qid
    mine = c.post("/search", json={"query": "red dress", "size": 3, "query_id": "shop-q-1"}, headers=H).json()
    via_ext = c.post("/search", json={"query": "blue jeans", "size": 3, "ext": {"ubi": {"query_id": "shop-q-2", "client_id": "c9"}}}, headers=H).json()
    assert mine["query_id"] == "shop-q-1" and via_ext["query_id"] == "shop-q-2"
    assert st.ubi_recorder.flush()
    q, shown = _shown(service_world.store, qid)
    assert tuple(q) == ("black shoes", "browser-7", "u1", 5)
    assert shown == [h["id"] for h in body["hits"]]  # position by position, the served order
    assert _shown(service_world.store, "shop-q-2")[0][1] == "c9"
    assert _shown(service_world.store, "shop-q-1")[1] == [h["id"] for h in mine["hits"]]
    assert 'fusionrank_ubi_searches{outcome="written"}' in c.get("/metrics", headers=H).text


def test_rerank_takes_the_responses_ubi_query_id_and_answers_with_it(client, service_world):
    c, st = client
    resp = {"hits": {"hits": [{"_id": "p0", "_score": 3.0}, {"_id": "p10", "_score": 2.0}, {"_id": "p11", "_score": 1.0}]},
            "ext": {"ubi": {"query_id": "os-ubi-1"}}}
    r = c.post("/rerank", json={"query": "black shoes", "response": resp}, headers=H)
    assert r.status_code == 200
    out = r.json()
    assert out["ext"]["ubi"]["query_id"] == "os-ubi-1" == out["fusionrank"]["query_id"]
    fresh = c.post("/rerank", json={"query": "black shoes", "hits": resp["hits"]["hits"]}, headers=H).json()
    assert uuid.UUID(fresh["fusionrank"]["query_id"]) and fresh["ext"]["ubi"]["query_id"] == fresh["fusionrank"]["query_id"]
    assert st.ubi_recorder.flush()
    assert _shown(service_world.store, "os-ubi-1")[1] == [h["_id"] for h in out["hits"]["hits"]]
    r = c.post("/rerank", json={"query": "x", "hits": resp["hits"]["hits"], "query_id": "q" * 101}, headers=H)
    assert r.status_code == 422 and "query_id" in r.json()["detail"]


def test_ubi_events_posted_with_the_query_id_are_joined_to_what_was_served(client, service_world):
    from rerank.datasets import clicks as C

    c, st = client
    body = c.post("/search", json={"query": "leather", "size": 4, "user_id": "shopper-ubi", "client_id": "b1"}, headers=H).json()
    qid, hits = body["query_id"], [h["id"] for h in body["hits"]]
    from datetime import datetime, timezone

    ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # a page sends its events' times: a retried POST stores nothing twice
    ev = lambda action, pos: {"action_name": action, "query_id": qid, "client_id": "b1", "user_id": "shopper-ubi", "timestamp": ts,  # noqa: E731
                              "event_attributes": {"object": {"object_id": hits[pos - 1], "object_id_field": "product_id"}, "position": {"ordinal": pos}}}
    events = [ev("impression", 1), ev("impression", 2), ev("click", 2),
              {"user_id": "shopper-ubi", "product_id": "p3", "type": "view"},  # a plain event beside them
              {"action_name": "click", "query_id": qid, "event_attributes": {"position": {"ordinal": "two"}}},  # rejected: not an integer
              {"action_name": "click", "client_id": "b1", "query_id": qid, "timestamp": "2999-01-01T00:00:00Z"}]  # rejected: future
    r = c.post("/events", json={"events": events}, headers=H)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["stored"] == 4 and d["rejected"] == 2 and [e["row"] for e in d["errors"]] == [4, 5]
    again = c.post("/events", json={"events": events[:3]}, headers=H).json()
    assert again["stored"] == 0 and again["duplicates"] == 3  # idempotent
    assert st.ubi_recorder.flush()
    sessions, _ = C.sessions_from_log(*service_world.store.ubi_log())
    mine = [s for s in sessions if s.query_id == qid]
    assert len(mine) == 1 and mine[0].shown[:4] == tuple(hits) and mine[0].clicks == frozenset({1})
    prof = st.profiles.get_profile("shopper-ubi")
    assert hits[1] in prof.product_ids  # the click fed the user's history (and the cached profile was dropped)


def test_a_failing_store_never_fails_a_request_and_is_counted(service_world):
    from rerank.history.ubi_recorder import UbiRecorder
    from workers.service.app import create_app

    class Down:
        def insert_rows(self, *a, **k):
            raise ConnectionError("store down")

    st = service_world.state()
    st.ubi_recorder = UbiRecorder(Down())
    st.metrics.ubi_stats = st.ubi_recorder.stats
    with TestClient(create_app(st)) as c:
        for _ in range(3):
            assert c.post("/search", json={"query": "shoes", "size": 3}, headers=H).status_code == 200
        assert st.ubi_recorder.flush()
        assert st.ubi_recorder.stats()["failed"] == 3
        assert 'fusionrank_ubi_searches{outcome="failed"} 3.0' in c.get("/metrics", headers=H).text


def test_a_full_queue_drops_and_counts_instead_of_waiting():
    import threading

    from rerank.history.ubi_recorder import UbiRecorder

    gate = threading.Event()

    class Slow:
        def insert_rows(self, *a, **k):
            gate.wait(10)
            return 1

    rec = UbiRecorder(Slow(), max_queue=2, batch_size=1)
    results = [rec.record(f"q{i}", "x", ["a"]) for i in range(10)]
    assert results.count(False) >= 7 and rec.stats()["dropped"] == results.count(False)
    gate.set()
    assert rec.flush()
    rec.close()


def test_an_exploring_answer_draws_from_lower_in_the_models_order_and_records_what_it_showed(service_world):
    """FUSIONRANK_EXPLORE_SHARE: an exploring /search or /rerank keeps the model's top (before explore_from_position),
    fills the rest by rerank.explore's draw from the model's ranks down to explore_depth, says so, and the UBI tables
    get the order the shopper saw."""
    from rerank.explore import ExploreConfig, explore_order
    from workers.service.app import create_app

    cfg = ExploreConfig(share=1.0, from_position=2, depth=12)
    st = service_world.state(explore_share=cfg.share, explore_from_position=cfg.from_position, explore_depth=cfg.depth)
    with TestClient(create_app(st)) as c, TestClient(create_app(service_world.state())) as plain:
        model = [h["id"] for h in plain.post("/search", json={"query": "black shoes", "size": 12}, headers=H).json()["hits"]]
        assert len(model) == 12
        body = c.post("/search", json={"query": "black shoes", "size": 5, "query_id": "explore-s1"}, headers=H).json()
        order = explore_order(12, "explore-s1", cfg)[:5]
        served = [h["id"] for h in body["hits"]]
        assert served == [model[i] for i in order] and served[0] == model[0]
        assert [h["rank"] for h in body["hits"]] == [i + 1 for i in order]  # each hit keeps its model rank
        drawn = sum(pos != i for pos, i in enumerate(order))
        assert drawn > 0 and body["fusionrank"]["explore"] == {"from_position": 2, "depth": 12, "drawn": drawn}

        hits = [{"_id": f"p{i}", "_score": float(12 - i)} for i in range(12)]
        ranked = [h["_id"] for h in plain.post("/rerank", json={"query": "black shoes", "hits": hits}, headers=H).json()["hits"]["hits"]]
        out = c.post("/rerank", json={"query": "black shoes", "hits": hits, "top_k": 4, "query_id": "explore-r1"}, headers=H).json()
        order = explore_order(12, "explore-r1", cfg)[:4]
        assert [h["_id"] for h in out["hits"]["hits"]] == [ranked[i] for i in order]
        assert out["fusionrank"]["explore"]["drawn"] == sum(pos != i for pos, i in enumerate(order))
        off = plain.post("/search", json={"query": "black shoes", "size": 5, "query_id": "explore-s1"}, headers=H).json()
        assert "explore" not in off["fusionrank"] and [h["id"] for h in off["hits"]] == model[:5]  # off by default
    assert st.ubi_recorder.flush()
    assert _shown(service_world.store, "explore-s1")[1] == served
    assert _shown(service_world.store, "explore-r1")[1] == [h["_id"] for h in out["hits"]["hits"]]

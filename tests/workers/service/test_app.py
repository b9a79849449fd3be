"""The HTTP service over a real world (LocalEngine, MiniLM, untrained FusionRanker, SQLite history): auth,
the Cohere round trip, the OpenSearch-shaped /rerank, /events -> /search, limits, metrics, readiness."""

from __future__ import annotations

import base64
import copy
import io
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from indexing.errors import ConfigError
from tests.workers.service.world import ADMIN_KEY, API_KEY, INDEX, PRODUCTS

pytestmark = pytest.mark.slow

H = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def client(service_world):
    with TestClient(service_world.app()) as c:
        yield c


def _opensearch_response(world, query="black leather shoes", size=8):
    hits = world.engine.bm25_search(INDEX, query, size=size, source=["product_id", "title"])
    assert len(hits) >= 3
    return {"took": 4, "timed_out": False, "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {"total": {"value": len(hits), "relation": "eq"}, "max_score": hits[0].score,
                     "hits": [{"_index": INDEX, "_id": h.id, "_score": h.score, "_source": dict(h.source or {})} for h in hits]}}


def _png_b64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- probes + auth
def test_probes_need_no_key(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["model_version"]


def test_missing_and_wrong_keys_are_401_without_echoing_the_key(client):
    body = {"query": "shoes", "documents": ["black shoes"]}
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
    wrong = "wrong-key-ABCDEFGH"
    for headers in ({"X-API-Key": wrong}, {"Authorization": f"Bearer {wrong}"}):
        r = client.post("/v1/rerank", json=body, headers=headers)
        assert r.status_code == 401 and wrong not in r.text and API_KEY not in r.text
    assert client.post("/v1/rerank", json=body, headers=H).status_code == 200
    assert client.post("/v1/rerank", json=body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert client.get("/metrics").status_code == 401


def test_admin_endpoints_need_the_admin_key(client):
    assert client.post("/admin/reload").status_code == 401
    r = client.post("/admin/reload", headers=H)  # the ordinary key is not enough
    assert r.status_code == 401 and "admin" in r.json()["detail"]
    r = client.post("/admin/reload", headers={"X-API-Key": ADMIN_KEY})
    assert r.status_code == 200 and r.json() == {"status": "reloaded", "model_version": client.get("/readyz").json()["model_version"]}


def test_admin_disabled_without_admin_key_and_auth_required_to_start(service_world):
    with TestClient(service_world.app(admin_api_key=None)) as c:
        r = c.post("/admin/reload", headers=H)
        assert r.status_code == 403 and "FUSIONRANK_ADMIN_API_KEY" in r.json()["detail"]
    from workers.service.app import create_app

    with pytest.raises(ConfigError, match="--no-auth"):
        create_app(service_world.state(api_key=None))
    with TestClient(service_world.app(auth=False, api_key=None)) as c:  # --no-auth: open, explicitly
        assert c.post("/v1/rerank", json={"query": "shoes", "documents": ["a", "b"]}).status_code == 200


def test_admin_reindex_queues_a_real_celery_task(service_world, redis_url):
    import redis

    broker = f"{redis_url}/13"
    r = redis.Redis.from_url(broker)
    r.delete("admin")
    try:
        with TestClient(service_world.app(broker_url=broker)) as c:
            assert c.post("/admin/reindex", json={}, headers=H).status_code == 401
            resp = c.post("/admin/reindex", json={"batch_size": 64}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert resp.status_code == 202, resp.text
            out = resp.json()
            assert out["status"] == "queued" and out["task_id"] and out["job_id"]
        msgs = [json.loads(m) for m in r.lrange("admin", 0, -1)]
        assert [m["headers"]["task"] for m in msgs] == ["fusionrank.reindex.start"]
        assert msgs[0]["headers"]["id"] == out["task_id"]
    finally:
        r.delete("admin")


# ----------------------------------------------------------------------------- Cohere /v1/rerank
def test_cohere_round_trip_is_a_permutation_sorted_by_relevance(client):
    docs = [p[1] for p in PRODUCTS[:8]]
    r = client.post("/v1/rerank", json={"query": "black shoes", "documents": docs, "top_n": len(docs), "model": "rerank-english-v2.0"}, headers=H)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["meta"] == {"api_version": {"version": "1"}} and out["id"]
    idx = [x["index"] for x in out["results"]]
    assert sorted(idx) == list(range(len(docs)))
    scores = [x["relevance_score"] for x in out["results"]]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    assert all(isinstance(s, float) for s in scores)  # ML Commons casts relevance_score to Double
    assert out["fusionrank"]["degraded"] is None and out["fusionrank"]["model_version"]
    # an artifact saved without a training verdict serves its model and says it was never tested against the first stage
    assert out["fusionrank"]["serving"]["policy"] == "model" and "not tested" in out["fusionrank"]["serving"]["reason"]
    # what connector.post_process.cohere.rerank does: scores[index] = relevance_score, in document order
    by_doc = [None] * len(out["results"])
    for x in out["results"]:
        by_doc[x["index"]] = x["relevance_score"]
    assert None not in by_doc


def test_cohere_relevance_scores_are_json_numbers_ml_commons_reads_as_double(client):
    """ML Commons parses the connector's response with json-smart: a decimal literal over 18 characters becomes a
    BigDecimal and connector.post_process.cohere.rerank fails casting it to Double (the whole search fails)."""
    import re

    from workers.service.app import wire_score

    for x in (0.000676683925427717, 0.30000000000000004, 1.0 - 19 / 20, 1e-30 / 3, 1.0 - 1e-12, 0.0, 1.0):
        w = wire_score(x)
        assert len(json.dumps(w)) <= 18 and abs(w - x) <= 1e-8 * abs(x)
    docs = [p[1] for p in PRODUCTS[:20]]
    r = client.post("/v1/rerank", json={"query": "black shoes", "documents": docs}, headers=H)
    assert r.status_code == 200, r.text
    literals = re.findall(r'"relevance_score":\s*([^,}\s]+)', r.text)
    assert len(literals) == len(docs) and all(len(s) <= 18 for s in literals), literals


def test_cohere_top_n_documents_and_product_ids(client):
    docs = [{"text": "black running shoes for men", "id": "p0"}, "red summer dress", {"text": "socks"}, "leather belt"]
    r = client.post("/v1/rerank", json={"query": "shoes", "documents": docs, "top_n": 2, "return_documents": True, "user_id": "u1"}, headers=H)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 2 and len({x["index"] for x in res}) == 2
    texts = [d if isinstance(d, str) else d["text"] for d in docs]
    assert all(x["document"]["text"] == texts[x["index"]] for x in res)
    full = client.post("/v1/rerank", json={"query": "shoes", "documents": docs, "user_id": "u1"}, headers=H).json()["results"]
    assert [x["index"] for x in full[:2]] == [x["index"] for x in res]  # top_n keeps the head of the same order
    assert all("document" not in x for x in full)
    r = client.post("/v1/rerank", json={"query": "shoes", "documents": ["a", "b"], "product_ids": ["p0"]}, headers=H)
    assert r.status_code == 422 and "product_ids" in r.json()["detail"]
    r = client.post("/v1/rerank", json={"query": "shoes", "documents": ["a", "b"], "product_ids": ["p0", "no-such-product"]}, headers=H)
    assert r.status_code == 200 and sorted(x["index"] for x in r.json()["results"]) == [0, 1]


def test_unknown_user_is_a_cold_start(client):
    r = client.post("/v1/rerank", json={"query": "shoes", "documents": ["black shoes", "red dress"], "user_id": "never-seen"}, headers=H)
    assert r.status_code == 200 and r.json()["fusionrank"]["degraded"] is None


# ----------------------------------------------------------------------------- /rerank
def test_rerank_keeps_the_opensearch_response_shape(client, service_world):
    resp = _opensearch_response(service_world)
    r = client.post("/rerank", json={"query": "black leather shoes", "response": resp, "user_id": "u1"}, headers=H)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["took"] == 4 and out["_shards"] == resp["_shards"] and out["hits"]["total"] == resp["hits"]["total"]
    hits = out["hits"]["hits"]
    assert sorted(h["_id"] for h in hits) == sorted(h["_id"] for h in resp["hits"]["hits"])
    scores = [h["_score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and out["hits"]["max_score"] == scores[0]
    prev = {h["_id"]: h["_score"] for h in resp["hits"]["hits"]}
    assert all(h["_previous_score"] == prev[h["_id"]] and "_explanation" in h and h["_source"]["title"] for h in hits)
    assert out["fusionrank"]["degraded"] is None
    assert out["fusionrank"]["serving"]["policy"] == "model" and out["fusionrank"]["serving"]["signal"] is None
    top = client.post("/rerank", json={"query": "black leather shoes", "response": resp, "user_id": "u1", "top_k": 2}, headers=H).json()
    assert [h["_id"] for h in top["hits"]["hits"]] == [h["_id"] for h in hits[:2]]


def test_rerank_flags_ids_the_index_does_not_have(client):
    """An unknown product id is scored from what the call has (its first-stage score, no vectors) and named in
    ``fusionrank.unknown_ids`` (what the OpenSearch plugin passes on)."""
    hits = [{"_id": "p0", "_score": 2.0}, {"_id": "gone-42", "_score": 1.5}, {"_id": "p7", "_score": 1.0}]
    out = client.post("/rerank", json={"query": "black shoes", "hits": hits, "user_id": "u1"}, headers=H).json()
    assert out["fusionrank"]["degraded"] is None and out["fusionrank"]["unknown_ids"] == ["gone-42"]
    assert sorted(h["_id"] for h in out["hits"]["hits"]) == ["gone-42", "p0", "p7"]
    known = client.post("/rerank", json={"query": "black shoes", "hits": [hits[0], hits[2]]}, headers=H).json()
    assert known["fusionrank"]["unknown_ids"] == []


def test_rerank_hits_list_and_bad_inputs(client, service_world):
    resp = _opensearch_response(service_world)
    hits = resp["hits"]["hits"]
    r = client.post("/rerank", json={"query": "black leather shoes", "hits": hits}, headers=H)
    assert r.status_code == 200 and sorted(h["_id"] for h in r.json()["hits"]["hits"]) == sorted(h["_id"] for h in hits)
    r = client.post("/rerank", json={"query": "x", "hits": hits, "response": resp}, headers=H)
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]
    r = client.post("/rerank", json={"query": "x", "response": {"took": 1}}, headers=H)
    assert r.status_code == 422 and "hits.hits" in r.json()["detail"]
    dup = copy.deepcopy(hits[:2])
    dup[1]["_id"] = dup[0]["_id"]
    r = client.post("/rerank", json={"query": "x", "hits": dup}, headers=H)
    assert r.status_code == 422 and "duplicate" in r.json()["detail"]
    r = client.post("/rerank", json={"query": "x", "hits": [{"_id": "p0", "_score": "high"}]}, headers=H)
    assert r.status_code == 422 and "score" in r.json()["detail"]


def test_images_must_be_images(client, service_world):
    hits = _opensearch_response(service_world)["hits"]["hits"]
    not_image = base64.b64encode(b"this is plain text, not a picture").decode()
    r = client.post("/rerank", json={"query": "shoes", "hits": hits, "image": not_image}, headers=H)
    assert r.status_code == 422 and "not an image" in r.json()["detail"]
    r = client.post("/rerank", json={"query": "shoes", "hits": hits, "image": "%%% not base64 %%%"}, headers=H)
    assert r.status_code == 422 and "base64" in r.json()["detail"]
    r = client.post("/rerank", json={"query": "shoes", "hits": hits, "image": "data:image/png;base64," + _png_b64()}, headers=H)
    assert r.status_code == 200  # a real image with a text query: the text drives the rerank


# ----------------------------------------------------------------------------- /events -> /search
def test_events_then_search_sees_the_new_history(client):
    def history_top(user):
        r = client.post("/search", json={"query": "black shoes", "user_id": user, "size": 5}, headers=H)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["fusionrank"]["degraded"] is None and len(out["hits"]) == 5
        assert out["fusionrank"]["serving"]["policy"] == "model"
        assert [h["rank"] for h in out["hits"]] == [1, 2, 3, 4, 5]
        assert all("text_vec" not in h["source"] and h["source"]["product_id"] == h["id"] for h in out["hits"])
        return {x["product_id"] for x in out["hits"][0]["explanation"]["history_top"]}

    user = "u-events"
    assert history_top(user) == set()  # cold start, and now cached (ttl 600 s)
    ts = int(time.time()) - 60
    events = [{"user_id": user, "product_id": "p10", "type": "purchase", "ts": ts}, {"user_id": user, "product_id": "p2", "type": "click"},
              {"user_id": user, "product_id": "p3", "type": "teleport"}]
    r = client.post("/events", json={"events": events}, headers=H)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["stored"], out["duplicates"], out["rejected"]) == (2, 0, 1)
    assert out["errors"][0]["row"] == 2 and "teleport" in out["errors"][0]["reason"]
    assert history_top(user) == {"p10", "p2"}  # the cached empty profile was invalidated
    again = client.post("/events", json={"events": events[:1]}, headers=H).json()
    assert (again["stored"], again["duplicates"]) == (0, 1)  # same natural key (explicit ts): idempotent


def test_search_filters(client):
    r = client.post("/search", json={"query": "shoes", "size": 10, "filters": {"terms": {"colour": "Black"}, "ranges": {"price": {"lte": 70}}}}, headers=H)
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits and all(h["source"]["colour"] == "Black" and h["source"]["price"] <= 70 for h in hits)
    r = client.post("/search", json={"query": "  ", "size": 3}, headers=H)
    assert r.status_code == 422 and "empty query" in r.json()["detail"]
    assert client.post("/search", json={"query": "shoes", "size": 0}, headers=H).status_code == 422


# ----------------------------------------------------------------------------- limits and malformed input
def test_body_limit_from_content_length_and_from_a_chunked_stream(service_world):
    with TestClient(service_world.app(max_request_bytes=2048)) as c:
        big = {"query": "shoes", "documents": ["x" * 100] * 40}
        r = c.post("/v1/rerank", json=big, headers=H)
        assert r.status_code == 413 and "2048" in r.json()["detail"]

        def chunks():
            raw = json.dumps(big).encode()
            for i in range(0, len(raw), 500):
                yield raw[i : i + 500]

        r = c.post("/v1/rerank", content=chunks(), headers={**H, "content-type": "application/json"})
        assert r.status_code == 413 and "2048" in r.json()["detail"]
        small = json.dumps({"query": "shoes", "documents": ["black shoes", "red dress"]}).encode()
        r = c.post("/v1/rerank", content=iter([small[:20], small[20:]]), headers={**H, "content-type": "application/json"})
        assert r.status_code == 200, r.text  # a chunked body under the limit is read whole


def test_candidate_limit_and_malformed_bodies(service_world):
    with TestClient(service_world.app(max_candidates=3)) as c:
        r = c.post("/v1/rerank", json={"query": "shoes", "documents": ["a", "b", "c", "d"]}, headers=H)
        assert r.status_code == 422 and "limit is 3" in r.json()["detail"]
        hits = [{"_id": f"p{i}", "_score": 1.0} for i in range(4)]
        r = c.post("/rerank", json={"query": "shoes", "hits": hits}, headers=H)
        assert r.status_code == 422 and "limit is 3" in r.json()["detail"]
        r = c.post("/v1/rerank", content=b'{"query": "shoes", "documents": [', headers={**H, "content-type": "application/json"})
        assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
        r = c.post("/v1/rerank", json={"query": ["not", "a", "string"], "documents": "nope"}, headers=H)
        assert r.status_code == 422 and "query" in r.json()["detail"] and "documents" in r.json()["detail"]
        r = c.post("/v1/rerank", json={"query": "   ", "documents": ["a"]}, headers=H)
        assert r.status_code == 422 and "empty" in r.json()["detail"]


# ----------------------------------------------------------------------------- metrics
def test_metrics_count_requests_and_degraded_calls_without_keys(service_world):
    from rerank.reranker import Reranker

    w = service_world
    tiny = Reranker(w.engine, INDEX, w.artifact, text_encoder=w.text, history=w.profiles, budget_ms=1e-6)  # always over budget
    with TestClient(w.app(reranker=tiny)) as c:
        for _ in range(3):
            r = c.post("/v1/rerank", json={"query": "shoes", "documents": ["black shoes", "red dress", "socks"]}, headers=H)
            assert r.status_code == 200 and r.json()["fusionrank"]["degraded"] == "timeout"
            assert [x["index"] for x in r.json()["results"]] == [0, 1, 2]  # failed open: the given order
        c.post("/v1/rerank", json={"query": "shoes", "documents": ["a"]}, headers={"X-API-Key": "nope"})
        text = c.get("/metrics", headers=H).text
    assert 'fusionrank_requests_total{endpoint="/v1/rerank",status="200"} 3.0' in text
    assert 'fusionrank_requests_total{endpoint="/v1/rerank",status="401"} 1.0' in text
    assert 'fusionrank_request_seconds_count{endpoint="/v1/rerank"} 4.0' in text
    assert 'fusionrank_degraded_total{reason="timeout"} 3.0' in text
    assert f'fusionrank_model_info{{runtime="onnx",version="{w.artifact.version}"}} 1.0' in text
    assert API_KEY not in text and ADMIN_KEY not in text and "nope" not in text


# ----------------------------------------------------------------------------- readiness
def test_readyz_is_503_until_the_background_load_finishes(service_world):
    from workers.service.app import create_app
    from workers.service.state import ServiceState

    gate = threading.Event()

    def loader(settings):
        gate.wait(30)
        return service_world.reranker

    state = ServiceState.loading(service_world.settings(), loader=loader)
    with TestClient(create_app(state)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/v1/rerank", json={"query": "shoes", "documents": ["a"]}, headers=H)
        assert r.status_code == 503 and "/readyz" in r.json()["detail"]
        gate.set()
        deadline = time.monotonic() + 30
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/readyz").json()["status"] == "ready"
        assert c.post("/v1/rerank", json={"query": "shoes", "documents": ["a"]}, headers=H).status_code == 200


def test_failed_load_is_reported(service_world):
    from workers.service.app import create_app
    from workers.service.state import ServiceState

    def loader(settings):
        from indexing.errors import ModelArtifactError

        raise ModelArtifactError("no fusion model at /nowhere")

    failed = threading.Event()
    state = ServiceState.loading(service_world.settings(), loader=loader)
    state.on_load_error = lambda e: failed.set()
    with TestClient(create_app(state)) as c:
        assert failed.wait(10)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "/nowhere" in r.json()["detail"]


def test_reranker_calls_per_process_default_to_one_on_the_cpu_and_32_when_micro_batched(service_world, monkeypatch):
    from rerank.reranker import Reranker

    monkeypatch.delenv("FUSIONRANK_SERVE_MAX_CONCURRENT", raising=False)
    assert service_world.state().gate_size == 1  # CPU model: calls queue at the gate instead of sharing the GIL
    r = service_world.reranker
    batched = Reranker(r.engine, r.index, r.model, text_encoder=r.text_encoder, history=r.history, micro_batch=True)
    try:
        assert service_world.state(reranker=batched).gate_size == 32
    finally:
        batched.close()
    monkeypatch.setenv("FUSIONRANK_SERVE_MAX_CONCURRENT", "3")
    assert service_world.state().gate_size == 3


# ----------------------------------------------------------------------------- the diversity step
def test_rerank_and_search_take_a_diversity_and_say_which_applied(client, service_world):
    resp = _opensearch_response(service_world)
    off = client.post("/rerank", json={"query": "black leather shoes", "response": resp}, headers=H).json()
    assert off["fusionrank"]["diversity"]["lambda"] == 0.0 and off["fusionrank"]["diversity"]["source"] == "default"
    r = client.post("/rerank", json={"query": "black leather shoes", "response": resp, "diversity": 1}, headers=H)
    assert r.status_code == 200
    on = r.json()
    assert on["fusionrank"]["diversity"]["lambda"] == 1.0 and on["fusionrank"]["diversity"]["applied"] is True
    assert sorted(h["_id"] for h in on["hits"]["hits"]) == sorted(h["_id"] for h in off["hits"]["hits"])
    ranks = [h["_explanation"]["diversity"]["relevance_rank"] for h in on["hits"]["hits"]]
    assert sorted(ranks) == list(range(1, len(ranks) + 1)) and ranks[0] == 1  # the most relevant stays first
    assert [h["_id"] for h in sorted(on["hits"]["hits"], key=lambda h: h["_explanation"]["diversity"]["relevance_rank"])] == \
        [h["_id"] for h in off["hits"]["hits"]]
    auto = client.post("/search", json={"query": "shoes", "size": 5, "diversity": "auto"}, headers=H)
    assert auto.status_code == 200
    block = auto.json()["fusionrank"]["diversity"]
    assert block["requested"] == "auto" and "reason" in block and 0 <= block["lambda"] <= 1
    assert all("diversity" in h["explanation"] for h in auto.json()["hits"])


@pytest.mark.parametrize("bad", [1.5, -0.2, "lots", True, [0.3], {"lambda": 0.2}])
def test_a_diversity_outside_the_range_is_422_naming_it(client, service_world, bad):
    for path, body in (("/rerank", {"query": "shoes", "hits": [{"_id": "p0", "_score": 1.0}], "diversity": bad}),
                       ("/search", {"query": "shoes", "diversity": bad})):
        r = client.post(path, json=body, headers=H)
        assert r.status_code == 422, (path, bad, r.text)
        assert '[0, 1] or "auto"' in r.json()["detail"] and "diversity" in r.json()["detail"], r.text


def test_the_openapi_schema_documents_the_diversity(client):
    spec = client.get("/openapi.json").json()
    for name in ("RerankRequest", "SearchRequest"):
        prop = spec["components"]["schemas"][name]["properties"]["diversity"]
        kinds = json.dumps(prop)
        assert '"maximum": 1.0' in kinds and '"auto"' in kinds and "lambda" in prop["description"]


def test_a_reranker_with_a_default_diversity_serves_it(service_world):
    from rerank.reranker import Reranker
    from workers.service.app import create_app

    w = service_world
    r = Reranker(w.engine, w.index, w.artifact, text_encoder=w.text, history=w.profiles, budget_ms=10_000, diversity="auto")
    with TestClient(create_app(w.state(reranker=r))) as c:
        out = c.post("/search", json={"query": "shoes", "size": 4}, headers=H).json()
    assert out["fusionrank"]["diversity"]["requested"] == "auto" and out["fusionrank"]["diversity"]["source"] == "default"

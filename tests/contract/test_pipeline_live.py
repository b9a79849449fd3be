"""The search-pipeline integration against a real cluster and a running fusionrank service (marked ``opensearch``).

The cluster is the OpenSearch node the test session starts (``tests/conftest.py``; ML Commons loads on it) or the
one at ``OPENSEARCH_URL``. The service is the small real world of ``tests/workers/service/world.py`` served by uvicorn on
127.0.0.1 in this process, where the node reaches it (``TEST_SERVICE_URL`` + ``FUSIONRANK_API_KEY``
name another service instead, e.g. ``docker compose up -d``'s ``http://api:8000``). The rerank processor runs with
``ignore_failure: false`` here, so a search that succeeds went through the service; the service's own request
counter shows the call. The trusted-endpoint cluster setting is left in place; the pipeline, model, connector
and index are removed.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Iterator

import pytest

from indexing import fields as F
from rerank.retrieval import opensearch_pipeline as P
from tests.workers.service.world import API_KEY, service_world  # noqa: F401  (the shared fixture)
from workers.devnode import free_port

pytestmark = [pytest.mark.opensearch, pytest.mark.slow]


@pytest.fixture(scope="module")
def live_service(service_world) -> Iterator[tuple[str, str, object]]:
    """(URL as the cluster reaches it, API key, the app's metrics or None for an external service)."""
    if os.environ.get("TEST_SERVICE_URL"):
        yield os.environ["TEST_SERVICE_URL"], os.environ["FUSIONRANK_API_KEY"], None
        return
    import uvicorn

    state = service_world.state()
    from workers.service.app import create_app

    app = create_app(state)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="live-service", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the in-process service did not start"
    yield f"http://127.0.0.1:{port}", API_KEY, state.metrics
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def live(opensearch_node):
    eng = opensearch_node.engine()
    created: dict[str, str] = {}
    yield eng, created
    t = eng.client.transport
    for method, path in (("DELETE", f"/_search/pipeline/{created.get('pipeline')}"), ("POST", f"/_plugins/_ml/models/{created.get('model')}/_undeploy"),
                         ("DELETE", f"/_plugins/_ml/models/{created.get('model')}"), ("DELETE", f"/_plugins/_ml/connectors/{created.get('connector')}"),
                         ("DELETE", f"/{created.get('index')}")):
        if "None" not in path:
            try:
                t.perform_request(method, path)
            except Exception:  # cleanup is best effort
                pass
    eng.close()


def test_a_search_through_the_pipeline_is_reranked_by_the_service(live, live_service):
    eng, created = live
    service_url, api_key, metrics = live_service
    suffix = uuid.uuid4().hex[:8]
    config = P.PipelineConfig(service_url=service_url, api_key=api_key,
                              pipeline_name=f"fusionrank-test-{suffix}", first_stage="none", fail_open=False, model_name=f"fusionrank-test-{suffix}")
    result = P.setup_search_pipeline(eng.client, config, display_url=eng.display_url)
    created.update(pipeline=result.pipeline, model=result.model_id, connector=result.connector_id or "None")
    assert result.deploy_state == "COMPLETED"
    index = created["index"] = f"fusionrank-test-{suffix}"
    t = eng.client.transport
    docs = {"1": "Men Black Running Shoe", "2": "Women Red Evening Dress", "3": "Black Leather Running Shoe"}
    for i, title in docs.items():
        t.perform_request("PUT", f"/{index}/_doc/{i}", params={"refresh": "true"}, body={F.ID: i, F.TITLE: title, F.DESCRIPTION: "simulated"})
    body = {"query": {"match_all": {}}, "size": 3, "_source": [F.ID, F.TITLE, F.DESCRIPTION],
            "ext": {"rerank": {"query_context": {"query_text": "black running shoe"}}}}
    calls_before = _v1_calls(metrics)
    resp = t.perform_request("POST", f"/{index}/_search", params={"search_pipeline": result.pipeline}, body=body)
    hits = resp["hits"]["hits"]
    assert {h["_id"] for h in hits} == set(docs)
    if metrics is not None:
        assert _v1_calls(metrics) == calls_before + 1, "the cluster called the service's /v1/rerank once"
    # the order is the service's own: ask it directly with what the processor sends (query, document texts)
    plain = t.perform_request("POST", f"/{index}/_search", body={k: v for k, v in body.items() if k != "ext"})
    # neural-search joins the document_fields' values with no separator
    texts = ["".join(str(h["_source"][f]) for f in P.DEFAULT_DOCUMENT_FIELDS if h["_source"].get(f) is not None) for h in plain["hits"]["hits"]]
    import httpx

    direct = httpx.post(f"{service_url}/v1/rerank", headers={"Authorization": f"Bearer {api_key}"},
                        json={"query": "black running shoe", "documents": texts, "top_n": len(texts)}, timeout=30).json()
    want = [plain["hits"]["hits"][r["index"]]["_id"] for r in sorted(direct["results"], key=lambda r: -r["relevance_score"])]
    assert [h["_id"] for h in hits] == want
    scores = [h["_score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and resp["hits"]["max_score"] == scores[0]


def _v1_calls(metrics) -> float:
    if metrics is None:
        return 0.0
    return metrics.registry.get_sample_value("fusionrank_requests_total", {"endpoint": "/v1/rerank", "status": "200"}) or 0.0

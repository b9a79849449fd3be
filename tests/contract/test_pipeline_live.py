"""The search-pipeline integration against a real cluster and a running fusionrank service (marked ``opensearch``;
skipped unless OPENSEARCH_URL and FUSIONRANK_LIVE_SERVICE_URL are set).

    export FUSIONRANK_API_KEY=... FUSIONRANK_ADMIN_API_KEY=...
    docker compose up -d                       # OpenSearch + the service (api), with a model installed
    OPENSEARCH_URL=http://localhost:9200 FUSIONRANK_LIVE_SERVICE_URL=http://api:8000 \\
        .venv/bin/python -m pytest tests/contract/test_pipeline_live.py

FUSIONRANK_LIVE_SERVICE_URL is the service as the *cluster* reaches it. The rerank processor runs with
``ignore_failure: false`` here, so a search that succeeds went through the service. The trusted-endpoint cluster
setting is left in place; the pipeline, model, connector and index are removed.
"""

from __future__ import annotations

import os
import uuid

import pytest

from indexing import fields as F
from indexing.engines.opensearch import OpenSearchEngine
from rerank import opensearch_pipeline as P

pytestmark = [
    pytest.mark.opensearch,
    pytest.mark.skipif(not (os.environ.get("OPENSEARCH_URL") and os.environ.get("FUSIONRANK_LIVE_SERVICE_URL") and os.environ.get("FUSIONRANK_API_KEY")),
                       reason="needs OPENSEARCH_URL, FUSIONRANK_LIVE_SERVICE_URL and FUSIONRANK_API_KEY (docker compose up -d)"),
]


@pytest.fixture
def live():
    eng = OpenSearchEngine(os.environ["OPENSEARCH_URL"], verify_certs=os.environ.get("OPENSEARCH_VERIFY_CERTS", "true").lower() != "false",
                           ca_certs=os.environ.get("OPENSEARCH_CA_CERTS") or None, timeout_s=60)
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


def test_a_search_through_the_pipeline_is_reranked_by_the_service(live):
    eng, created = live
    suffix = uuid.uuid4().hex[:8]
    config = P.PipelineConfig(service_url=os.environ["FUSIONRANK_LIVE_SERVICE_URL"], api_key=os.environ["FUSIONRANK_API_KEY"],
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
    resp = t.perform_request("POST", f"/{index}/_search", params={"search_pipeline": result.pipeline}, body=body)
    hits = resp["hits"]["hits"]
    assert {h["_id"] for h in hits} == set(docs)
    assert hits[-1]["_id"] == "2", "the dress is the least relevant to 'black running shoe'"

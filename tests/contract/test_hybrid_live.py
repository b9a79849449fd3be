"""The hybrid first stage on a real OpenSearch node (marked ``opensearch``): the pipeline bodies of
:mod:`rerank.retrieval.opensearch_bodies` searched on the node, against the client-side fusion of the same lists.

Each test here failed on the OpenSearch 2.19.1 node with the bodies as they were before (the finding it covers):

- the rerank response processor threw a NullPointerException on ``"track_total_hits": false``;
- ``combination.rank_constant`` was ignored by 2.19's RRF (any value became 60);
- the hybrid sub-queries returned only ``size`` hits each (no ``pagination_depth``), so the fused pool was not
  the client-side ``per_list``; a two-weight min-max pipeline refused a query with a photo (3 sub-queries);
- client-side min-max averaged over the lists that returned a document, while 2.19's ``arithmetic_mean``
  counts a missing document as 0 (``rerank.retrieval.fusion.minmax``'s default is now ``missing="zero"``).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from tests.contract.conftest import put_pipeline

from indexing import fields as F
from mappings import load_mapping
from rerank.retrieval import opensearch_bodies as B
from rerank.retrieval.fusion import minmax, rrf
from rerank.retrieval.retriever import BM25, KNN_IMAGE, KNN_TEXT

pytestmark = [pytest.mark.opensearch]

DIM = 8
N = 80
WORDS = ["red", "blue", "shirt", "shoe", "dress", "black", "cotton", "leather", "wool", "linen"]


def _unit_positive(rng: np.random.Generator, n: int) -> np.ndarray:
    # a shared positive component keeps every inner product above 0, where OpenSearch's score translation
    # (1 + ip) is affine and min-max normalization cannot tell the two scales apart
    v = rng.standard_normal((n, DIM)) * 0.5 + 1.0
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def hybrid_index(opensearch_node):
    eng = opensearch_node.engine()
    index = f"hybrid-{uuid.uuid4().hex[:8]}"
    eng.create_index(index, load_mapping("products-v1", text_dim=DIM, image_dim=DIM, hnsw_engine=opensearch_node.hnsw_engine))
    rng = np.random.default_rng(7)
    tv, iv = _unit_positive(rng, N), _unit_positive(rng, N)
    t = eng.client.transport
    lines = []
    for i in range(N):
        title = " ".join(rng.choice(WORDS, 3)) + f" item{i}"
        lines.append({"index": {"_index": index, "_id": f"p{i:03d}"}})
        lines.append({F.ID: f"p{i:03d}", F.TITLE: title, F.PRICE: float(i), F.TEXT_VEC: tv[i].tolist(), F.IMAGE_VEC: iv[i].tolist()})
    resp = eng.client.bulk(body=lines, params={"refresh": "true"})
    assert not resp["errors"]
    q, qi = _unit_positive(rng, 1)[0], _unit_positive(rng, 1)[0]
    pipelines: list[str] = []
    yield eng, index, q, qi, pipelines
    for p in pipelines:
        t.perform_request("DELETE", f"/_search/pipeline/{p}")
    eng.delete_index(index)
    eng.close()


def _pipeline(eng, pipelines: list[str], body: dict) -> str:
    return put_pipeline(eng, pipelines, body, prefix="fr-test")


def _lists(eng, index, query, q, qi, per_list):
    bodies = B.list_search_bodies(query, text_vector=q, image_vector=qi, per_list=per_list)
    responses = {name: eng.client.search(index=index, body=body) for name, body in bodies.items()}
    return B.first_stage_from_responses(query, responses).lists


def test_rrf_pipeline_uses_the_rank_constant_and_matches_client_side_rrf(hybrid_index):
    eng, index, q, _, pipelines = hybrid_index
    lists = _lists(eng, index, "red shirt", q, None, per_list=40)
    for k in (10, 60):
        name = _pipeline(eng, pipelines, B.rrf_pipeline_body(rank_constant=k))
        body = B.hybrid_search_body("red shirt", text_vector=q, size=10, per_list=40)
        hits = eng.client.transport.perform_request("POST", f"/{index}/_search", params={"search_pipeline": name}, body=body)["hits"]["hits"]
        want = rrf(lists, rank_constant=k, top_n=10)
        assert [h["_id"] for h in hits] == [d.id for d in want]
        np.testing.assert_allclose([h["_score"] for h in hits], [d.score for d in want], rtol=1e-5)
    # the documented (3.1+) form is what 2.19 ignores: the scores are RRF's with 60 whatever it says
    name = _pipeline(eng, pipelines, B.rrf_pipeline_body(rank_constant=10, opensearch_version="3.1.0"))
    hits = eng.client.transport.perform_request("POST", f"/{index}/_search", params={"search_pipeline": name},
                                                 body=B.hybrid_search_body("red shirt", text_vector=q, size=10, per_list=40))["hits"]["hits"]
    np.testing.assert_allclose([h["_score"] for h in hits], [d.score for d in rrf(lists, rank_constant=60, top_n=10)], rtol=1e-5)


@pytest.mark.parametrize("with_photo", [False, True], ids=["text", "text+photo"])
def test_minmax_pipeline_pool_is_per_list_and_matches_client_side_minmax(hybrid_index, with_photo):
    eng, index, q, qi, pipelines = hybrid_index
    img = qi if with_photo else None
    name = _pipeline(eng, pipelines, B.normalization_pipeline_body())  # no weights: 2 or 3 sub-queries alike
    lists = _lists(eng, index, "red shirt", q, img, per_list=50)
    want = minmax(lists, top_n=5)
    body = B.hybrid_search_body("red shirt", text_vector=q, image_vector=img, size=5, per_list=50)
    hits = eng.client.transport.perform_request("POST", f"/{index}/_search", params={"search_pipeline": name}, body=body)["hits"]["hits"]
    assert [h["_id"] for h in hits] == [d.id for d in want], "a pool of per_list=50 per sub-query, not size=5"
    np.testing.assert_allclose([h["_score"] for h in hits], [d.score for d in want], rtol=1e-4)


def test_weighted_pipeline_takes_its_own_number_of_sub_queries(hybrid_index):
    eng, index, q, qi, pipelines = hybrid_index
    two = _pipeline(eng, pipelines, B.normalization_pipeline_body({BM25: 0.3, KNN_TEXT: 0.7}))
    three = _pipeline(eng, pipelines, B.normalization_pipeline_body({BM25: 0.2, KNN_TEXT: 0.5, KNN_IMAGE: 0.3}, has_image=True))
    t = eng.client.transport
    photo = B.hybrid_search_body("red shirt", text_vector=q, image_vector=qi, size=5, per_list=30)
    with pytest.raises(Exception, match="400|search_phase_execution_exception"):
        t.perform_request("POST", f"/{index}/_search", params={"search_pipeline": two}, body=photo)
    hits = t.perform_request("POST", f"/{index}/_search", params={"search_pipeline": three}, body=photo)["hits"]["hits"]
    lists = _lists(eng, index, "red shirt", q, qi, per_list=30)
    want = minmax(lists, weights={BM25: 0.2, KNN_TEXT: 0.5, KNN_IMAGE: 0.3}, top_n=5)
    assert [h["_id"] for h in hits] == [d.id for d in want]


def test_a_rerank_response_processor_runs_after_the_hybrid_query(hybrid_index):
    """The processor reads the total hit count first: with ``track_total_hits: false`` it threw (HTTP 500)."""
    eng, index, q, _, pipelines = hybrid_index
    body = {"phase_results_processors": B.normalization_pipeline_body()["phase_results_processors"],
            "response_processors": [{"rerank": {"by_field": {"target_field": F.PRICE}, "ignore_failure": False}}]}
    name = _pipeline(eng, pipelines, body)
    search = B.hybrid_search_body("red shirt", text_vector=q, size=10, per_list=40, source=[F.ID, F.PRICE])
    assert "track_total_hits" not in search
    hits = eng.client.transport.perform_request("POST", f"/{index}/_search", params={"search_pipeline": name}, body=search)["hits"]["hits"]
    prices = [h["_source"][F.PRICE] for h in hits]
    assert len(hits) == 10 and prices == sorted(prices, reverse=True), "reordered by the processor (price, descending)"
    broken = dict(search, track_total_hits=False)
    with pytest.raises(Exception, match="500|null_pointer"):
        eng.client.transport.perform_request("POST", f"/{index}/_search", params={"search_pipeline": name}, body=broken)

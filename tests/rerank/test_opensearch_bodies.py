"""Contract tests: the hybrid-retrieval request bodies validate against the official OpenSearch API spec."""

from __future__ import annotations

import numpy as np
import pytest

from indexing import fields as F
from indexing.engines.base import Filters, Range
from indexing.errors import ConfigError
from rerank.retrieval.fusion import FusionInputError
from rerank.retrieval.opensearch_bodies import (
    first_stage_from_responses,
    hits_from_response,
    hybrid_list_order,
    hybrid_search_body,
    list_search_bodies,
    normalization_pipeline_body,
    rrf_pipeline_body,
)
from rerank.retrieval.retriever import BM25, KNN_IMAGE, KNN_TEXT, fuse_first_stage

pytestmark = pytest.mark.contract

import indexing.opensearch_spec as spec_mod  # noqa: E402


@pytest.fixture(scope="module")
def spec():
    return spec_mod.OpenSearchSpec()


TV = np.linspace(-1, 1, 384).astype(np.float32)
IV = np.linspace(0, 1, 1280).astype(np.float32)
FILTERS = Filters(terms={F.GENDER: ["Men", "Unisex"], F.COLOUR: "Black"}, ranges={F.PRICE: Range(lte=50)})


def test_hybrid_search_body_validates(spec):
    body = hybrid_search_body("black formal shoes", text_vector=TV, image_vector=IV, size=100, per_list=200, filters=FILTERS)
    spec.validate_request("search", body)
    subs = body["query"]["hybrid"]["queries"]
    assert len(subs) == 3 and "bool" in subs[0] and set(subs[1]["knn"]) == {F.TEXT_VEC} and set(subs[2]["knn"]) == {F.IMAGE_VEC}
    assert subs[1]["knn"][F.TEXT_VEC]["filter"]  # filters reach every sub-query
    spec.validate_request("search", hybrid_search_body("shoes", text_vector=TV))


def test_pipeline_bodies_validate(spec):
    body = normalization_pipeline_body({BM25: 0.3, KNN_TEXT: 0.7})
    spec.validate_request("search_pipeline.put", body)
    proc = body["phase_results_processors"][0]["normalization-processor"]
    assert proc["normalization"]["technique"] == "min_max" and proc["combination"]["parameters"]["weights"] == [0.3, 0.7]
    spec.validate_request("search_pipeline.put", normalization_pipeline_body({BM25: 0.2, KNN_TEXT: 0.5, KNN_IMAGE: 0.3}, has_image=True))
    spec.validate_request("search_pipeline.put", normalization_pipeline_body(None))  # equal weights
    # the spec documents RRF's rank constant where 3.1+ reads it; 2.19 reads (and the node test checks) parameters
    rrf = rrf_pipeline_body(opensearch_version="3.1.0")
    spec.validate_request("search_pipeline.put", rrf)
    assert rrf["phase_results_processors"][0]["score-ranker-processor"]["combination"]["rank_constant"] == 60
    old = rrf_pipeline_body(rank_constant=20)["phase_results_processors"][0]["score-ranker-processor"]["combination"]
    assert old == {"technique": "rrf", "parameters": {"rank_constant": 20}}
    with pytest.raises(spec_mod.SpecViolationError, match="parameters"):
        spec.validate_request("search_pipeline.put", rrf_pipeline_body())
    with pytest.raises(ConfigError, match="2.19 or later"):
        rrf_pipeline_body(opensearch_version="2.17.0")


def test_separate_list_bodies_validate(spec):
    bodies = list_search_bodies("red heels", text_vector=TV, image_vector=IV, per_list=150, filters=FILTERS, source=[F.TITLE])
    assert list(bodies) == [BM25, KNN_TEXT, KNN_IMAGE]
    for b in bodies.values():
        spec.validate_request("search", b)


def test_the_check_fails_on_broken_bodies(spec):
    body = hybrid_search_body("shoes", text_vector=TV)
    del body["query"]["hybrid"]["queries"][1]["knn"][F.TEXT_VEC]["vector"]  # a knn query without its vector
    with pytest.raises(spec_mod.SpecViolationError):
        spec.validate_request("search", body)
    bad = normalization_pipeline_body()
    bad["phase_results_processors"][0]["normalization-processor"]["normalization"]["technique"] = "minmax"
    with pytest.raises(spec_mod.SpecViolationError):
        spec.validate_request("search_pipeline.put", bad)
    bad = rrf_pipeline_body(opensearch_version="3.1.0")
    bad["phase_results_processors"][0]["score-ranker-processor"]["combination"]["rank_constant"] = 0
    with pytest.raises(spec_mod.SpecViolationError):
        spec.validate_request("search_pipeline.put", bad)


def test_bad_arguments():
    with pytest.raises(FusionInputError, match="sum to 1"):
        normalization_pipeline_body({BM25: 0.5, KNN_TEXT: 0.6})
    with pytest.raises(ConfigError, match="needs a query text"):
        hybrid_search_body("  ", text_vector=TV)
    with pytest.raises(ConfigError, match="finite"):
        list_search_bodies("x", text_vector=np.array([np.nan, 1.0]))
    with pytest.raises(ConfigError, match="rank_constant"):
        rrf_pipeline_body(rank_constant=0)
    assert hybrid_list_order(has_text=False, has_image=True) == [KNN_IMAGE]


def _response(hits):
    return {
        "took": 3,
        "timed_out": False,
        "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
        "hits": {"max_score": hits[0][1], "hits": [{"_index": "products-1", "_id": i, "_score": s} for i, s in hits]},
    }


def test_client_side_fusion_of_separate_responses_matches_the_pipeline_rule(spec):
    """Responses (checked against the spec's search response schema) fused client-side with min-max +
    arithmetic_mean, a document missing from a list counting 0 there, as 2.19's normalization-processor does
    (measured on a node: tests/contract/test_hybrid_live.py). kNN scores arrive translated (1 + ip)."""
    bm25 = _response([("a", 12.0), ("b", 6.0), ("c", 2.0)])
    knn = _response([("b", 1.9), ("d", 1.7), ("a", 1.5)])
    spec.validate_response("search", 200, bm25)
    spec.validate_response("search", 200, knn)
    stage = first_stage_from_responses("q", {BM25: bm25, KNN_TEXT: knn})
    assert stage.skipped == {KNN_IMAGE: "no request sent for this list"}
    cs = fuse_first_stage(stage, method="minmax", weights={BM25: 0.4, KNN_TEXT: 0.6}, top_n=None)
    got = {c.id: c.score for c in cs.candidates}
    assert got["a"] == pytest.approx(0.4 * 1.0 + 0.6 * 0.001)
    assert got["b"] == pytest.approx(0.4 * 0.4 + 0.6 * 1.0)
    assert got["c"] == pytest.approx(0.4 * 0.001)  # only in bm25: 0 from knn_text
    assert got["d"] == pytest.approx(0.6 * 0.5)
    assert cs.ids == ["b", "a", "d", "c"]
    assert cs.candidates[0].signals[BM25].rank == 2 and cs.candidates[2].signals[BM25].missing
    assert [h.score for h in stage.lists[KNN_TEXT]] == pytest.approx([0.9, 0.7, 0.5])  # back to inner products
    assert hits_from_response({"hits": {"hits": []}}) == ()
    with pytest.raises(ConfigError, match="hits.hits"):
        hits_from_response({"took": 3})

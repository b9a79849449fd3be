"""Every request body OpenSearchEngine sends, captured at opensearch-py's connection boundary and validated
against the official OpenSearch API specification; and proof that the check rejects broken bodies."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from indexing import fields as F
from indexing.engines.base import BulkAction, Filters, Range
from indexing.engines.opensearch import OpenSearchEngine
from indexing.opensearch_spec import OpenSearchSpec, SpecViolationError
from mappings import load_mapping
from tests.contract.opensearch_fake import FakeOpenSearchServer

pytestmark = pytest.mark.contract

TEXT_DIM, IMAGE_DIM = 384, 1280
INDEX, ALIAS = "products-v1", "products"


def _doc(i: int, rng: np.random.Generator) -> dict:
    return {
        F.ID: str(i), F.TITLE: f"Men Black Running Shoe {i}", F.BRAND: "Nike", F.CATEGORY: "Footwear > Shoes > Sports Shoes",
        F.DESCRIPTION: "light mesh upper", F.ATTRIBUTES: "Black Sports Summer 2012", F.ARTICLE_TYPE: "Sports Shoes",
        F.COLOUR: "Black", F.GENDER: "Men", F.USAGE: "Sports", F.SEASON: "Summer", F.PRICE: 49.5 + i, F.RATING: 4.2,
        F.POPULARITY: 0.7, F.YEAR: 2012, F.IMAGE: f"images/{i}.jpg", F.HAS_IMAGE: True,
        F.TEXT_VEC: rng.standard_normal(TEXT_DIM).astype(np.float32),  # numpy arrays, as the encoders produce them
        F.IMAGE_VEC: rng.standard_normal(IMAGE_DIM).astype(np.float32),
        F.TEXT_MODEL_ID: "minilm@1", F.IMAGE_MODEL_ID: "efficientnet_lite0@1", F.CONTENT_HASH: f"h{i}", F.INDEXED_AT: 1_700_000_000,
    }


@pytest.fixture
def populated(engine: OpenSearchEngine, server: FakeOpenSearchServer) -> OpenSearchEngine:
    engine.create_index(INDEX, load_mapping("products-v1", text_dim=TEXT_DIM, image_dim=IMAGE_DIM))
    engine.swap_alias(ALIAS, INDEX)
    rng = np.random.default_rng(0)
    engine.bulk(ALIAS, [BulkAction.index(str(i), _doc(i, rng)) for i in range(6)], refresh=True)
    return engine


def _only(server: FakeOpenSearchServer, operation: str):
    reqs = server.of(operation)
    assert reqs, f"the engine sent no {operation} request"
    return reqs


@pytest.mark.parametrize("hnsw_engine", ["faiss", "lucene"])
def test_index_creation_with_the_real_mapping_matches_the_spec(engine, server, spec: OpenSearchSpec, hnsw_engine):
    engine.create_index(INDEX, load_mapping("products-v1", text_dim=TEXT_DIM, image_dim=IMAGE_DIM, hnsw_engine=hnsw_engine))
    (req,) = _only(server, "indices.create")
    assert (req.method, req.path) == ("PUT", f"/{INDEX}")
    spec.validate_request("indices.create", req.body)
    sent = req.json()
    assert sent["settings"]["index"]["knn"] is True
    props = sent["mappings"]["properties"]
    assert (props[F.TEXT_VEC]["dimension"], props[F.IMAGE_VEC]["dimension"]) == (TEXT_DIM, IMAGE_DIM)
    assert props[F.TEXT_VEC]["method"]["engine"] == hnsw_engine


def test_bulk_ndjson_matches_the_spec(populated, server, spec):
    populated.bulk(ALIAS, [BulkAction.delete("0"), BulkAction.index("9", _doc(9, np.random.default_rng(1)))])
    for req in _only(server, "bulk"):
        spec.validate_request("bulk", req.body)
        assert req.body.endswith(b"\n")
    lines = server.of("bulk")[-1].ndjson()
    assert lines[0] == {"delete": {"_index": ALIAS, "_id": "0"}}
    assert lines[1] == {"index": {"_index": ALIAS, "_id": "9"}}
    assert len(lines[2][F.TEXT_VEC]) == TEXT_DIM and lines[2][F.ID] == "9"


def test_bm25_multi_match_with_filters_matches_the_spec(populated, server, spec):
    filters = Filters(terms={F.GENDER: ["Men", "Unisex"], F.COLOUR: "Black"}, ranges={F.PRICE: Range(gte=10, lte=60.5)})
    populated.bm25_search(ALIAS, "black running shoe", size=50, filters=filters, source=[F.TITLE, F.PRICE])
    req = _only(server, "search")[-1]
    spec.validate_request("search", req.body)
    body = req.json()
    mm = body["query"]["bool"]["must"][0]["multi_match"]
    assert mm["type"] == "best_fields" and mm["query"] == "black running shoe"
    assert "title^3" in mm["fields"] and "description^0.5" in mm["fields"] and "attributes" in mm["fields"]
    assert {json.dumps(c, sort_keys=True) for c in body["query"]["bool"]["filter"]} == {
        json.dumps(c, sort_keys=True)
        for c in ({"term": {F.COLOUR: "Black"}}, {"terms": {F.GENDER: ["Men", "Unisex"]}}, {"range": {F.PRICE: {"gte": 10, "lte": 60.5}}})
    }
    assert body["_source"] == [F.TITLE, F.PRICE] and body["size"] == 50


def test_knn_query_with_efficient_filter_matches_the_spec(populated, server, spec):
    q = np.random.default_rng(2).standard_normal(TEXT_DIM)
    populated.knn_search(ALIAS, F.TEXT_VEC, q, k=20, filters=Filters(terms={F.ARTICLE_TYPE: "Sports Shoes"}, ranges={F.RATING: Range(gt=3)}))
    populated.knn_search(ALIAS, F.IMAGE_VEC, np.ones(IMAGE_DIM), k=5, source=True)
    texts, images = _only(server, "search")[-2:]
    for req in (texts, images):
        spec.validate_request("search", req.body)
    knn = texts.json()["query"]["knn"][F.TEXT_VEC]
    assert knn["k"] == 20 and len(knn["vector"]) == TEXT_DIM
    assert knn["filter"] == {"bool": {"filter": [{"term": {F.ARTICLE_TYPE: "Sports Shoes"}}, {"range": {F.RATING: {"gt": 3}}}]}}
    assert "filter" not in images.json()["query"]["knn"][F.IMAGE_VEC]


def test_mget_bodies_match_the_spec(populated, server, spec):
    assert set(populated.get(ALIAS, ["1", "2", "missing"])) == {"1", "2"}
    assert populated.get(ALIAS, ["3"], fields=[F.TITLE]) == {"3": {F.TITLE: "Men Black Running Shoe 3"}}
    plain, with_fields = _only(server, "mget")
    for req in (plain, with_fields):
        spec.validate_request("mget", req.body)
    assert plain.json() == {"ids": ["1", "2", "missing"]}
    assert with_fields.json() == {"docs": [{"_id": "3", "_source": [F.TITLE]}]}


def test_alias_swap_is_one_atomic_request_matching_the_spec(populated, server, spec):
    populated.create_index("products-v2", load_mapping("products-v1", text_dim=TEXT_DIM, image_dim=IMAGE_DIM))
    assert populated.swap_alias(ALIAS, "products-v2") == [INDEX]
    first, second = _only(server, "indices.update_aliases")
    for req in (first, second):
        assert (req.method, req.path) == ("POST", "/_aliases")
        spec.validate_request("indices.update_aliases", req.body)
    assert first.json() == {"actions": [{"add": {"index": INDEX, "alias": ALIAS}}]}
    assert second.json() == {"actions": [{"remove": {"index": INDEX, "alias": ALIAS}}, {"add": {"index": "products-v2", "alias": ALIAS}}]}


def test_every_request_of_a_full_lifecycle_matches_the_spec(populated, server, spec):
    """The umbrella check: whatever the engine sends (scroll, count, refresh, cat... included) is a spec operation
    and every body it carries validates."""
    populated.bm25_search(ALIAS, "shoe")
    populated.knn_search(ALIAS, F.TEXT_VEC, np.zeros(TEXT_DIM), k=3, filters=Filters(terms={F.GENDER: "Men"}))
    assert len(list(populated.iter_documents(ALIAS, batch_size=4))) == 6
    assert populated.count(ALIAS) == 6
    assert populated.list_indices("products-") == [INDEX]
    populated.delete_index(INDEX)
    checked = {spec.validate_captured(r.method, r.path, r.body) for r in server.requests}
    assert {"indices.create", "indices.update_aliases", "bulk", "search", "scroll", "clear_scroll", "count", "indices.refresh",
            "indices.get_mapping", "cat.indices", "indices.delete"} <= checked


# --------------------------------------------------------------------------- the check fails on broken bodies
def _captured(server, operation):
    return copy.deepcopy(server.of(operation)[-1].json())


def test_knn_query_without_vector_is_rejected(populated, server, spec):
    populated.knn_search(ALIAS, F.TEXT_VEC, np.ones(TEXT_DIM), k=10, filters=Filters(terms={F.COLOUR: "Black"}))
    body = _captured(server, "search")
    spec.validate_request("search", body)
    del body["query"]["knn"][F.TEXT_VEC]["vector"]
    with pytest.raises(SpecViolationError) as e:
        spec.validate_request("search", body)
    assert f"/query/knn/{F.TEXT_VEC}" in str(e.value) and "'vector' is a required property" in str(e.value)


def test_knn_vector_dimension_must_be_an_integer(engine, server, spec):
    engine.create_index(INDEX, load_mapping("products-v1", text_dim=TEXT_DIM, image_dim=IMAGE_DIM))
    body = _captured(server, "indices.create")
    body["mappings"]["properties"][F.TEXT_VEC]["dimension"] = "384"
    with pytest.raises(SpecViolationError) as e:
        spec.validate_request("indices.create", body)
    assert f"/mappings/properties/{F.TEXT_VEC}/dimension" in str(e.value) and "not of type 'integer'" in str(e.value)
    body["mappings"]["properties"][F.TEXT_VEC]["dimension"] = 38.4
    with pytest.raises(SpecViolationError):
        spec.validate_request("indices.create", body)


@pytest.mark.parametrize(
    ("field", "param"),
    [(F.TITLE, "analyser"), (F.COLOUR, "ignore_abov"), (F.TEXT_VEC, "dimensions"), (F.PRICE, "scaling_factor")],
)
def test_unknown_mapping_parameter_is_rejected(engine, server, spec, field, param):
    engine.create_index(INDEX, load_mapping("products-v1", text_dim=TEXT_DIM, image_dim=IMAGE_DIM))
    body = _captured(server, "indices.create")
    body["mappings"]["properties"][field][param] = 1
    with pytest.raises(SpecViolationError) as e:
        spec.validate_request("indices.create", body)
    msg = str(e.value)
    assert f"/mappings/properties/{field}" in msg and f"unknown parameter(s) '{param}'" in msg


@pytest.mark.parametrize(
    ("where", "value", "expect"),
    [
        (("size",), "fifty", "'fifty' is not of type 'integer'"),
        (("query", "bool", "must", 0, "multi_match", "type"), "best_field", "is not one of"),
        (("query", "bool", "filter", 0, "range", F.PRICE, "gte"), {"value": 1}, "/query/bool/filter/0/range"),
        (("query", "bool", "must"), [{"multi_matc": {"query": "x"}}], "unknown parameter(s) 'multi_matc'"),
        (("_source",), 3, "/_source"),
    ],
)
def test_wrong_types_in_a_search_body_are_rejected(populated, server, spec, where, value, expect):
    populated.bm25_search(ALIAS, "shoe", filters=Filters(ranges={F.PRICE: Range(gte=1)}))
    body = _captured(server, "search")
    node = body
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(SpecViolationError) as e:
        spec.validate_request("search", body)
    assert expect in str(e.value)


def test_broken_bulk_bodies_are_rejected(spec):
    good = '{"index":{"_index":"p","_id":"1"}}\n{"title":"x"}\n{"delete":{"_index":"p","_id":"2"}}\n'
    spec.validate_request("bulk", good)
    cases = {
        '{"upsert":{"_index":"p","_id":"1"}}\n{"title":"x"}\n': "line 1",  # no such action
        '{"index":{"_index":"p","_id":"1"}}\n': "has no document line",
        '{"index":{"_index":"p","_id":"1"}}\n["not", "an", "object"]\n': "must be a JSON object",
        '{"index":{"_index":"p","_id":"1","retry":3}}\n{"title":"x"}\n': "unknown parameter(s) 'retry'",
        '{"index":{"_index":"p","_id":"1"}}\n{"title":"x"}': "must end with a newline",
        '{"update":{"_index":"p","_id":"1"}}\n{"dok":{"a":1}}\n': "line 2",
    }
    for body, expect in cases.items():
        with pytest.raises(SpecViolationError) as e:
            spec.validate_request("bulk", body)
        assert expect in str(e.value), body


def test_broken_alias_and_mget_bodies_are_rejected(spec):
    with pytest.raises(SpecViolationError, match="has too many properties"):
        spec.validate_request("indices.update_aliases", {"actions": [{"add": {"index": "a", "alias": "x"}, "remove": {"index": "b", "alias": "x"}}]})
    with pytest.raises(SpecViolationError, match="unknown parameter"):
        spec.validate_request("indices.update_aliases", {"actions": [{"swap": {"index": "a", "alias": "x"}}]})
    with pytest.raises(SpecViolationError, match="/ids"):
        spec.validate_request("mget", {"ids": [{"id": 1}]})

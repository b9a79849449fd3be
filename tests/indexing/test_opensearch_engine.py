"""OpenSearchEngine behaviour: bulk retries and per-item failures, error mapping, alias swaps, query building.

Requests go through the real opensearch-py client and transport; only the node is a fake, at the connection
boundary (tests/contract/opensearch_fake.py; its answers are validated against the OpenSearch API spec).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from indexing import fields as F
from indexing.engines import create_engine
from indexing.engines.base import BulkAction, Filters, Hit, Range, SearchEngine
from indexing.engines.opensearch import OpenSearchEngine, redact_url
from indexing.errors import (
    BulkError,
    DimensionError,
    EngineAccessError,
    EngineAuthenticationError,
    EngineAuthorizationError,
    EngineConflictError,
    EngineError,
    EngineRequestError,
    EngineUnavailableError,
    IndexExistsError,
    IndexNotFoundError,
    MappingError,
)
from indexing.opensearch_spec import load_spec
from mappings import load_mapping
from workers.drill.services import free_port  # a local port nothing listens on
from tests.contract.opensearch_fake import FakeOpenSearchServer, error_body

DIM = 8
REJECTED = {"type": "rejected_execution_exception", "reason": "rejected execution of coordinating operation [shard_detail=[products-v1][0][P]]"}


@pytest.fixture
def server() -> FakeOpenSearchServer:
    return FakeOpenSearchServer(load_spec())


@pytest.fixture
def engine(server) -> OpenSearchEngine:
    eng = OpenSearchEngine(client=server.client(), bulk_max_retries=3, bulk_initial_backoff_s=0.001, bulk_max_backoff_s=0.004)
    eng.create_index("products-v1", load_mapping(text_dim=DIM, image_dim=DIM))
    return eng


def _docs(n: int) -> list[BulkAction]:
    return [BulkAction.index(str(i), {F.ID: str(i), F.TITLE: f"shirt {i}", F.TEXT_VEC: np.full(DIM, i, np.float32)}) for i in range(n)]


def test_it_is_the_registered_opensearch_engine_and_satisfies_the_protocol(server):
    eng = create_engine("opensearch", client=server.client())
    assert isinstance(eng, OpenSearchEngine) and isinstance(eng, SearchEngine) and eng.name == "opensearch"


# --------------------------------------------------------------------------- bulk
def test_items_rejected_with_429_are_retried_until_written(engine, server):
    server.bulk_hook = lambda op, index, id, doc, attempt: (429, REJECTED) if id in {"2", "5"} and attempt < 2 else None
    summary = engine.bulk("products-v1", _docs(8), chunk_size=4)
    assert summary.ok and summary.succeeded == 8 and summary.retried == 4  # two items, two retries each
    assert sorted(server.docs["products-v1"]) == [str(i) for i in range(8)]
    sent = [[line["index"]["_id"] for line in r.ndjson()[::2]] for r in server.of("bulk")]
    # each chunk is retried (only its rejected item) before the next chunk goes out
    assert sent == [["0", "1", "2", "3"], ["2"], ["2"], ["4", "5", "6", "7"], ["5"], ["5"]]


def test_429_retries_are_bounded_and_then_reported(engine, server):
    server.bulk_hook = lambda op, index, id, doc, attempt: (429, REJECTED) if id == "1" else None
    summary = engine.bulk("products-v1", _docs(3))
    assert summary.succeeded == 2 and summary.retried == 3
    (failure,) = summary.failed
    assert (failure.id, failure.status, failure.op) == ("1", 429, "index") and "rejected_execution_exception" in failure.error
    assert len(server.of("bulk")) == 1 + 3


def test_rejected_item_is_reported_with_id_and_reason_and_the_rest_is_written(engine, server):
    parse_error = {"type": "mapper_parsing_exception", "reason": "failed to parse field [price] of type [float] in document with id '3'",
                   "caused_by": {"type": "number_format_exception", "reason": 'For input string: "cheap"'}}
    server.bulk_hook = lambda op, index, id, doc, attempt: (400, parse_error) if id == "3" else None
    summary = engine.bulk("products-v1", _docs(6), chunk_size=2, refresh=True)
    assert summary.succeeded == 5 and summary.retried == 0 and not summary.ok
    (failure,) = summary.failed
    assert failure.id == "3" and failure.status == 400 and not failure.ok
    assert failure.error.startswith("mapper_parsing_exception: failed to parse field [price]") and "number_format_exception" in failure.error
    assert len(server.of("bulk")) == 3  # a 400 is never retried
    assert engine.count("products-v1") == 5


def test_chunks_are_bounded_by_count_and_by_bytes(engine, server):
    engine.bulk("products-v1", _docs(10), chunk_size=4)
    assert [len(r.ndjson()) // 2 for r in server.of("bulk")] == [4, 4, 2]
    server.requests.clear()
    engine.bulk("products-v1", _docs(10), chunk_size=500, max_chunk_bytes=300)
    sizes = [len(r.body) for r in server.of("bulk")]
    assert len(sizes) > 1 and all(s <= 300 for s in sizes)


def test_deleting_a_missing_document_is_reported_as_not_found(engine, server):
    engine.bulk("products-v1", _docs(2))
    summary = engine.bulk("products-v1", [BulkAction.delete("0"), BulkAction.delete("never-indexed")])
    assert summary.succeeded == 1 and list(server.docs["products-v1"]) == ["1"]
    assert [(f.id, f.op, f.status, f.error) for f in summary.failed] == [("never-indexed", "delete", 404, "not_found")]


def test_a_bulk_request_refused_as_a_whole_is_a_bulk_error(engine, server):
    engine.bulk("products-v1", _docs(2), chunk_size=2)
    server.fail_next("POST", "bulk", 413, error_body(413, "content_too_long_exception", "request too large"))
    with pytest.raises(BulkError, match="HTTP 413.*content_too_long_exception.*after 0 documents"):
        engine.bulk("products-v1", _docs(2))


# --------------------------------------------------------------------------- errors
def test_connection_refused_names_the_url_without_the_password():
    port = free_port()
    eng = OpenSearchEngine(f"http://admin:s3cr3t-pw@127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(EngineUnavailableError) as e:
        eng.index_exists("products")
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "Connection refused" in msg and "s3cr3t-pw" not in msg and "admin:**********@" in msg
    eng2 = OpenSearchEngine(f"http://127.0.0.1:{port}", http_auth=("admin", "s3cr3t-pw"), timeout_s=2)
    with pytest.raises(EngineUnavailableError) as e2:
        eng2.bm25_search("products", "shirt")
    assert f"127.0.0.1:{port}" in str(e2.value) and "s3cr3t-pw" not in str(e2.value)
    assert "s3cr3t-pw" not in repr(eng) and redact_url("https://u:p@h:9200/x") == "https://u:**********@h:9200/x"


def test_missing_index_maps_to_index_not_found(engine):
    for call in (lambda: engine.get_mapping("nope"), lambda: engine.delete_index("nope"), lambda: engine.bm25_search("nope", "x"),
                 lambda: engine.count("nope"), lambda: engine.swap_alias("products", "nope")):
        with pytest.raises(IndexNotFoundError, match="'nope' does not exist"):
            call()
    assert engine.index_exists("nope") is False and engine.get_alias("nope") == []


def test_existing_index_maps_to_index_exists(engine):
    with pytest.raises(IndexExistsError, match="products-v1"):
        engine.create_index("products-v1", load_mapping(text_dim=DIM, image_dim=DIM))


def test_other_transport_errors_carry_status_and_reason(engine, server):
    server.fail_next("POST", "search", 400, error_body(400, "parsing_exception", "[multi_match] unknown token [START_ARRAY]", line=1, col=40))
    with pytest.raises(EngineError, match=r"HTTP 400 parsing_exception: \[multi_match\] unknown token") as e:
        engine.bm25_search("products-v1", "shirt")
    assert type(e.value) is EngineRequestError


@pytest.mark.parametrize(
    ("status", "etype", "cls", "hint"),
    [
        (401, "security_exception", EngineAuthenticationError, "check the credentials"),
        (403, "security_exception", EngineAuthorizationError, "lack a permission"),
        (409, "version_conflict_engine_exception", EngineConflictError, "conflict"),
        (500, "illegal_state_exception", EngineError, "HTTP 500"),
    ],
)
def test_each_http_status_maps_to_its_own_error_class(engine, server, status, etype, cls, hint):
    server.fail_next("POST", "search", status, error_body(status, etype, "no permissions for [indices:data/read/search]"))
    with pytest.raises(EngineError, match=rf"HTTP {status} {etype}") as e:
        engine.bm25_search("products-v1", "shirt")
    assert type(e.value) is cls and hint in str(e.value)
    assert isinstance(e.value, EngineAccessError) == (status in (401, 403))


def test_index_without_knn_setting_is_refused_before_sending(server):
    eng = OpenSearchEngine(client=server.client())
    body = load_mapping(text_dim=DIM, image_dim=DIM)
    body["settings"]["index"]["knn"] = False
    with pytest.raises(MappingError, match="index.knn"):
        eng.create_index("products-v2", body)
    assert not server.requests


def test_turning_tls_verification_off_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="indexing.engines.opensearch"):
        OpenSearchEngine("https://admin:pw-123@search.example:9200", verify_certs=False)
    (rec,) = [r for r in caplog.records if r.name == "indexing.engines.opensearch"]
    assert "verification is OFF" in rec.getMessage() and "search.example:9200" in rec.getMessage() and "pw-123" not in rec.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="indexing.engines.opensearch"):
        OpenSearchEngine("https://search.example:9200")
    assert not caplog.records


# --------------------------------------------------------------------------- aliases
def test_swap_alias_sends_one_remove_and_add_request_and_returns_the_previous_indices(engine, server):
    engine.create_index("products-v2", load_mapping(text_dim=DIM, image_dim=DIM))
    engine.create_index("products-v3", load_mapping(text_dim=DIM, image_dim=DIM))
    server.aliases["products"] = {"products-v1", "products-v2"}  # left behind by a crashed job, say
    before = len(server.of("indices.update_aliases"))
    assert engine.swap_alias("products", "products-v3") == ["products-v1", "products-v2"]
    (req,) = server.of("indices.update_aliases")[before:]
    assert req.json() == {"actions": [
        {"remove": {"index": "products-v1", "alias": "products"}},
        {"remove": {"index": "products-v2", "alias": "products"}},
        {"add": {"index": "products-v3", "alias": "products"}},
    ]}
    assert engine.get_alias("products") == ["products-v3"]
    assert engine.swap_alias("products", "products-v3") == ["products-v3"]  # idempotent: add only
    assert server.of("indices.update_aliases")[-1].json() == {"actions": [{"add": {"index": "products-v3", "alias": "products"}}]}


# --------------------------------------------------------------------------- search and documents
def test_knn_validates_the_query_vector_against_the_mapping_before_sending(engine, server):
    with pytest.raises(DimensionError, match="dimension 8"):
        engine.knn_search("products-v1", F.TEXT_VEC, np.ones(DIM + 1))
    with pytest.raises(DimensionError, match="NaN"):
        engine.knn_search("products-v1", F.TEXT_VEC, [np.nan] * DIM)
    with pytest.raises(MappingError, match="not a knn_vector field"):
        engine.knn_search("products-v1", F.TITLE, np.ones(DIM))
    assert not server.of("search")


def test_knn_dimension_is_read_from_the_mapping_once_per_alias(server):
    OpenSearchEngine(client=server.client()).create_index("products-v1", load_mapping(text_dim=DIM, image_dim=DIM))
    server.aliases["products"] = {"products-v1"}
    eng = OpenSearchEngine(client=server.client())  # a fresh process: no cached dimensions
    for _ in range(3):
        eng.knn_search("products", F.IMAGE_VEC, np.ones(DIM), k=5)
    assert len(server.of("indices.get_mapping")) == 1 and len(server.of("search")) == 3


def test_hits_come_back_in_engine_order_with_scores_and_requested_source(engine, server):
    server.script_search([("7", 2.5, {F.TITLE: "navy shirt", F.PRICE: 20.0}), ("3", 1.25, {F.TITLE: "shirt", F.PRICE: 35.0})])
    hits = engine.bm25_search("products-v1", "shirt", source=[F.TITLE])
    assert hits == [Hit("7", 2.5, {F.TITLE: "navy shirt"}), Hit("3", 1.25, {F.TITLE: "shirt"})]
    # the k-NN plugin translates inner products (1 + ip, or 1 / (1 - ip) below 0); the engine turns them back
    server.script_search([("7", 1.9, {F.TITLE: "navy shirt"}), ("3", 0.8, {F.TITLE: "shirt"})])
    knn = engine.knn_search("products-v1", F.TEXT_VEC, np.ones(DIM), k=3, filters=Filters(ranges={F.PRICE: Range(lt=30)}))
    assert [h.id for h in knn] == ["7", "3"] and [h.score for h in knn] == pytest.approx([0.9, -0.25]) and knn[0].source is None
    assert server.of("search")[-1].json()["_source"] is False


def test_get_returns_found_documents_only_and_iter_documents_pages_through_all(engine, server):
    engine.bulk("products-v1", _docs(7))
    got = engine.get("products-v1", ["1", "6", "42"])
    assert sorted(got) == ["1", "6"] and got["6"][F.TITLE] == "shirt 6"
    assert engine.get("products-v1", []) == {}
    docs = list(engine.iter_documents("products-v1", batch_size=3))
    assert [d[F.ID] for d in docs] == [str(i) for i in range(7)]
    assert len(server.of("scroll")) == 3 and len(server.of("clear_scroll")) == 1 and not server._scrolls


def test_lifecycle_listing_and_counting(engine, server):
    engine.create_index("products-v2", load_mapping(text_dim=DIM, image_dim=DIM))
    engine.create_index("other", {"settings": {}, "mappings": {"properties": {F.ID: {"type": "keyword"}}}})
    assert engine.list_indices("products-") == ["products-v1", "products-v2"]
    engine.bulk("products-v2", _docs(4))
    assert engine.count("products-v2") == 4  # count refreshes first: near-real-time writes are counted
    refresh, count = server.requests[-2:]
    assert (refresh.operation, count.operation) == ("indices.refresh", "count")
    engine.delete_index("products-v2")
    assert not engine.index_exists("products-v2") and engine.get_mapping("products-v1")["mappings"]["properties"][F.TEXT_VEC]["dimension"] == DIM

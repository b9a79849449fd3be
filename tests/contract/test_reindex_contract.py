"""The reindex steps on OpenSearchEngine: every request they send (index creation from products-v2, bulk copy,
scroll, mget, count, search, the one atomic ``_aliases`` remove+add) validates against the OpenSearch API spec."""

from __future__ import annotations

import numpy as np
import pytest

from indexing import fields as F
from indexing.engines.base import BulkAction
from indexing.lifecycle import generation_name
from indexing.pipeline import Encoders
from indexing.reindex import MemoryRecord, ReindexPlan, VerificationError, create_target, fill, swap, verify
from mappings import load_mapping

pytestmark = pytest.mark.contract

ALIAS = "products"
N = 7


@pytest.fixture
def source(engine, server):
    enc = Encoders("minilm", "torch", "efficientnet_lite0", "cpu")
    t, i = enc.text_info, enc.image_info  # dims and model ids, no model loaded
    src = generation_name(ALIAS, now=1_700_000_000)
    engine.create_index(src, load_mapping("products-v1", text_dim=t.dim, image_dim=i.dim))
    engine.swap_alias(ALIAS, src)
    rng = np.random.default_rng(0)
    docs = [
        {F.ID: str(k), F.TITLE: f"Blue Denim Jacket {k}", F.IMAGE: f"images/{k}.jpg", F.HAS_IMAGE: True,
         F.TEXT_VEC: rng.standard_normal(t.dim).astype(np.float32), F.IMAGE_VEC: rng.standard_normal(i.dim).astype(np.float32),
         F.TEXT_MODEL_ID: t.model_id, F.IMAGE_MODEL_ID: i.model_id, F.CONTENT_HASH: f"h{k}", F.INDEXED_AT: 1_700_000_000}
        for k in range(N)
    ]
    engine.bulk(src, [BulkAction.index(d[F.ID], d) for d in docs], refresh=True)
    plan = ReindexPlan(job_id="j1", alias=ALIAS, source=src, target=generation_name(ALIAS, now=1_800_000_000), mapping="products-v2",
                       text_model="minilm", text_backend="torch", image_model="efficientnet_lite0", device="cpu", batch_size=3)
    server.requests.clear()
    return plan, enc


def _script_smoke(server, n: int) -> None:
    for _ in range(n):
        server.script_search([("0", 1.0, None)])


def test_reindex_requests_match_the_spec(engine, server, spec, source):
    plan, enc = source
    create_target(engine, plan, enc)
    rec = MemoryRecord()
    results = fill(engine, plan, rec, encoders=enc)
    assert [r.batch for r in results] == [0, 1, 2] and sum(r.copied for r in results) == N
    assert all(r.reencoded == 0 for r in results)  # same model ids: vectors copied, nothing encoded
    _script_smoke(server, 6)
    report = verify(engine, plan, smoke_queries=5)
    assert (report.source_count, report.target_count) == (N, N)
    assert swap(engine, plan) == [plan.source]

    create = server.of("indices.create")
    assert len(create) == 1 and create[0].path == f"/{plan.target}"
    spec.validate_request("indices.create", create[0].body)
    body = create[0].json()
    assert body["mappings"]["properties"][F.TEXT_VEC]["method"]["parameters"] == {"m": 32, "ef_construction": 256}
    assert body["mappings"]["properties"][F.TEXT_VEC]["dimension"] == enc.text_info.dim

    (aliases,) = server.of("indices.update_aliases")
    spec.validate_request("indices.update_aliases", aliases.body)
    assert aliases.json() == {"actions": [{"remove": {"index": plan.source, "alias": ALIAS}}, {"add": {"index": plan.target, "alias": ALIAS}}]}

    checked = {spec.validate_captured(r.method, r.path, r.body) for r in server.requests}
    assert {"indices.create", "bulk", "search", "scroll", "mget", "count", "indices.update_aliases"} <= checked
    # the copies carry the source's vectors unchanged
    assert server.docs[plan.target]["3"][F.TEXT_VEC] == pytest.approx(server.docs[plan.source]["3"][F.TEXT_VEC])


def test_failed_smoke_queries_stop_the_swap(engine, server, source):
    plan, enc = source
    create_target(engine, plan, enc)
    fill(engine, plan, MemoryRecord(), encoders=enc)
    server.requests.clear()
    with pytest.raises(VerificationError, match="smoke queries"):
        verify(engine, plan)  # the fake answers unscripted searches with no hits
    assert server.of("indices.update_aliases") == []
    assert engine.get_alias(ALIAS) == [plan.source]


def test_the_fill_reads_in_product_id_order_and_a_resume_asks_for_the_ids_after_the_last_finished_one(engine, server, spec, source):
    """The fill's reads are sorted ``search_after`` pages on the product id keyword (valid ``search`` bodies); a
    fill resumed after batch 0 starts its first page after that batch's last id and writes each document once."""
    plan, enc = source
    create_target(engine, plan, enc)
    rec = MemoryRecord()

    def stop_after_first(at: str) -> None:
        if at == "fill:0":
            raise RuntimeError(at)

    with pytest.raises(RuntimeError):
        fill(engine, plan, rec, encoders=enc, checkpoint=stop_after_first)
    (first,) = rec.batches.values()
    assert (first.after, first.last, first.stop - first.start) == (None, "2", 3)
    assert rec.coverage().ranges == [(None, "2", 3)]
    reads = [r for r in server.of("search") if r.path == f"/{plan.source}/_search" and "scroll" not in r.params]
    assert reads[0].json() == {"size": 3, "sort": [{F.ID: {"order": "asc"}}], "track_total_hits": False, "query": {"match_all": {}}}

    server.requests.clear()
    results = fill(engine, plan, rec, encoders=enc)
    assert [(r.batch, r.after, r.last) for r in results] == [(1, "2", "5"), (2, "5", "6")]
    assert sum(r.copied for r in results) == N - 3 and all(r.unchanged == 0 for r in results)  # nothing read twice
    reads = [r for r in server.of("search") if r.path == f"/{plan.source}/_search"]
    assert [r.json().get("search_after") for r in reads] == [["2"], ["5"]]
    assert reads[0].json()["query"] == {"range": {F.ID: {"gt": "2"}}}
    for r in reads:
        spec.validate_request("search", r.body)
    assert sorted(server.docs[plan.target]) == sorted(server.docs[plan.source])

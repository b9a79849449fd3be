"""OpenSearchEngine against a real cluster (tests marked ``opensearch``): the OpenSearch node the test session
starts (``tests/conftest.py``), or the cluster at ``OPENSEARCH_URL``:

    OPENSEARCH_URL=http://localhost:9200 .venv/bin/python -m pytest -m opensearch

The shared engine suite (tests/indexing/test_engine_suite.py) runs the behaviour both engines share; this file
covers what only a real cluster can show: efficient knn filtering, server-side per-item rejections, atomic
alias swaps, scroll.
"""

from __future__ import annotations


import numpy as np
import pytest

from indexing import fields as F
from indexing.engines.base import BulkAction, Filters, Range
from mappings import load_mapping

pytestmark = [pytest.mark.opensearch]
DIM = 8
COLOURS = ("Red", "Blue", "Black", "White", "Green")



def _doc(i: int) -> dict:
    rng = np.random.default_rng(i)
    v = rng.standard_normal(DIM).astype(np.float32)
    return {F.ID: str(i), F.TITLE: f"{COLOURS[i % 5].lower()} cotton shirt {i}", F.COLOUR: COLOURS[i % 5], F.PRICE: float(i),
            F.TEXT_VEC: v / np.linalg.norm(v), F.IMAGE_VEC: np.roll(v, 1) / np.linalg.norm(v)}


def test_lifecycle_search_and_alias_swap_on_a_real_cluster(live, opensearch_node):
    eng, prefix = live
    v1, v2, alias = prefix + "v1", prefix + "v2", prefix + "alias"
    eng.create_index(v1, load_mapping(text_dim=DIM, image_dim=DIM, hnsw_engine=opensearch_node.hnsw_engine))
    assert eng.swap_alias(alias, v1) == []
    bad = BulkAction.index("bad", {F.ID: "bad", F.PRICE: "cheap"})
    summary = eng.bulk(alias, [BulkAction.index(str(i), _doc(i)) for i in range(50)] + [bad], chunk_size=16)
    assert summary.succeeded == 50 and [(f.id, f.status) for f in summary.failed] == [("bad", 400)]
    assert "mapper_parsing_exception" in summary.failed[0].error
    assert eng.count(alias) == 50

    red = Filters(terms={F.COLOUR: "Red"}, ranges={F.PRICE: Range(lte=40)})
    hits = eng.knn_search(alias, F.TEXT_VEC, _doc(7)[F.TEXT_VEC], k=20, filters=red, source=[F.COLOUR, F.PRICE])
    assert len(hits) == 9  # efficient filtering: every red item priced <= 40 (0, 5, ..., 40), not k minus the filtered-out
    assert all(h.source[F.COLOUR] == "Red" and h.source[F.PRICE] <= 40 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert eng.knn_search(alias, F.TEXT_VEC, _doc(7)[F.TEXT_VEC], k=1)[0].id == "7"

    bm25 = eng.bm25_search(alias, "red shirt", size=100, filters=Filters(ranges={F.PRICE: Range(gte=10)}))
    assert bm25 and {h.id for h in bm25[:8]} <= {str(i) for i in range(10, 50, 5)}
    assert set(eng.get(alias, ["3", "nope"], fields=[F.TITLE])) == {"3"}
    assert sorted(d[F.ID] for d in eng.iter_documents(alias, batch_size=7)) == sorted(str(i) for i in range(50))

    eng.create_index(v2, load_mapping(text_dim=DIM, image_dim=DIM, hnsw_engine=opensearch_node.hnsw_engine))
    assert eng.swap_alias(alias, v2) == [v1] and eng.get_alias(alias) == [v2] and eng.count(alias) == 0
    assert eng.list_indices(prefix) == [v1, v2]


def test_the_document_cache_prefills_and_a_write_is_still_seen(live, opensearch_node):
    """get_arrays after prefill_doc_cache reads no source; a changed document is fetched again, never served stale."""
    eng, prefix = live
    idx = prefix + "cache"
    eng.create_index(idx, load_mapping(text_dim=DIM, image_dim=DIM, hnsw_engine=opensearch_node.hnsw_engine))
    assert eng.bulk(idx, [BulkAction.index(str(i), _doc(i)) for i in range(30)], refresh=True).ok
    fields = [F.TEXT_VEC, F.IMAGE_VEC, F.COLOUR]
    assert eng.prefill_doc_cache(idx, fields) == 30
    before = dict(eng.doc_cache_stats)
    got = eng.get_arrays(idx, [str(i) for i in range(30)], fields=[F.TEXT_VEC, F.COLOUR])
    assert len(got) == 30 and eng.doc_cache_stats["hits"] - before["hits"] == 30 and eng.doc_cache_stats["misses"] == before["misses"]
    np.testing.assert_allclose(got["7"][F.TEXT_VEC], _doc(7)[F.TEXT_VEC], atol=1e-6)
    changed = {**_doc(7), F.COLOUR: "Purple"}
    assert eng.bulk(idx, [BulkAction.index("7", changed)], refresh=True).ok
    again = eng.get_arrays(idx, ["7", "8"], fields=fields)
    assert again["7"][F.COLOUR] == "Purple" and eng.doc_cache_stats["misses"] == before["misses"] + 1

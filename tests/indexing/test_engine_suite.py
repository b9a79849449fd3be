"""The engine suite: one set of behaviours every SearchEngine must show, run against each engine.

``local`` (LocalEngine on a temp folder) and ``opensearch`` (the real OpenSearch node the session starts, or
the cluster at ``OPENSEARCH_URL``) always run. Each test
uses its own uniquely named indices and deletes them afterwards. kNN scores are the raw similarities on
both engines (OpenSearch's ``1 + ip`` / ``1 / (1 - ip)`` translation is undone by OpenSearchEngine).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterator

import numpy as np
import pytest

import mappings
from indexing import fields as F
from indexing.engines.base import BulkAction, Filters, Range, SearchEngine
from indexing.errors import ConfigError, IndexExistsError, IndexNotFoundError, MappingError

TEXT_DIM = 8
IMAGE_DIM = 4


@pytest.fixture(params=["local", pytest.param("opensearch", marks=pytest.mark.opensearch)])
def engine_kind(request) -> str:
    return request.param


@pytest.fixture()
def hnsw_engine(request, engine_kind) -> str | None:
    """The HNSW engine indices are created with: the mapping's own locally, the node's on OpenSearch."""
    return request.getfixturevalue("opensearch_node").hnsw_engine if engine_kind == "opensearch" else None


@pytest.fixture()
def engine(request, engine_kind, tmp_path) -> Iterator[SearchEngine]:
    if engine_kind == "local":
        from indexing.engines.local import LocalEngine

        eng: SearchEngine = LocalEngine(tmp_path / "engine")
    else:
        eng = request.getfixturevalue("opensearch_node").engine()
    yield eng
    eng.close()


@pytest.fixture()
def new_index(engine, hnsw_engine) -> Iterator[Callable[[], str]]:
    """Creates uniquely named products-v1 indices on ``engine`` and deletes them after the test."""
    created: list[str] = []

    def make() -> str:
        name = f"suite-{uuid.uuid4().hex[:10]}"
        engine.create_index(name, mappings.load_mapping("products-v1", text_dim=TEXT_DIM, image_dim=IMAGE_DIM, hnsw_engine=hnsw_engine))
        created.append(name)
        return name

    yield make
    for name in created:
        try:
            engine.delete_index(name)
        except IndexNotFoundError:
            pass


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


COLOURS = ["Black", "Blue", "Red", "White", "Green"]


def catalog(n: int, seed: int = 0) -> tuple[list[dict[str, Any]], np.ndarray]:
    """``n`` plain products with text vectors (every 7th has an image vector too)."""
    rng = np.random.default_rng(seed)
    vecs = unit(rng, n, TEXT_DIM)
    img = unit(rng, n, IMAGE_DIM)
    docs = []
    for i in range(n):
        d = {
            F.ID: f"p{i:04d}",
            F.TITLE: f"item {i} plain product",
            F.COLOUR: COLOURS[i % len(COLOURS)],
            F.PRICE: float(i % 100),
            F.YEAR: 2000 + i % 20,
            F.TEXT_VEC: vecs[i].tolist(),
        }
        if i % 7 == 0:
            d[F.IMAGE_VEC] = img[i].tolist()
        docs.append(d)
    return docs, vecs


def index_docs(engine: SearchEngine, index: str, docs: list[dict[str, Any]]) -> None:
    summary = engine.bulk(index, (BulkAction.index(d[F.ID], d) for d in docs), chunk_size=50, refresh=True)
    assert summary.ok, summary.failed[:3]
    assert summary.succeeded == len(docs)


# --------------------------------------------------------------------------- lifecycle
def test_create_index_from_mapping_and_lifecycle_errors(engine, new_index, hnsw_engine):
    name = new_index()
    assert engine.index_exists(name)
    assert name in engine.list_indices("suite-")
    props = engine.get_mapping(name)["mappings"]["properties"]
    assert props[F.TEXT_VEC]["dimension"] == TEXT_DIM and props[F.IMAGE_VEC]["dimension"] == IMAGE_DIM
    assert engine.count(name) == 0
    with pytest.raises(IndexExistsError):
        engine.create_index(name, mappings.load_mapping("products-v1", text_dim=TEXT_DIM, image_dim=IMAGE_DIM, hnsw_engine=hnsw_engine))
    engine.delete_index(name)
    assert not engine.index_exists(name)
    with pytest.raises(IndexNotFoundError):
        engine.delete_index(name)
    with pytest.raises(IndexNotFoundError):
        engine.count(name)


# --------------------------------------------------------------------------- bulk
def test_bulk_upsert_replace_delete_with_per_item_failures(engine, new_index):
    name = new_index()
    docs, _ = catalog(20)
    actions = [BulkAction.index(d[F.ID], d) for d in docs[:10]]
    actions.insert(3, BulkAction.index("bad-dim", {F.ID: "bad-dim", F.TITLE: "wrong vector", F.TEXT_VEC: [0.1, 0.2, 0.3]}))
    actions.insert(6, BulkAction.index("bad-field", {F.ID: "bad-field", F.TITLE: "x", "no_such_field": 1}))
    actions.append(BulkAction.delete("never-indexed"))
    actions.extend(BulkAction.index(d[F.ID], d) for d in docs[10:])
    summary = engine.bulk(name, iter(actions), chunk_size=4, refresh=True)

    assert summary.succeeded == 20
    by_id = {f.id: f for f in summary.failed}
    assert set(by_id) == {"bad-dim", "bad-field", "never-indexed"}
    assert "dimension" in by_id["bad-dim"].error.lower()
    assert "no_such_field" in by_id["bad-field"].error
    assert by_id["never-indexed"].status == 404 and not by_id["never-indexed"].ok
    assert engine.count(name) == 20  # the rest of the batch was written
    assert engine.get(name, ["bad-dim", "bad-field"]) == {}

    # index = full replace: the new source has no text_vec, so p0003 is no longer a kNN candidate
    summary = engine.bulk(
        name,
        [BulkAction.index("p0003", {F.ID: "p0003", F.TITLE: "replaced title"}), BulkAction.delete("p0004")],
        refresh=True,
    )
    assert summary.ok and summary.succeeded == 2
    assert engine.count(name) == 19
    got = engine.get(name, ["p0003", "p0004", "p0005"])
    assert set(got) == {"p0003", "p0005"}
    assert got["p0003"] == {F.ID: "p0003", F.TITLE: "replaced title"}
    hits = engine.knn_search(name, F.TEXT_VEC, docs[3][F.TEXT_VEC], k=20)
    assert {h.id for h in hits} == {d[F.ID] for d in docs} - {"p0003", "p0004"}


# --------------------------------------------------------------------------- BM25
def _bm25_docs() -> list[dict[str, Any]]:
    rows = [
        ("a", "Trail running shoe", "Footwear > Shoes", "Lightweight shoe for running on rough paths"),
        ("b", "Leather office bag", "Bags", "A bag with a shoe compartment"),
        ("c", "Cotton crew socks", "Footwear > Socks", "Soft socks for everyday wear"),
        ("d", "Canvas tote", "Bags", "Tote with a print of a trail map"),
        ("e", "Wool scarf", "Accessories", "Warm scarf for winter"),
        ("f", "Denim jacket", "Apparel > Jackets", "Classic denim jacket"),
    ]
    return [{F.ID: i, F.TITLE: t, F.CATEGORY: c, F.DESCRIPTION: d, F.COLOUR: "Black", F.PRICE: 10.0} for i, t, c, d in rows]


def test_bm25_title_match_ranks_first_and_stemming(engine, new_index):
    name = new_index()
    index_docs(engine, name, _bm25_docs())
    hits = engine.bm25_search(name, "running shoes", size=10)
    ids = [h.id for h in hits]
    assert ids[0] == "a"  # title + category + description all match
    assert "b" in ids  # "shoes" finds "shoe" in b's description (English stemming)
    assert ids.index("a") < ids.index("b")
    assert all(h.score > 0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert "e" not in ids and "f" not in ids
    assert [h.id for h in engine.bm25_search(name, "jackets", size=5)] == ["f"]  # plural -> singular stem


def test_bm25_field_boosts_change_the_order(engine, new_index):
    name = new_index()
    index_docs(engine, name, _bm25_docs())
    # "trail" is in a's title and in d's description
    default = [h.id for h in engine.bm25_search(name, "trail", size=10)]
    assert default.index("a") < default.index("d")
    boosted = [h.id for h in engine.bm25_search(name, "trail", size=10, fields={F.TITLE: 0.1, F.DESCRIPTION: 10.0})]
    assert boosted.index("d") < boosted.index("a")
    only_title = {h.id for h in engine.bm25_search(name, "trail", size=10, fields={F.TITLE: 1.0})}
    assert only_title == {"a"}


def test_bm25_source_and_size(engine, new_index):
    name = new_index()
    index_docs(engine, name, _bm25_docs())
    hits = engine.bm25_search(name, "bag tote shoe socks", size=2, source=[F.TITLE])
    assert len(hits) == 2
    assert all(set(h.source) == {F.TITLE} for h in hits)
    assert all(h.source is None for h in engine.bm25_search(name, "bag", size=3))


@pytest.mark.parametrize("query", ['$ hole saw', '1/2" pipe', "AND (", "title:(shoe OR", "*", "~!@#$%^&*()_+{}|:<>?", "", "   ", "NOT", "shoe^2 -bag"])
def test_bm25_hostile_query_strings_never_raise(engine, new_index, query):
    name = new_index()
    index_docs(engine, name, _bm25_docs())
    hits = engine.bm25_search(name, query, size=5)
    assert isinstance(hits, list) and len(hits) <= 5


# --------------------------------------------------------------------------- filters
def test_term_and_range_filters(engine, new_index):
    name = new_index()
    docs, _ = catalog(60)
    index_docs(engine, name, docs)
    cases = [
        Filters(terms={F.COLOUR: "Black"}),
        Filters(terms={F.COLOUR: ["Red", "Blue"]}),
        Filters(ranges={F.PRICE: Range(gte=10, lt=20)}),
        Filters(ranges={F.PRICE: Range(gt=50)}),
        Filters(ranges={F.YEAR: Range(lte=2004)}),
        Filters(terms={F.COLOUR: ["White"]}, ranges={F.PRICE: Range(lte=30), F.YEAR: Range(gte=2003)}),
        Filters(terms={F.COLOUR: "Purple"}),
    ]
    for flt in cases:
        want = {d[F.ID] for d in docs if flt.matches(d)}
        got = {h.id for h in engine.bm25_search(name, "plain product", size=100, filters=flt)}
        assert got == want, flt
        knn = engine.knn_search(name, F.TEXT_VEC, docs[0][F.TEXT_VEC], k=100, filters=flt)
        assert {h.id for h in knn} == want, flt


@pytest.mark.opensearch
def test_a_native_knn_index_is_refused_where_the_node_has_no_native_libraries(opensearch_node):
    """The Maven-built node's k-NN has no faiss: such an index took the mapping, then every bulk write hung."""
    if opensearch_node.external:
        pytest.skip("only the dev/test node says it has no native k-NN libraries")
    engine = opensearch_node.engine()
    name = f"suite-{uuid.uuid4().hex[:10]}"
    with pytest.raises(MappingError, match="no native libraries.*FUSIONRANK_HNSW_ENGINE=lucene"):
        engine.create_index(name, mappings.load_mapping("products-v1", text_dim=TEXT_DIM, image_dim=IMAGE_DIM, hnsw_engine="faiss"))
    assert not engine.index_exists(name)


def test_term_filter_on_an_analysed_text_field_is_refused_with_a_hint(engine, new_index):
    """OpenSearch matched a term filter on a text field against its tokens and found nothing, silently."""
    name = new_index()
    docs, _ = catalog(10)
    index_docs(engine, name, docs)
    flt = Filters(terms={F.TITLE: docs[0][F.TITLE]})
    with pytest.raises(ConfigError, match=r"analyzed text field 'title'.*keyword sub-field 'title\.raw'"):
        engine.bm25_search(name, "plain product", filters=flt)
    with pytest.raises(ConfigError, match="analyzed text field 'title'"):
        engine.knn_search(name, F.TEXT_VEC, docs[0][F.TEXT_VEC], k=5, filters=flt)
    hits = engine.bm25_search(name, "plain product", filters=Filters(terms={"title.raw": docs[0][F.TITLE]}))
    assert [h.id for h in hits] == [docs[0][F.ID]]


# --------------------------------------------------------------------------- kNN
def test_knn_scores_are_the_inner_products_on_every_engine(engine, new_index):
    """The model reads kNN scores as inner products; OpenSearch's translated scores are turned back."""
    name = new_index()
    docs, vecs = catalog(120, seed=4)
    index_docs(engine, name, docs)
    q = unit(np.random.default_rng(5), 1, TEXT_DIM)[0]
    hits = engine.knn_search(name, F.TEXT_VEC, q, k=120)
    ip = {d[F.ID]: float(vecs[i] @ q) for i, d in enumerate(docs)}
    assert len(hits) == 120 and min(ip.values()) < -0.3 < 0.3 < max(ip.values())  # both branches of the translation
    np.testing.assert_allclose([h.score for h in hits], [ip[h.id] for h in hits], atol=1e-4)


def test_knn_exact_order_matches_brute_force(engine, new_index):
    name = new_index()
    docs, vecs = catalog(300, seed=1)
    index_docs(engine, name, docs)
    rng = np.random.default_rng(7)
    for q in unit(rng, 5, TEXT_DIM):
        hits = engine.knn_search(name, F.TEXT_VEC, q, k=20)
        want = [docs[i][F.ID] for i in np.argsort(-(vecs @ q), kind="stable")[:20]]
        assert [h.id for h in hits] == want
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_filtered_knn_searches_only_matching_documents(engine, new_index):
    name = new_index()
    docs, vecs = catalog(300, seed=2)
    index_docs(engine, name, docs)
    q = unit(np.random.default_rng(3), 1, TEXT_DIM)[0]
    flt = Filters(terms={F.COLOUR: "Green"}, ranges={F.PRICE: Range(lt=50)})
    members = np.array([i for i, d in enumerate(docs) if flt.matches(d)])
    want = [docs[i][F.ID] for i in members[np.argsort(-(vecs[members] @ q), kind="stable")][:10]]
    hits = engine.knn_search(name, F.TEXT_VEC, q, k=10, filters=flt)
    assert [h.id for h in hits] == want
    # documents without the vector field are simply not candidates
    img = engine.knn_search(name, F.IMAGE_VEC, np.ones(IMAGE_DIM) / 2, k=100)
    assert {h.id for h in img} == {d[F.ID] for d in docs if F.IMAGE_VEC in d}


def test_knn_with_source(engine, new_index):
    name = new_index()
    docs, vecs = catalog(30)
    index_docs(engine, name, docs)
    hits = engine.knn_search(name, F.TEXT_VEC, vecs[5], k=3, source=[F.TITLE, F.PRICE])
    assert hits[0].id == "p0005"
    assert hits[0].source == {F.TITLE: docs[5][F.TITLE], F.PRICE: docs[5][F.PRICE]}


# --------------------------------------------------------------------------- get, count, iterate
def test_get_by_ids_with_fields_and_vectors(engine, new_index):
    name = new_index()
    docs, vecs = catalog(30)
    index_docs(engine, name, docs)
    got = engine.get(name, ["p0001", "p0007", "missing"])
    assert set(got) == {"p0001", "p0007"}
    assert got["p0001"][F.TITLE] == docs[1][F.TITLE]
    assert np.allclose(got["p0007"][F.TEXT_VEC], vecs[7], atol=1e-6)
    assert np.allclose(got["p0007"][F.IMAGE_VEC], docs[7][F.IMAGE_VEC], atol=1e-6)
    assert F.IMAGE_VEC not in got["p0001"]
    only = engine.get(name, ["p0002"], fields=[F.TEXT_VEC])
    assert set(only["p0002"]) == {F.TEXT_VEC}
    assert all(isinstance(x, float) for x in only["p0002"][F.TEXT_VEC])
    assert engine.get(name, []) == {}


def test_get_arrays_never_serves_a_stale_vector(engine, new_index):
    """The rerank call's fetch: vectors as float32 rows, cached by the engine, and a write is seen at once."""
    name = new_index()
    docs, vecs = catalog(20, seed=6)
    index_docs(engine, name, docs)
    fields = [F.TEXT_VEC, F.COLOUR]
    first = engine.get_arrays(name, ["p0003", "p0004", "missing"], fields=fields)
    assert set(first) == {"p0003", "p0004"} and first["p0003"][F.TEXT_VEC].dtype == np.float32
    np.testing.assert_allclose(first["p0003"][F.TEXT_VEC], vecs[3], atol=1e-6)
    again = engine.get_arrays(name, ["p0004", "p0003"], fields=fields)
    np.testing.assert_allclose(again["p0004"][F.TEXT_VEC], vecs[4], atol=1e-6)
    if hasattr(engine, "doc_cache_stats"):  # OpenSearch: the second read was served from the versioned cache
        assert engine.doc_cache_stats["hits"] >= 2
    new = unit(np.random.default_rng(99), 1, TEXT_DIM)[0]
    changed = {**docs[3], F.TEXT_VEC: new, F.COLOUR: "Purple"}
    assert engine.bulk(name, [BulkAction.index("p0003", changed), BulkAction.delete("p0004")], refresh=True).ok
    after = engine.get_arrays(name, ["p0003", "p0004"], fields=fields)
    assert set(after) == {"p0003"} and after["p0003"][F.COLOUR] == "Purple"
    np.testing.assert_allclose(after["p0003"][F.TEXT_VEC], new, atol=1e-6)


def test_count_and_iter_documents(engine, new_index):
    name = new_index()
    docs, _ = catalog(130)
    index_docs(engine, name, docs)
    assert engine.count(name) == 130
    seen = list(engine.iter_documents(name, batch_size=40))
    assert sorted(d[F.ID] for d in seen) == [d[F.ID] for d in docs]
    by_id = {d[F.ID]: d for d in seen}
    assert by_id["p0042"][F.COLOUR] == docs[42][F.COLOUR]


# --------------------------------------------------------------------------- aliases
def test_alias_swap_and_reading_through_an_alias(engine, new_index):
    old, new = new_index(), new_index()
    alias = f"suite-alias-{uuid.uuid4().hex[:8]}"
    docs, _ = catalog(10)
    index_docs(engine, old, docs[:4])
    index_docs(engine, new, docs)
    assert engine.get_alias(alias) == []
    assert engine.swap_alias(alias, old) == []
    assert engine.get_alias(alias) == [old]
    assert engine.index_exists(alias)
    assert engine.count(alias) == 4
    assert engine.swap_alias(alias, new) == [old]
    assert engine.get_alias(alias) == [new]
    assert engine.count(alias) == 10
    assert {h.id for h in engine.bm25_search(alias, "plain", size=50)} == {d[F.ID] for d in docs}
    assert set(engine.get(alias, ["p0009"])) == {"p0009"}
    assert engine.get_mapping(alias)["mappings"]["properties"][F.TEXT_VEC]["dimension"] == TEXT_DIM
    # writes through the alias land in the index it points at
    s = engine.bulk(alias, [BulkAction.delete("p0000")], refresh=True)
    assert s.ok
    assert engine.count(new) == 9 and engine.count(old) == 4


# --------------------------------------------------------------------------- photo-completed attributes (products-v4)
def test_include_completed_filters_read_photo_completed_colours(engine, hnsw_engine):
    """A products-v4 index whose documents carry what indexing writes (:func:`attribute_document_fields`): a colour
    filter matches the catalog's colours only, and with ``include_completed`` the photo-completed ones too (never a
    prediction below the completion threshold); on the live node as on LocalEngine."""
    from indexing.photo_attributes import AttributeValue, Prediction, attribute_document_fields, attribute_value

    name = f"suite-{uuid.uuid4().hex[:10]}"
    engine.create_index(name, mappings.load_mapping("products-v4", text_dim=TEXT_DIM, image_dim=IMAGE_DIM, hnsw_engine=hnsw_engine))
    old = f"suite-{uuid.uuid4().hex[:10]}"
    engine.create_index(old, mappings.load_mapping("products-v1", text_dim=TEXT_DIM, image_dim=IMAGE_DIM, hnsw_engine=hnsw_engine))
    try:
        docs, vecs = catalog(40, seed=3)
        for i, d in enumerate(docs):
            photo = COLOURS[(i // 2) % len(COLOURS)]  # what the photo shows
            if i % 2:  # half of the catalog lost its colour; the photo is read at 0.95, or 0.5 for every fourth
                d[F.COLOUR] = ""
            conf = 0.5 if i % 4 == 3 else 0.95
            preds = {"colour": Prediction(photo if i % 2 else d[F.COLOUR], conf)}
            d.update(attribute_document_fields(d, preds, "photo-attributes:test", threshold=0.8))
        index_docs(engine, name, docs)
        black = Filters(terms={F.COLOUR: "Black"})
        with_photo = Filters(terms={F.COLOUR: "Black"}, include_completed=True)
        catalog_black = {d[F.ID] for d in docs if d[F.COLOUR] == "Black"}
        completed_black = {d[F.ID] for d in docs if F.COLOUR in d[F.COMPLETED_ATTRIBUTES] and d[F.PHOTO_COLOUR] == "Black"}
        unsure_black = {d[F.ID] for d in docs if not d[F.COLOUR] and d.get(F.PHOTO_COLOUR) == "Black" and d[F.PHOTO_COLOUR_CONFIDENCE] < 0.8}
        assert catalog_black and completed_black and unsure_black  # the data has all three kinds
        assert {i for i, d in ((d[F.ID], d) for d in docs) if attribute_value(d, "colour") == AttributeValue("Black", "photo", 0.95)} == completed_black
        for flt, want in ((black, catalog_black), (with_photo, catalog_black | completed_black)):
            got = {h.id for h in engine.bm25_search(name, "plain product", size=100, filters=flt)}
            assert got == want, flt
            assert {h.id for h in engine.knn_search(name, F.TEXT_VEC, vecs[0], k=100, filters=flt)} == want, flt
            assert not got & unsure_black  # a prediction below the threshold completes nothing
        # several colours at once, and a colour only photos show
        two = Filters(terms={F.COLOUR: ["Black", "Red"]}, include_completed=True)
        assert {h.id for h in engine.bm25_search(name, "plain product", size=100, filters=two)} == \
            {d[F.ID] for d in docs if attribute_value(d, "colour").value in ("Black", "Red") and attribute_value(d, "colour").confidence >= 0.8}
        # an index without the photo fields refuses include_completed instead of matching nothing
        index_docs(engine, old, catalog(5)[0])
        with pytest.raises((ConfigError, MappingError)):
            engine.bm25_search(old, "plain product", size=10, filters=with_photo)
    finally:
        for n in (name, old):
            try:
                engine.delete_index(n)
            except IndexNotFoundError:
                pass

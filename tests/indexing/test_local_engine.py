"""LocalEngine behaviour beyond the shared engine suite: persistence, processes, crashes, faiss, aliases
under concurrent readers, precise errors, the merge policy, and the engine benchmark."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
import zlib
from typing import Any

import numpy as np
import pytest

import mappings
from indexing import fields as F
from indexing.engines import create_engine
from indexing.engines.base import BulkAction, Filters, Range, SearchEngine
from indexing.engines.local import LocalEngine
from indexing.engines.local_store import SEGMENT_PREFIX, plan_merge, read_manifest
from indexing.errors import ConfigError, DimensionError, EngineError, IndexExistsError, IndexNotFoundError, MappingError

DIM = 8


def body(text_dim: int = DIM, image_dim: int = 4) -> dict[str, Any]:
    return mappings.load_mapping("products-v1", text_dim=text_dim, image_dim=image_dim)


def vec(doc_id: str, version: int = 0, dim: int = DIM) -> list[float]:
    """A deterministic unit vector per (id, version), so any process can recompute what it should be."""
    seed = zlib.crc32(doc_id.encode()) + 7919 * version
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def doc(doc_id: str, version: int = 0, **extra: Any) -> dict[str, Any]:
    return {F.ID: doc_id, F.TITLE: f"product {doc_id} version {version}", F.COLOUR: "Black", F.TEXT_VEC: vec(doc_id, version), **extra}


@pytest.fixture()
def eng(tmp_path) -> LocalEngine:
    e = LocalEngine(tmp_path / "engine")
    yield e
    e.close()


def test_is_registered_and_implements_the_protocol(tmp_path):
    e = create_engine("local", path=tmp_path / "x")
    assert isinstance(e, LocalEngine) and isinstance(e, SearchEngine)
    assert e.name == "local"


# --------------------------------------------------------------------------- persistence and visibility
def test_a_new_instance_finds_indices_documents_vectors_and_aliases(tmp_path):
    path = tmp_path / "engine"
    first = LocalEngine(path)
    first.create_index("gen-1", body())
    first.bulk("gen-1", [BulkAction.index(f"p{i}", doc(f"p{i}")) for i in range(25)])
    first.swap_alias("products", "gen-1")
    first.close()

    again = LocalEngine(path)  # a restarted process
    assert again.list_indices("gen") == ["gen-1"]
    assert again.get_alias("products") == ["gen-1"]
    assert again.count("products") == 25
    got = again.get("products", ["p3"])["p3"]
    assert got[F.TITLE] == "product p3 version 0"
    assert np.allclose(got[F.TEXT_VEC], vec("p3"), atol=1e-7)
    assert again.knn_search("products", F.TEXT_VEC, vec("p11"), k=1)[0].id == "p11"
    assert again.bm25_search("products", "p17", size=1)[0].id == "p17"


def test_other_instances_see_commits_after_refresh(tmp_path):
    writer, reader = LocalEngine(tmp_path / "e"), LocalEngine(tmp_path / "e")
    b = body()
    b["settings"]["index"]["refresh_interval"] = "-1"  # only explicit refreshes
    writer.create_index("idx", b)
    writer.bulk("idx", [BulkAction.index("a", doc("a"))])
    assert reader.count("idx") == 1
    writer.bulk("idx", [BulkAction.index("b", doc("b"))])
    assert writer.count("idx") == 2  # the writing instance sees its own commit
    assert reader.count("idx") == 1  # a reader keeps its snapshot...
    reader.refresh("idx")
    assert reader.count("idx") == 2  # ...until refresh
    assert reader.knn_search("idx", F.TEXT_VEC, vec("b"), k=1)[0].id == "b"


def test_readers_pick_up_commits_after_the_refresh_interval(tmp_path):
    writer, reader = LocalEngine(tmp_path / "e"), LocalEngine(tmp_path / "e")
    b = body()
    b["settings"]["index"]["refresh_interval"] = "50ms"
    writer.create_index("idx", b)
    assert reader.count("idx") == 0
    writer.bulk("idx", [BulkAction.index("a", doc("a"))])
    time.sleep(0.06)  # the feature under test is time-based: one interval passes
    assert reader.count("idx") == 1
    assert reader.knn_search("idx", F.TEXT_VEC, vec("a"), k=1)[0].id == "a"


def test_refresh_interval_setting_is_validated(eng):
    b = body()
    b["settings"]["index"]["refresh_interval"] = "soon"
    with pytest.raises(MappingError, match="refresh_interval"):
        eng.create_index("idx", b)


# --------------------------------------------------------------------------- processes
def _write_from_process(path: str, worker: int, n_batches: int, per_batch: int) -> None:
    e = LocalEngine(path)
    for b in range(n_batches):
        ids = [f"w{worker}-{b}-{i}" for i in range(per_batch)]
        actions = [BulkAction.index(i, doc(i)) for i in ids]
        actions.append(BulkAction.index("shared", doc("shared", version=worker)))
        s = e.bulk("idx", actions, chunk_size=7)
        assert s.ok, s.failed
    e.close()


@pytest.mark.slow
def test_two_processes_writing_concurrently_lose_nothing(tmp_path):
    path = tmp_path / "engine"
    LocalEngine(path).create_index("idx", body())
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_from_process, args=(str(path), w, 12, 25)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]

    e = LocalEngine(path)
    want = {f"w{w}-{b}-{i}" for w in (1, 2) for b in range(12) for i in range(25)} | {"shared"}
    assert e.count("idx") == len(want) == 601
    seen = {d[F.ID]: d for d in e.iter_documents("idx")}
    assert set(seen) == want
    for doc_id in ("w1-0-0", "w2-11-24", "w1-5-13"):
        assert np.allclose(seen[doc_id][F.TEXT_VEC], vec(doc_id), atol=1e-7)
    shared = seen["shared"]  # last writer wins, with that writer's vector: never a mix
    version = int(shared[F.TITLE].rsplit(" ", 1)[1])
    assert version in (1, 2) and np.allclose(shared[F.TEXT_VEC], vec("shared", version), atol=1e-7)
    knn = e.knn_search("idx", F.TEXT_VEC, vec("w2-7-3"), k=1)
    assert knn[0].id == "w2-7-3" and knn[0].score == pytest.approx(1.0, abs=1e-5)


def _crash_mid_bulk(path: str) -> None:
    import indexing.engines.local as local

    local.SEGMENT_FLUSH_BYTES = 2_000  # write vector segment files early, then die before the commit
    e = LocalEngine(path)

    def actions():
        for i in range(400):
            if i == 300:
                os._exit(3)  # a crash: no cleanup, no commit
            yield BulkAction.index(f"crash{i}", doc(f"crash{i}"))

    e.bulk("idx", actions(), chunk_size=50)


def test_a_crash_mid_bulk_leaves_the_last_commit_intact(tmp_path):
    path = tmp_path / "engine"
    e = LocalEngine(path)
    e.create_index("idx", body())
    e.bulk("idx", [BulkAction.index(f"ok{i}", doc(f"ok{i}")) for i in range(10)])
    p = mp.get_context("spawn").Process(target=_crash_mid_bulk, args=(str(path),))
    p.start()
    p.join(timeout=120)
    assert p.exitcode == 3
    store = path / "indices" / "idx" / "store"
    listed = set(read_manifest(store).segments)
    orphans = [f for f in os.listdir(store) if f.startswith(SEGMENT_PREFIX) and f not in listed]
    assert orphans  # the crashed writer had written unpublished segment files

    after = LocalEngine(path)
    assert after.count("idx") == 10  # nothing of the crashed call, everything before it
    assert after.get("idx", ["crash0"]) == {}
    assert after.knn_search("idx", F.TEXT_VEC, vec("ok4"), k=1)[0].id == "ok4"
    s = after.bulk("idx", [BulkAction.index("next", doc("next"))])  # the next writer cleans up
    assert s.ok and after.count("idx") == 11
    assert not [f for f in os.listdir(store) if f.startswith(SEGMENT_PREFIX) and f not in set(read_manifest(store).segments)]


def test_threads_with_separate_instances_serialize_their_writes(tmp_path):
    path = tmp_path / "engine"
    LocalEngine(path).create_index("idx", body())
    errors: list[BaseException] = []

    def write(prefix: str) -> None:
        try:
            e = LocalEngine(path)
            for b in range(5):
                assert e.bulk("idx", [BulkAction.index(f"{prefix}{b}-{i}", doc(f"{prefix}{b}-{i}")) for i in range(10)]).ok
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert LocalEngine(path).count("idx") == 150


# --------------------------------------------------------------------------- aliases
def test_alias_swap_is_atomic_for_a_concurrent_reader(eng):
    eng.create_index("gen-a", body())
    eng.create_index("gen-b", body())
    eng.bulk("gen-a", [BulkAction.index(f"a{i}", doc(f"a{i}")) for i in range(30)], refresh=True)
    eng.bulk("gen-b", [BulkAction.index(f"b{i}", doc(f"b{i}")) for i in range(45)], refresh=True)
    a_ids = {f"a{i}" for i in range(30)}
    b_ids = {f"b{i}" for i in range(45)}
    eng.swap_alias("live", "gen-a")
    stop = threading.Event()
    seen: list[str] = []
    problems: list[str] = []

    def reader() -> None:
        r = LocalEngine(eng.root)
        while not stop.is_set():
            ids = {h.id for h in r.bm25_search("live", "product version", size=100)}
            knn = {h.id for h in r.knn_search("live", F.TEXT_VEC, vec("a1"), k=100)}
            for got in (ids, knn):
                if got == a_ids:
                    seen.append("a")
                elif got == b_ids:
                    seen.append("b")
                else:
                    problems.append(f"mixed or partial result of {len(got)} ids")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            assert eng.swap_alias("live", "gen-b" if i % 2 == 0 else "gen-a") == ["gen-a" if i % 2 == 0 else "gen-b"]
    finally:
        stop.set()
        t.join()
    assert not problems, problems[:3]
    assert "a" in seen and "b" in seen


def test_alias_rules(eng):
    eng.create_index("gen-1", body())
    with pytest.raises(EngineError, match="an index of that name exists"):
        eng.swap_alias("gen-1", "gen-1")
    eng.swap_alias("products", "gen-1")
    with pytest.raises(IndexExistsError, match="alias"):
        eng.create_index("products", body())
    with pytest.raises(EngineError, match="is an alias"):
        eng.delete_index("products")
    with pytest.raises(IndexNotFoundError):
        eng.swap_alias("other", "no-such-index")
    with pytest.raises(ConfigError, match="invalid alias name"):
        eng.swap_alias("Bad Alias", "gen-1")
    eng.delete_index("gen-1")  # deleting the index removes the aliases pointing at it
    assert eng.get_alias("products") == []
    with pytest.raises(IndexNotFoundError, match="products"):
        eng.count("products")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b["mappings"]["properties"][F.TEXT_VEC].update(dimension=0), "dimension must be a positive integer"),
        (lambda b: b["mappings"]["properties"][F.TEXT_VEC].update(dimension="384"), "dimension must be a positive integer"),
        (lambda b: b["mappings"]["properties"][F.TEXT_VEC].update(dimension=True), "dimension must be a positive integer"),
        (lambda b: b["mappings"]["properties"].update(location={"type": "geo_point"}), "type 'geo_point' is not supported"),
        (lambda b: b["mappings"]["properties"][F.TITLE].update(analyzer="french_light"), "analyzer 'french_light'"),
        (lambda b: b["mappings"]["properties"][F.TEXT_VEC]["method"].update(space_type="hamming"), "space_type 'hamming'"),
        (lambda b: b.pop("mappings"), "mappings.properties"),
    ],
)
def test_bad_mappings_raise_mapping_error(eng, mutate, message):
    b = body()
    mutate(b)
    with pytest.raises(MappingError, match=message):
        eng.create_index("bad", b)
    assert not eng.index_exists("bad")


def test_bad_index_names_and_missing_indices(eng):
    for name in ("UPPER", "has space", "a/b", "-lead", "_lead", ".hidden", ""):
        with pytest.raises(ConfigError, match="index name"):
            eng.create_index(name, body())
    with pytest.raises(IndexNotFoundError, match="no index or alias named 'nope'"):
        eng.bm25_search("nope", "x")
    with pytest.raises(IndexNotFoundError):
        eng.bulk("nope", [BulkAction.index("a", doc("a"))])


def test_bulk_item_failures_carry_id_and_reason(eng):
    eng.create_index("idx", body())
    items = [
        BulkAction.index("ok", doc("ok")),
        BulkAction.index("dim", {**doc("dim"), F.TEXT_VEC: [1.0, 0.0]}),
        BulkAction.index("nan", {**doc("nan"), F.TEXT_VEC: [float("nan")] * DIM}),
        BulkAction.index("unknown", {**doc("unknown"), "shoe_size": 42}),
        BulkAction.index("price", {**doc("price"), F.PRICE: "cheap"}),
        BulkAction.index("flag", {**doc("flag"), F.HAS_IMAGE: "yes"}),
        BulkAction.index("notadict", ["a", "list"]),  # type: ignore[arg-type]
        BulkAction("upsert", "weird-op", {}),  # type: ignore[arg-type]
        BulkAction.delete("missing"),
        BulkAction.index("ok2", {**doc("ok2"), F.PRICE: "12.5", F.YEAR: 2011.0, F.HAS_IMAGE: True}),
    ]
    s = eng.bulk("idx", items, refresh=True)
    assert s.succeeded == 2
    reasons = {f.id: f.error for f in s.failed}
    assert reasons["dim"] == f"mapper_parsing_exception: Vector dimension mismatch for field [{F.TEXT_VEC}]. Expected: {DIM}, Given: 2"
    assert "NaN" in reasons["nan"]
    assert reasons["unknown"].startswith("strict_dynamic_mapping_exception") and "[shoe_size]" in reasons["unknown"]
    assert "price" in reasons["price"] and "not a number" in reasons["price"]
    assert "boolean" in reasons["flag"]
    assert "must be an object" in reasons["notadict"]
    assert "unknown op" in reasons["weird-op"]
    assert reasons["missing"] == "not_found" and {f.id: f.status for f in s.failed}["missing"] == 404
    assert set(eng.get("idx", [i.id for i in items])) == {"ok", "ok2"}
    assert eng.get("idx", ["ok2"], fields=[F.PRICE, F.YEAR])["ok2"] == {F.PRICE: "12.5", F.YEAR: 2011.0}
    assert [h.id for h in eng.bm25_search("idx", "product", filters=Filters(ranges={F.PRICE: Range(gt=12, lt=13)}))] == ["ok2"]
    with pytest.raises(ConfigError, match="chunk_size"):
        eng.bulk("idx", [], chunk_size=0)


def test_bad_queries_raise_precise_errors(eng):
    eng.create_index("idx", body())
    eng.bulk("idx", [BulkAction.index("a", doc("a"))])
    with pytest.raises(DimensionError, match="dimension 8"):
        eng.knn_search("idx", F.TEXT_VEC, [1.0, 0.0])
    with pytest.raises(ConfigError, match="not a knn_vector field"):
        eng.knn_search("idx", F.TITLE, vec("a"))
    with pytest.raises(ConfigError, match="cannot filter on 'shoe_size'"):
        eng.bm25_search("idx", "x", filters=Filters(terms={"shoe_size": "42"}))
    with pytest.raises(ConfigError, match="title.raw"):
        eng.bm25_search("idx", "x", filters=Filters(terms={F.TITLE: "x"}))
    with pytest.raises(ConfigError, match="not numeric"):
        eng.bm25_search("idx", "x", filters=Filters(ranges={F.COLOUR: Range(gte=1)}))
    with pytest.raises(ConfigError, match="size"):
        eng.bm25_search("idx", "x", size=-1)
    with pytest.raises(ConfigError, match="boost"):
        eng.bm25_search("idx", "x", fields={F.TITLE: float("nan")})
    with pytest.raises(ConfigError, match="query must be a string"):
        eng.bm25_search("idx", None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "query",
    ['$ hole saw', '1/2" pipe', "AND (", "OR OR OR", 'title:"unclosed', "a" * 500, "\x00\x01 shoe", "🙂 emoji", "[1 TO 5]", "\\", "((((((("],
)
def test_hostile_query_strings_never_raise(eng, query):
    eng.create_index("idx", body())
    eng.bulk("idx", [BulkAction.index("saw", {**doc("saw"), F.TITLE: "Hole saw 1/2 inch"}), BulkAction.index("pipe", {**doc("pipe"), F.TITLE: 'Copper pipe 1/2"'})])
    hits = eng.bm25_search("idx", query, size=5, filters=Filters(terms={F.COLOUR: query}))
    assert hits == []  # no product has that colour
    hits = eng.bm25_search("idx", query, size=5)
    if query in ("$ hole saw",):
        assert hits[0].id == "saw"
    if query == '1/2" pipe':
        assert hits[0].id == "pipe"


def test_filter_semantics_keyword_sub_fields_integers_and_booleans(eng):
    eng.create_index("idx", body())
    docs = [
        {**doc("a"), F.BRAND: "Acme Outdoor", F.YEAR: 2003, F.HAS_IMAGE: True},
        {**doc("b"), F.BRAND: "acme outdoor", F.YEAR: 2004, F.HAS_IMAGE: False},
        {**doc("c"), F.BRAND: "Other", F.YEAR: 2005},
    ]
    eng.bulk("idx", [BulkAction.index(d[F.ID], d) for d in docs])

    def ids(flt: Filters) -> list[str]:
        return sorted(h.id for h in eng.bm25_search("idx", "product", filters=flt))

    assert ids(Filters(terms={"brand.raw": "Acme Outdoor"})) == ["a"]  # keyword sub-field: exact, case-sensitive
    assert ids(Filters(ranges={F.YEAR: Range(gt=2003.5)})) == ["b", "c"]
    assert ids(Filters(ranges={F.YEAR: Range(gte=2003.5, lt=2004.5)})) == ["b"]
    assert ids(Filters(ranges={F.YEAR: Range(gt=2004, lt=2005)})) == []
    assert ids(Filters(terms={F.HAS_IMAGE: "true"})) == ["a"]
    assert ids(Filters(terms={F.HAS_IMAGE: [False]})) == ["b"]
    assert ids(Filters(terms={F.YEAR: ["2004", "2005"]})) == ["b", "c"]
    assert ids(Filters(ranges={F.PRICE: Range()})) == []  # an open range matches documents that have the field


# --------------------------------------------------------------------------- vectors
def test_faiss_hnsw_agrees_with_exact_search(tmp_path):
    rng = np.random.default_rng(5)
    n, dim = 3000, 32
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    exact, approx = LocalEngine(tmp_path / "exact"), LocalEngine(tmp_path / "hnsw", faiss_threshold=1000)
    for e in (exact, approx):
        e.create_index("idx", body(text_dim=dim))
        e.bulk("idx", (BulkAction.index(f"d{i}", {
            F.ID: f"d{i}", F.COLOUR: "even" if i % 2 == 0 else "odd", F.USAGE: "rare" if i % 10 == 0 else "common", F.TEXT_VEC: vecs[i],
        }) for i in range(n)), chunk_size=500)
    queries = rng.standard_normal((25, dim)).astype(np.float32)
    recalls = []
    rare = np.arange(0, n, 10)
    for q in queries:
        truth = [h.id for h in exact.knn_search("idx", F.TEXT_VEC, q, k=10)]
        assert truth == [f"d{i}" for i in np.argsort(-(vecs @ q), kind="stable")[:10]]
        got = approx.knn_search("idx", F.TEXT_VEC, q, k=10)
        recalls.append(len(set(truth) & {h.id for h in got}) / 10)
        assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)
        # a filtered set above the threshold goes through HNSW with an id selector: only matching documents
        even = approx.knn_search("idx", F.TEXT_VEC, q, k=10, filters=Filters(terms={F.COLOUR: "even"}))
        assert len(even) == 10 and all(int(h.id[1:]) % 2 == 0 for h in even)
        # a filtered set below the threshold (300 documents) is searched exactly
        small = approx.knn_search("idx", F.TEXT_VEC, q, k=10, filters=Filters(terms={F.USAGE: "rare"}))
        assert [h.id for h in small] == [f"d{i}" for i in rare[np.argsort(-(vecs[rare] @ q), kind="stable")][:10]]
    assert np.mean(recalls) >= 0.9


def test_filtered_knn_recall_is_exact_at_one_percent(eng):
    rng = np.random.default_rng(9)
    n = 5000
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    colours = rng.integers(0, 100, n)
    eng.create_index("idx", body())
    eng.bulk("idx", (BulkAction.index(f"d{i}", {F.ID: f"d{i}", F.COLOUR: f"c{colours[i]}", F.TEXT_VEC: vecs[i]}) for i in range(n)))
    for c in (3, 42, 99):
        q = rng.standard_normal(DIM).astype(np.float32)
        members = np.flatnonzero(colours == c)
        want = [f"d{i}" for i in members[np.argsort(-(vecs[members] @ q), kind="stable")][:20]]
        got = eng.knn_search("idx", F.TEXT_VEC, q, k=20, filters=Filters(terms={F.COLOUR: f"c{c}"}))
        assert [h.id for h in got] == want


def test_cosine_and_l2_space_types(eng):
    b = body()
    b["mappings"]["properties"][F.TEXT_VEC]["method"]["space_type"] = "l2"
    b["mappings"]["properties"][F.IMAGE_VEC]["method"]["space_type"] = "cosinesimil"
    eng.create_index("idx", b)
    pts = {"near": [1.0, 0, 0, 0, 0, 0, 0, 0], "far": [5.0, 0, 0, 0, 0, 0, 0, 0], "long": [10.0, 0.0, 0.0, 0.0]}
    eng.bulk("idx", [
        BulkAction.index("near", {F.TEXT_VEC: pts["near"], F.IMAGE_VEC: [1.0, 1.0, 0.0, 0.0]}),
        BulkAction.index("far", {F.TEXT_VEC: pts["far"], F.IMAGE_VEC: [10.0, 0.0, 0.0, 0.0]}),
    ])
    l2 = eng.knn_search("idx", F.TEXT_VEC, [0.9] + [0.0] * 7, k=2)
    assert [h.id for h in l2] == ["near", "far"]
    assert l2[0].score == pytest.approx(1 / (1 + 0.01), rel=1e-5)
    cos = eng.knn_search("idx", F.IMAGE_VEC, [3.0, 0.0, 0.0, 0.0], k=2)
    assert [h.id for h in cos] == ["far", "near"]
    assert cos[0].score == pytest.approx(1.0, abs=1e-6) and cos[1].score == pytest.approx(2**-0.5, abs=1e-6)
    s = eng.bulk("idx", [BulkAction.index("zero", {F.IMAGE_VEC: [0.0, 0.0, 0.0, 0.0]})])
    assert "zero vector" in s.failed[0].error


# --------------------------------------------------------------------------- merges
def test_plan_merge_is_size_tiered():
    assert plan_merge((500, 500, 500)) is None
    assert plan_merge((500, 500, 500, 500)) == 0
    assert plan_merge((8000, 2000, 500, 500, 500, 500)) == 2
    assert plan_merge((8000, 2000, 2000, 2000, 2000)) == 1
    assert plan_merge((8000, 2000, 2000, 500)) is None
    assert plan_merge(tuple([10] * 30)) == 0  # too many segments: merge everything


def test_many_small_bulk_calls_with_replacements_stay_correct_and_compact(eng):
    eng.create_index("idx", body())
    for version in range(24):
        s = eng.bulk("idx", [BulkAction.index(f"p{i}", doc(f"p{i}", version)) for i in range(20)] + [BulkAction.index(f"new{version}", doc(f"new{version}"))])
        assert s.ok
        if version % 8 == 7:
            eng.bulk("idx", [BulkAction.delete(f"new{version - 1}")])
    assert eng.count("idx") == 20 + 24 - 3
    got = eng.get("idx", ["p0", "p19"])
    assert np.allclose(got["p0"][F.TEXT_VEC], vec("p0", 23), atol=1e-7)
    assert got["p19"][F.TITLE].endswith("version 23")
    assert eng.knn_search("idx", F.TEXT_VEC, vec("p7", 23), k=1)[0].id == "p7"
    m = read_manifest(eng.root / "indices" / "idx" / "store")
    assert len(m.segments) <= 8  # merged as it went
    assert sum(m.sizes) <= 2 * eng.count("idx") + 10_000  # replaced rows are dropped by merges
    stored = {f for f in os.listdir(eng.root / "indices" / "idx" / "store") if f.startswith(SEGMENT_PREFIX)}
    assert stored == set(m.segments)  # merged-away files are deleted


@pytest.mark.parametrize("faiss_threshold", [None, 5])
def test_a_reader_refreshing_between_writes_sees_exactly_the_live_vectors(tmp_path, faiss_threshold):
    """Reloads append new rows to the reader's matrix; replaced and deleted rows must never be returned."""
    writer = LocalEngine(tmp_path / "e")
    reader = LocalEngine(tmp_path / "e", faiss_threshold=faiss_threshold)
    writer.create_index("idx", body())
    current: dict[str, list[float]] = {}
    q = np.array(vec("query"), dtype=np.float32)
    for version in range(10):
        actions = [BulkAction.index(f"p{i}", doc(f"p{i}", version)) for i in range(version % 3, 12, 2)]
        actions += [BulkAction.index(f"v{version}", doc(f"v{version}"))]
        if version >= 2:
            actions.append(BulkAction.delete(f"v{version - 2}"))
        assert writer.bulk("idx", actions).ok
        for a in actions:
            if a.op == "index":
                current[a.id] = a.doc[F.TEXT_VEC]
            else:
                current.pop(a.id)
        reader.refresh("idx")
        hits = reader.knn_search("idx", F.TEXT_VEC, q, k=100)
        ids = list(current)
        mat = np.array([current[i] for i in ids], dtype=np.float32)
        want = [ids[j] for j in np.argsort(-(mat @ q), kind="stable")]
        assert [h.id for h in hits] == want  # every live document once, no stale version, none deleted
        got = reader.get("idx", ["p1", "p2"], fields=[F.TEXT_VEC])
        for i in got:
            assert np.allclose(got[i][F.TEXT_VEC], current[i], atol=1e-7)


def test_bulk_consumes_a_generator_in_chunks(eng):
    eng.create_index("idx", body())
    pulled: list[int] = []

    def gen():
        for i in range(1000):
            pulled.append(i)
            yield BulkAction.index(f"g{i}", doc(f"g{i}"))

    s = eng.bulk("idx", gen(), chunk_size=100, max_chunk_bytes=4096)
    assert s.succeeded == 1000 and len(pulled) == 1000
    assert eng.count("idx") == 1000
    assert sorted(int(d[F.ID][1:]) for d in eng.iter_documents("idx", batch_size=333)) == list(range(1000))


def test_a_failing_action_stream_rolls_the_call_back(eng):
    eng.create_index("idx", body())
    eng.bulk("idx", [BulkAction.index("kept", doc("kept"))])

    def gen():
        yield BulkAction.index("lost", doc("lost"))
        raise RuntimeError("catalog reader broke")

    with pytest.raises(RuntimeError, match="catalog reader broke"):
        eng.bulk("idx", gen())
    eng.refresh("idx")
    assert eng.count("idx") == 1 and set(eng.get("idx", ["kept", "lost"])) == {"kept"}
    assert eng.bulk("idx", [BulkAction.index("after", doc("after"))]).ok  # the writer lock was released


# --------------------------------------------------------------------------- benchmark
def test_engine_benchmark_reports_every_key_with_exact_filtered_recall(tmp_path):
    from workers.bench.engine import run_engine_bench

    r = run_engine_bench(docs=2000, dim=32, queries=15, seed=3, path=tmp_path)
    for key in ("bm25_ms_p50", "bm25_ms_p99", "knn_ms_p50", "knn_ms_p99", "filtered_knn_ms_p50", "filtered_knn_recall", "upsert_docs_per_s"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["docs"] == r["count"] == 2000 and r["dim"] == 32
    assert r["filtered_knn_recall"] == 1.0
    assert r["machine"]["cpu_count"] == os.cpu_count()  # every bench JSON names its machine
    assert r["bm25_ms_p50"] <= r["bm25_ms_p99"] and r["knn_ms_p50"] <= r["knn_ms_p99"]
    assert not list(tmp_path.iterdir())  # the temporary index is removed


def test_bench_engine_command_prints_one_json_object(tmp_path):
    from typer.testing import CliRunner

    from workers.cli import app

    res = CliRunner().invoke(app, ["bench", "engine", "--json", "--docs", "600", "--dim", "16", "--queries", "5", "--seed", "1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["docs"] == 600 and out["dim"] == 16 and out["filtered_knn_recall"] == 1.0
    table = CliRunner().invoke(app, ["bench", "engine", "--docs", "300", "--dim", "8", "--queries", "3"])
    assert table.exit_code == 0 and "knn_ms_p50" in table.stdout
    bad = CliRunner().invoke(app, ["bench", "engine", "--docs", "0"])
    assert bad.exit_code != 0

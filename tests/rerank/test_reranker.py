"""The drop-in rerank call over a real LocalEngine, the real MiniLM encoder and a real (untrained) FusionRanker artifact.

Ranking quality is not the subject here (the model is untrained): these tests check the call's
mechanics — shapes, orders as permutations of the input, no mutation, explanations, fail-open.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from indexing import fields as F
from indexing.engines.base import BulkAction, Hit
from indexing.errors import ConfigError
from rerank.model.ranker import MODALITIES
from rerank.reranker import RankedHit, RankedHits, Reranker
from workers.composition import build_reranker

pytestmark = pytest.mark.slow

INDEX = "products"
IMAGE_DIM = 8
TITLES = [
    "black running shoes for men", "red summer dress", "blue denim jeans", "white cotton t-shirt",
    "black leather handbag", "brown leather belt", "green hiking backpack", "black sports socks",
    "grey wool sweater", "navy blue casual shirt",
]
ARTICLES = ["Shoes", "Dresses", "Jeans", "Tshirts", "Handbags", "Belts", "Backpacks", "Socks", "Sweaters", "Shirts"]


class CountingEngine:
    """A thin wrapper around the real LocalEngine that counts ``get`` requests (measuring, not mocking)."""

    def __init__(self, inner):
        self.inner, self.get_calls = inner, []

    def get(self, index, ids, *, fields=None):
        self.get_calls.append(list(ids))
        return self.inner.get(index, ids, fields=fields)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from indexing.encoders import get_text_encoder
    from indexing.engines import create_engine
    from mappings import load_mapping
    from rerank.history import EngineVectorSource, HistoryStore, ProfileService
    from rerank.history.store import upgrade
    from tests.workers.service.world import untrained_artifact

    d = tmp_path_factory.mktemp("reranker")
    text = get_text_encoder("minilm")
    engine = create_engine("local", path=d / "engine")
    engine.create_index(INDEX, load_mapping("products-v1", text_dim=text.dim, image_dim=IMAGE_DIM))
    vecs = text.encode(TITLES)
    actions = [
        BulkAction.index(f"p{i}", {F.ID: f"p{i}", F.TITLE: t, F.ARTICLE_TYPE: ARTICLES[i], F.TEXT_VEC: vecs[i].tolist()})
        for i, t in enumerate(TITLES)
    ]
    assert engine.bulk(INDEX, actions).ok
    engine.refresh(INDEX)

    art = untrained_artifact(d / "model", engine, INDEX, text)

    url = f"sqlite:///{d / 'history.sqlite3'}"
    upgrade(url)
    store = HistoryStore(url)
    now = datetime.now(timezone.utc)
    store.insert_events([
        {"event_id": f"e{i}", "user_id": "u1", "product_id": p, "type": ev, "ts": now - timedelta(hours=i + 1)}
        for i, (p, ev) in enumerate([("p0", "purchase"), ("p7", "click"), ("p4", "view")])
    ])
    history = ProfileService(store, EngineVectorSource(engine, INDEX), ttl_s=0)
    return engine, text, art, history, d


def _bm25_response(engine, query="black leather shoes", size=8):
    hits = engine.bm25_search(INDEX, query, size=size, source=[F.ID, F.TITLE])
    assert len(hits) >= 3
    return {
        "took": 3, "timed_out": False,
        "hits": {"total": {"value": len(hits), "relation": "eq"}, "max_score": hits[0].score,
                 "hits": [{"_index": INDEX, "_id": h.id, "_score": h.score, "_source": dict(h.source or {})} for h in hits]},
    }


def _reranker(world, **kw):
    engine, text, art, history, _ = world
    return Reranker(kw.pop("engine", engine), INDEX, kw.pop("model", art), text_encoder=kw.pop("text_encoder", text), history=kw.pop("history", history), **kw)


def test_opensearch_response_stays_a_response_reordered_with_explanations(world):
    engine = world[0]
    resp = _bm25_response(engine)
    before = copy.deepcopy(resp)
    out = _reranker(world, budget_ms=10_000).rerank("black leather shoes", resp, user_id="u1")
    assert resp == before  # input not mutated
    assert out is not resp and out["took"] == 3 and out["hits"]["total"] == resp["hits"]["total"]
    assert out["fusionrank"]["degraded"] is None and out["fusionrank"]["model_version"]
    hits = out["hits"]["hits"]
    assert sorted(h["_id"] for h in hits) == sorted(h["_id"] for h in resp["hits"]["hits"])
    scores = [h["_score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert out["hits"]["max_score"] == scores[0]
    prev = {h["_id"]: h["_score"] for h in resp["hits"]["hits"]}
    for h in hits:
        assert h["_previous_score"] == prev[h["_id"]]
        assert h["_source"] == next(x["_source"] for x in resp["hits"]["hits"] if x["_id"] == h["_id"])
        ex = h["_explanation"]
        assert set(ex) == {"gates", "history_top", "first_stage", "diversity"}
        assert ex["diversity"] == {"lambda": 0.0, "relevance_rank": hits.index(h) + 1, "max_similarity": None}  # off by default
        assert set(ex["gates"]) == set(MODALITIES) and ex["gates"]["image"] == 0  # no alignment in this model: images masked
        assert abs(sum(ex["gates"].values()) - 1) < 1e-3
        assert {t["product_id"] for t in ex["history_top"]} <= {"p0", "p7", "p4"}
        assert ex["first_stage"]["bm25"]["score"] == prev[h["_id"]]
    assert any(h["_explanation"]["history_top"] for h in hits)  # u1's history is attended to
    assert all(h["_score"] != h["_previous_score"] for h in hits)  # the model's scores, not the BM25 ones


def test_list_of_dicts_and_list_of_hits_keep_their_kind(world):
    engine = world[0]
    r = _reranker(world, budget_ms=10_000)
    dicts = [{"_id": h["_id"], "_score": h["_score"]} for h in _bm25_response(engine)["hits"]["hits"]]
    out = r.rerank("black shoes", dicts, top_k=3)
    assert isinstance(out, RankedHits) and out.degraded is None and len(out) == 3
    assert all(isinstance(h, dict) and {"_id", "_score", "_previous_score", "_explanation"} <= set(h) for h in out)
    assert all(isinstance(h, RankedHit) for h in out.hits) and [h.rank for h in out.hits] == [1, 2, 3]
    assert [h["_id"] for h in out] == out.ids and set(out.ids) <= {d["_id"] for d in dicts}
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.hits[0].score = 0.0  # type: ignore[misc]
    for item, ranked in zip(out, out.hits):  # the items and .hits carry equal explanations, not shared ones
        assert item["_explanation"] == dict(ranked.explanation)
        assert item["_explanation"]["gates"] is not ranked.explanation["gates"]
        assert item["_explanation"]["first_stage"] is not ranked.explanation["first_stage"]
    with_src = [{"_id": "p1", "_score": 2.0, "_source": {"title": "a", "tags": ["x"]}}, {"_id": "p2", "_score": 1.0}]
    out3 = r.rerank("black shoes", with_src)
    first = next(h for h in out3 if h["_id"] == "p1")
    first["_source"]["tags"].append("y")  # the output is a deep copy: the caller's input is untouched
    assert with_src[0]["_source"] == {"title": "a", "tags": ["x"]} and "_explanation" not in with_src[0]

    hits = [Hit(d["_id"], d["_score"]) for d in dicts]
    out2 = r.rerank("black shoes", hits)
    assert all(isinstance(h, Hit) for h in out2) and sorted(h.id for h in out2) == sorted(h.id for h in hits)
    assert [h.score for h in out2] == [h.score for h in out2.hits] == sorted((h.score for h in out2.hits), reverse=True)
    prev = {h.id: (h.score, i + 1) for i, h in enumerate(hits)}
    assert all((h.previous_score, h.previous_rank) == prev[h.id] for h in out2.hits)


def test_vectors_are_fetched_in_one_request(world):
    counting = CountingEngine(world[0])
    r = _reranker(world, engine=counting, budget_ms=10_000)
    resp = _bm25_response(world[0])
    out = r.rerank("black leather shoes", resp)
    assert out["fusionrank"]["degraded"] is None
    assert len(counting.get_calls) == 1 and sorted(counting.get_calls[0]) == sorted(h["_id"] for h in resp["hits"]["hits"])


def test_noop_keeps_first_stage_order(world):
    engine, text, *_ = world
    resp = _bm25_response(engine)
    out = Reranker.noop(engine, INDEX, text_encoder=text).rerank("black leather shoes", resp)
    assert [h["_id"] for h in out["hits"]["hits"]] == [h["_id"] for h in resp["hits"]["hits"]]
    assert [h["_score"] for h in out["hits"]["hits"]] == [h["_score"] for h in resp["hits"]["hits"]]
    assert out["fusionrank"]["degraded"] is None and out["fusionrank"]["reranker"] == "noop"


def _assert_first_stage(out, resp, reason):
    assert out["fusionrank"]["degraded"] == reason
    assert [h["_id"] for h in out["hits"]["hits"]] == [h["_id"] for h in resp["hits"]["hits"]]
    assert all(h["_score"] == h["_previous_score"] for h in out["hits"]["hits"])


def test_budget_exceeded_degrades_to_first_stage_order(world, caplog):
    ticks = itertools.count()
    r = _reranker(world, budget_ms=50, clock=lambda: next(ticks) * 0.03)  # every clock read jumps 30 ms
    resp = _bm25_response(world[0])
    out = r.rerank("black leather shoes", resp)
    _assert_first_stage(out, resp, "timeout")
    assert r.stats["degraded:timeout"] == 1 and r.stats["calls"] == 1
    assert "degraded" in caplog.text
    lst = r.rerank("black leather shoes", [{"_id": "p1", "_score": 2.0}, {"_id": "p0", "_score": 1.0}])
    assert lst.degraded == "timeout" and lst.ids == ["p1", "p0"]


class _SlowOrBrokenEncoder:
    """The real text encoder behind a delay or a failure (the encoder's own behaviour is not faked: it still encodes)."""

    def __init__(self, inner, *, delay_s=0.0, fail=False):
        self.inner, self.delay_s, self.fail = inner, delay_s, fail
        self.model_id, self.dim = inner.model_id, inner.dim

    def encode(self, texts, **kw):
        import time

        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("onnxruntime session lost")
        return self.inner.encode(texts, **kw)


def test_the_query_encoded_beside_fetch_and_profile_gives_the_same_ranking(world):
    resp = _bm25_response(world[0])
    together = _reranker(world, budget_ms=10_000)
    alone = _reranker(world, budget_ms=10_000, overlap_encode=False)
    try:
        a = together.rerank("black leather shoes", resp, user_id="u1")
        b = alone.rerank("black leather shoes", resp, user_id="u1")
    finally:
        together.close()
    assert a["fusionrank"]["degraded"] is None and b["fusionrank"]["degraded"] is None
    assert [h["_id"] for h in a["hits"]["hits"]] == [h["_id"] for h in b["hits"]["hits"]]
    assert [h["_score"] for h in a["hits"]["hits"]] == pytest.approx([h["_score"] for h in b["hits"]["hits"]], abs=1e-6)
    assert set(a["fusionrank"]["timings_ms"]) >= {"encode", "fetch", "history", "features", "model"}
    assert together._encode_pool is not None and alone._encode_pool is None
    # a closed reranker still answers: it encodes on the calling thread
    c = together.rerank("black leather shoes", resp, user_id="u1")
    assert [h["_id"] for h in c["hits"]["hits"]] == [h["_id"] for h in a["hits"]["hits"]]


@pytest.mark.parametrize("overlap", [True, False])
def test_an_encoder_failure_or_a_slow_encoder_degrades_to_first_stage_order(world, overlap):
    text = world[1]
    resp = _bm25_response(world[0])
    broken = _reranker(world, text_encoder=_SlowOrBrokenEncoder(text, fail=True), budget_ms=10_000, overlap_encode=overlap)
    _assert_first_stage(broken.rerank("black leather shoes", resp, user_id="u1"), resp, "encoder_error")
    assert broken.stats["degraded:encoder_error"] == 1
    slow = _reranker(world, text_encoder=_SlowOrBrokenEncoder(text, delay_s=0.4), budget_ms=100, overlap_encode=overlap)
    _assert_first_stage(slow.rerank("black leather shoes", resp, user_id="u1"), resp, "timeout")
    assert slow.stats["degraded:timeout"] == 1
    for r in (broken, slow):
        r.close()


def test_model_error_degrades(world):
    from rerank.model.inputs import FeatureSpec

    art = world[2]
    broken = dataclasses.replace(art, feature_spec=FeatureSpec(history_k=6, hash_buckets=10**7))  # category ids past the embedding table
    r = _reranker(world, model=broken, budget_ms=10_000)
    resp = _bm25_response(world[0])
    _assert_first_stage(r.rerank("black leather shoes", resp), resp, "model_error")
    assert r.stats["degraded:model_error"] == 1


def test_history_store_error_degrades_and_unknown_user_is_cold_start(world, tmp_path):
    from rerank.history import EngineVectorSource, HistoryStore, ProfileService
    from rerank.history.store import upgrade

    engine = world[0]
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    upgrade(url)
    store = HistoryStore(url)
    store.close()
    (tmp_path / "h.sqlite3").unlink()  # the database disappears under the service: a real SQL failure
    r = _reranker(world, history=ProfileService(store, EngineVectorSource(engine, INDEX), ttl_s=0), budget_ms=10_000)
    resp = _bm25_response(engine)
    _assert_first_stage(r.rerank("black leather shoes", resp, user_id="u1"), resp, "history_error")
    assert r.stats["degraded:history_error"] == 1

    ok = _reranker(world, budget_ms=10_000).rerank("black leather shoes", resp, user_id="nobody-ever")
    assert ok["fusionrank"]["degraded"] is None
    assert all(h["_explanation"]["history_top"] == [] and h["_explanation"]["gates"]["history"] == 0 for h in ok["hits"]["hits"])


def test_bad_arguments_raise(world):
    r = _reranker(world)
    resp = _bm25_response(world[0])
    with pytest.raises(ConfigError, match="empty query"):
        r.rerank("  ", resp)
    with pytest.raises(TypeError, match="query must be a string"):
        r.rerank(None, resp)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="hits.hits"):
        r.rerank("shoes", {"took": 1})
    with pytest.raises(TypeError):
        r.rerank("shoes", "p1,p2")
    with pytest.raises(TypeError):
        r.rerank("shoes", [{"_id": "p1", "_score": "high"}])
    with pytest.raises(TypeError, match="top_k"):
        r.rerank("shoes", resp, top_k="3")  # type: ignore[arg-type]
    assert r.stats["calls"] == 0


def test_search_retrieves_and_reranks(world):
    r = _reranker(world, budget_ms=10_000)
    out = r.search("black shoes", user_id="u1", size=4)
    assert isinstance(out, RankedHits) and out.degraded is None and 0 < len(out) <= 4
    assert all(isinstance(h, Hit) and h.source and h.source[F.ID] == h.id for h in out)
    assert [h.rank for h in out.hits] == list(range(1, len(out) + 1))
    assert all("knn_text" in h.explanation["first_stage"] or "bm25" in h.explanation["first_stage"] for h in out.hits)
    assert set(out.timings) >= {"encode", "fetch", "history", "features", "model", "total"}


# ---------------------------------------------------------------- the query-intent bound
def test_the_intent_bound_keeps_products_of_another_type_below_the_named_type(world):
    """An artifact with the intent block: the model (untrained, so its preferences are arbitrary) reorders within the
    products of the type the query names; every product of another type comes after them, in the model's order."""
    from rerank.model.intent import build_intent_model

    engine, text, art, _history, _ = world
    docs = [{F.ARTICLE_TYPE: a} for a in ARTICLES]
    bounded = dataclasses.replace(art, intent=build_intent_model(docs, text_encoder=text))
    hits = [{"_id": f"p{i}", "_score": float(10 - i)} for i in range(len(TITLES))]
    plain = _reranker(world, budget_ms=10_000).rerank("leather belts", hits, user_id="u1")
    out = _reranker(world, model=bounded, budget_ms=10_000).rerank("leather belts", hits, user_id="u1")
    assert out.degraded is None and sorted(out.ids) == sorted(plain.ids)
    tiers = {h.id: h.explanation["intent"]["tier"] for h in out.hits}
    assert tiers["p5"] == 0 and sum(t == 0 for t in tiers.values()) == 1  # only the belt agrees with "belts"
    assert out.ids[0] == "p5"
    rest = [i for i in plain.ids if i != "p5"]
    assert out.ids[1:] == rest  # the others keep the model's order among themselves
    ex = out.hits[0].explanation["intent"]
    assert ex["attributes"][F.ARTICLE_TYPE] == {"query": "Belts", "strength": pytest.approx(ex["attributes"][F.ARTICLE_TYPE]["strength"]),
                                                "product": "Belts", "source": "catalog", "confidence": 1.0, "agrees": True, "bounds": True}
    model_scores = {h.id: h.score for h in plain.hits}
    assert all(h.explanation["intent"]["model_score"] == pytest.approx(model_scores[h.id], abs=1e-5) for h in out.hits)
    assert [h.score for h in out.hits] == sorted((h.score for h in out.hits), reverse=True)
    # the diversity step, even at lambda 1 (dissimilarity alone), reorders within a tier and never lifts a product of
    # another type above the belt (the tiers reach it: tests/rerank/test_diversity.py checks the step's tiers)
    div = _reranker(world, model=bounded, budget_ms=10_000).rerank("leather belts", hits, user_id="u1", diversity=1.0)
    assert div.degraded is None and div.diversity["applied"] and div.ids[0] == "p5" and sorted(div.ids) == sorted(out.ids)
    assert [h.explanation["intent"]["tier"] for h in div.hits] == sorted(h.explanation["intent"]["tier"] for h in div.hits)
    assert div.ids[1:] != out.ids[1:]  # the second tier itself was diversified
    # a query naming no type leaves the model's order as it is
    vague = _reranker(world, model=bounded, budget_ms=10_000).rerank("something for the weekend", hits, user_id="u1")
    assert vague.ids == _reranker(world, budget_ms=10_000).rerank("something for the weekend", hits, user_id="u1").ids
    assert all(h.explanation["intent"]["tier"] == 0 for h in vague.hits)


def test_a_model_with_behaviour_features_reads_the_logs_statistics_and_fails_open_to_neutral(world, tmp_path):
    """An artifact whose spec reads behaviour: the rerank call's inputs carry the statistics of the query it is asked
    (the training log's clicks), neutral columns for a query the log never saw, and the same call still serves when the
    artifact lost its statistics (every column neutral)."""
    from rerank.datasets.clicks import Session
    from rerank.model.artifact import EncoderRef, load_artifact, save_artifact
    from rerank.model.behaviour import BEHAVIOUR_FEATURES, BehaviourStats
    from rerank.model.inputs import FeatureSpec
    from rerank.model.ranker import RankerConfig, build_ranker
    from rerank.retrieval.signals import PER_LIST

    engine, text, _art, _history, _ = world
    log = [Session("red summer dress", ("p1", "p0", "p3"), frozenset({0} if k % 2 else {1}), conversions=frozenset({0} if k % 4 == 1 else ()))
           for k in range(12)]
    stats = BehaviourStats.from_sessions(log, [1.0, 0.6, 0.3])
    spec = FeatureSpec(history_k=6, behaviour=True)
    cfg = RankerConfig(text_dim=text.dim, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields),
                       hash_buckets=spec.hash_buckets, history_k=spec.history_k, d_model=16, hidden=32, heads=2)
    path = save_artifact(tmp_path / "m", build_ranker(cfg, device="cpu", seed=0), feature_spec=spec,
                         text_encoder=EncoderRef(text.model_id, text.dim), image_encoder=None, behaviour=stats)
    art = load_artifact(path, mapping=engine.get_mapping(INDEX), device="cpu")
    hits = [{"_id": f"p{i}", "_score": float(10 - i)} for i in range(len(TITLES))]
    start = len(spec.lists) * len(PER_LIST) + 1
    cols = slice(start, start + len(BEHAVIOUR_FEATURES))
    r = _reranker(world, model=art, budget_ms=10_000)
    req = r.request_features("Red summer  dress", hits)
    assert np.allclose(req.first_stage[:, cols], stats.features("red summer dress", list(req.ids)), atol=1e-4)
    assert np.any(req.first_stage[:, cols] != 0)
    assert np.all(r.request_features("blue denim jeans", hits).first_stage[:, start:start + 3] == 0)  # a query the log never saw
    out = r.rerank("red summer dress", hits)
    assert out.degraded is None and sorted(out.ids) == sorted(h["_id"] for h in hits)
    (path / "behaviour.json.gz").unlink()
    blind = _reranker(world, model=load_artifact(path, mapping=engine.get_mapping(INDEX), device="cpu"), budget_ms=10_000)
    assert np.all(blind.request_features("red summer dress", hits).first_stage[:, cols] == 0)
    assert blind.rerank("red summer dress", hits).degraded is None


# ---------------------------------------------------------------- the aligned-photo cache
def test_aligned_photo_cache_gives_the_uncached_scores_and_sees_a_new_photo(world, tmp_path):
    import numpy as np
    import torch

    from mappings import load_mapping
    from rerank.model.alignment import Alignment, AlignmentConfig, build_head
    from rerank.model.artifact import EncoderRef, load_artifact, save_artifact
    from rerank.history import EngineVectorSource, ProfileService
    from rerank.model.ranker import RankerConfig, build_ranker
    from rerank.model.inputs import FeatureSpec

    engine, text, _art, history, _d = world
    index = "products_with_photos"
    engine.create_index(index, load_mapping("products-v1", text_dim=text.dim, image_dim=IMAGE_DIM))
    rng = np.random.default_rng(0)
    vecs = text.encode(TITLES)

    def doc(i, photo):
        d = {F.ID: f"p{i}", F.TITLE: TITLES[i], F.ARTICLE_TYPE: ARTICLES[i], F.TEXT_VEC: vecs[i].tolist()}
        return BulkAction.index(f"p{i}", {**d, F.IMAGE_VEC: photo.tolist()} if photo is not None else d)

    assert engine.bulk(index, [doc(i, rng.normal(size=IMAGE_DIM) if i != 3 else None) for i in range(len(TITLES))]).ok  # p3: no photo
    engine.refresh(index)
    spec = FeatureSpec(history_k=6)
    cfg = RankerConfig(text_dim=text.dim, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields),
                       hash_buckets=spec.hash_buckets, history_k=spec.history_k, d_model=16, hidden=32, heads=2)
    torch.manual_seed(0)
    align = Alignment(build_head(IMAGE_DIM, text.dim), image_dim=IMAGE_DIM, text_dim=text.dim, config=AlignmentConfig())
    path = save_artifact(tmp_path / "model", build_ranker(cfg, device="cpu", seed=0), feature_spec=spec, alignment=align,
                         text_encoder=EncoderRef(text.model_id, text.dim), image_encoder=EncoderRef("img", IMAGE_DIM))
    art = load_artifact(path, mapping=engine.get_mapping(index), device="cpu")
    profiles = ProfileService(history.store, EngineVectorSource(engine, index), ttl_s=0)
    cached = Reranker(engine, index, art, text_encoder=text, history=profiles, budget_ms=10_000)
    plain = Reranker(engine, index, art, text_encoder=text, history=profiles, budget_ms=10_000, aligned_cache_size=0)
    hits = [{"_id": f"p{i}", "_score": float(10 - i)} for i in range(len(TITLES))]

    def rerank(r):
        out = r.rerank("black leather shoes", hits, user_id="u1")
        assert out.degraded is None and any(h.explanation["gates"]["image"] > 0 for h in out.hits)
        return out.ids, {h.id: h.score for h in out.hits}

    assert plain.aligned_cache is None
    want_ids, want = rerank(plain)
    got_ids, got = rerank(cached)
    assert got_ids == want_ids and got == pytest.approx(want, abs=1e-5)
    # the forward pass runs on onnxruntime by default (CPU) and ranks as torch does, history and photos included
    torch_runtime = Reranker(engine, index, art, text_encoder=text, history=profiles, budget_ms=10_000, aligned_cache_size=0,
                             model_runtime="torch")
    assert plain.model_runtime == "onnx" and torch_runtime.model_runtime == "torch"
    t_ids, t_scores = rerank(torch_runtime)
    assert t_ids == want_ids and t_scores == pytest.approx(want, abs=1e-5)
    # 9 candidates' photos projected; u1's history (p0, p7, p4) shares their entries (same product, same vector)
    assert cached.aligned_cache.stats == {"hits": 3, "misses": 9, "entries": 9, "max_entries": 50_000}
    again_ids, again = rerank(cached)  # answered from the cache (scores move by ~1e-7: the history ages grew a little)
    assert again_ids == got_ids and again == pytest.approx(got, abs=1e-5)
    assert cached.aligned_cache.stats["hits"] == 3 + 12 and cached.aligned_cache.stats["misses"] == 9

    assert engine.bulk(index, [doc(1, rng.normal(size=IMAGE_DIM))]).ok  # p1 reindexed with a new photo
    engine.refresh(index)
    after_ids, after = rerank(cached)
    assert cached.aligned_cache.stats["misses"] == 10  # only p1's new photo is projected
    assert after == pytest.approx(rerank(plain)[1], abs=1e-5)
    assert abs(after["p1"] - got["p1"]) > 1e-4  # the new photo's vector, not the stale one

    # prefilled at start-up: the 9 indexed photos (p3 has none) are projected before any call, so the first call
    # projects nothing and scores as the uncached reranker does; both ways of reading the photos fill the same
    for engine_view in (engine, CountingEngine(engine)):  # LocalEngine.get_arrays by ids; a wrapper: iter_documents
        warm = Reranker(engine_view, index, art, text_encoder=text, history=profiles, budget_ms=10_000)
        assert warm.prefill_aligned_cache(batch_size=4) == 9
        assert warm.aligned_cache.stats == {"hits": 0, "misses": 9, "entries": 9, "max_entries": 50_000}
        warm_ids, warm_scores = rerank(warm)
        assert warm.aligned_cache.stats["misses"] == 9 and warm.aligned_cache.stats["hits"] == 12
        assert warm_ids == after_ids and warm_scores == pytest.approx(after, abs=1e-5)
        assert Reranker(engine_view, index, art, text_encoder=text, history=profiles).prefill_aligned_cache(limit=5, batch_size=2) == 5
    assert plain.prefill_aligned_cache() == 0  # no cache, nothing to fill


# ---------------------------------------------------------------- micro-batching (the CUDA path, forced on the CPU)
class GatedRanker:
    """The real ranker behind a gate: its forward pass waits until the test opens it (measuring, not mocking)."""

    def __init__(self, inner):
        import threading

        self.inner, self.gate, self.calls = inner, threading.Event(), []
        self.entered = threading.Event()  # set when a forward pass reached the gate

    def score_requests(self, requests):
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(len(requests))
        return self.inner.score_requests(requests)


def test_micro_batched_concurrent_calls_share_forward_passes_and_match_direct_scores(world):
    import threading

    from rerank.model.batching import MicroBatcher

    direct = _reranker(world, budget_ms=10_000)
    batched = _reranker(world, budget_ms=10_000, micro_batch=True)
    gated = GatedRanker(world[2].ranker)
    batched.batcher.close()
    batched.batcher = MicroBatcher(gated, max_batch=8, max_wait_ms=50)
    queries = ["black leather shoes", "red dress", "blue jeans", "leather belt", "wool sweater", "casual shirt"]
    resps = {q: _bm25_response(world[0], q, size=5) if q == "black leather shoes" else
             {"hits": {"hits": [{"_id": f"p{i}", "_score": float(10 - i)} for i in range(10)]}} for q in queries}
    want = {q: direct.rerank(q, resps[q], user_id="u1") for q in queries}
    got, barrier = {}, threading.Barrier(len(queries))

    def call(q):
        barrier.wait()
        got[q] = batched.rerank(q, resps[q], user_id="u1")

    threads = [threading.Thread(target=call, args=(q,)) for q in queries]
    for t in threads:
        t.start()
    import time

    time.sleep(0.3)  # every call is queued or waiting behind the gate
    gated.gate.set()
    for t in threads:
        t.join(30)
    batched.close()
    assert sum(gated.calls) == len(queries) and len(gated.calls) < len(queries)  # fewer passes than requests
    for q in queries:
        assert got[q]["fusionrank"]["degraded"] is None
        assert [h["_id"] for h in got[q]["hits"]["hits"]] == [h["_id"] for h in want[q]["hits"]["hits"]]
        assert [h["_score"] for h in got[q]["hits"]["hits"]] == pytest.approx([h["_score"] for h in want[q]["hits"]["hits"]], abs=1e-5)
    assert batched.batcher.stats["requests"] == len(queries) and batched.batcher.stats["largest_batch"] >= 2


def test_a_full_micro_batch_queue_fails_open_as_overloaded(world):
    import threading

    from rerank.model.batching import MicroBatcher, Overloaded

    gated = GatedRanker(world[2].ranker)
    r = _reranker(world, budget_ms=10_000, micro_batch=True)
    r.batcher.close()
    r.batcher = MicroBatcher(gated, max_batch=1, max_wait_ms=0, max_queue=1)
    resp = _bm25_response(world[0])
    first = threading.Thread(target=r.rerank, args=("black leather shoes", resp))
    first.start()  # taken by the worker, waits at the gate
    import time

    assert gated.entered.wait(10)  # the worker holds the first request: the queue is empty again
    deadline = time.time() + 10
    second = threading.Thread(target=r.rerank, args=("black leather shoes", resp))
    second.start()  # fills the queue
    while not r.batcher.stats["queued"] and time.time() < deadline:
        time.sleep(0.01)
    out = r.rerank("black leather shoes", resp)
    _assert_first_stage(out, resp, "overloaded")
    assert r.stats["degraded:overloaded"] == 1
    with pytest.raises(Overloaded, match="queue full"):
        r.batcher.submit(object())
    gated.gate.set()
    first.join(30)
    second.join(30)
    r.close()


def test_micro_batch_wait_past_the_budget_is_a_timeout(world):
    from rerank.model.batching import MicroBatcher

    gated = GatedRanker(world[2].ranker)
    r = _reranker(world, budget_ms=2_000, micro_batch=True)
    r.batcher.close()
    r.batcher = MicroBatcher(gated, max_batch=4, max_wait_ms=1)
    resp = _bm25_response(world[0])
    out = r.rerank("black leather shoes", resp)  # the gate stays shut: no result within the budget
    _assert_first_stage(out, resp, "timeout")
    gated.gate.set()
    r.close()


# ---------------------------------------------------------------- wiring from settings, install, benchmark
def test_from_settings_serves_the_installed_model_and_refuses_without_one(world, tmp_path):
    from indexing.errors import ModelArtifactError
    from workers.deploy import install_model
    from workers.settings import load_settings

    engine, text, art, _history, d = world
    settings = load_settings(data_dir=str(tmp_path), index_alias=INDEX, device="cpu", rerank_budget_ms=10_000.0)  # the wiring, not the budget (a shared CPU)
    with pytest.raises(ModelArtifactError, match="fusionrank demo"):
        build_reranker(settings, engine=engine)
    model_dir, version = install_model(settings, art.path)
    assert version == art.version.replace(":", "-") and (tmp_path / "models" / "current").resolve() == model_dir.resolve()
    assert install_model(settings, art.path)[0] == model_dir  # idempotent
    with pytest.raises(Exception, match="not migrated|no history database"):
        build_reranker(settings, engine=engine)  # the history DB of this data dir was never migrated
    r = build_reranker(settings, engine=engine, history=False)
    assert r.model.version == art.version and r.budget_ms == settings.rerank_budget_ms and r.batcher is None  # CPU: no micro-batching
    assert r.diversity == 0.0
    per_index = load_settings(data_dir=str(tmp_path), index_alias=INDEX, device="cpu", rerank_budget_ms=10_000.0, diversity=0.2,
                              diversity_by_index={INDEX: "auto"}, diversity_colour_weight=0.0)
    r2 = build_reranker(per_index, engine=engine, history=False)
    assert r2.diversity == "auto" and r2.diversity_config.colour_weight == 0.0  # the index's own default, over the global one
    resp = _bm25_response(engine)
    out = r.rerank("black leather shoes", resp)
    assert out["fusionrank"]["degraded"] is None and out["fusionrank"]["model_version"] == art.version
    assert sorted(h["_id"] for h in out["hits"]["hits"]) == sorted(h["_id"] for h in resp["hits"]["hits"])


def test_from_settings_encodes_queries_with_the_int8_backend_when_asked(world, tmp_path):
    from workers.deploy import install_model
    from workers.settings import load_settings

    engine, text, art, _history, _d = world
    settings = load_settings(data_dir=str(tmp_path), index_alias=INDEX, device="cpu", query_text_backend="onnx-int8",
                             rerank_budget_ms=10_000.0)  # the backend, not the budget: CI failed once at 56.9 ms of 50
    install_model(settings, art.path)
    r = build_reranker(settings, engine=engine, history=False)  # the agreement check passed at start-up
    assert r.text_encoder.backend == "onnx-int8" and r.text_encoder.model_id != text.model_id
    resp = _bm25_response(engine)
    out = r.rerank("black leather shoes", resp)
    assert out["fusionrank"]["degraded"] is None
    assert sorted(h["_id"] for h in out["hits"]["hits"]) == sorted(h["_id"] for h in resp["hits"]["hits"])


def test_bench_rerank_reports_latency_and_the_cross_encoder_ratio(world):
    from workers.bench.rerank import bench_rerank
    from rerank.evaluation.trainers import CrossEncoderModel

    r = _reranker(world, budget_ms=10_000)
    res = bench_rerank(r, ["black shoes", "red dress", "leather bag"], ["u1", None], candidates=8, requests=6, warmup=1,
                       cross_encoder=CrossEncoderModel.from_base("cpu"), ce_requests=2)
    assert res["requests"] == 6 and res["degraded"] == 0 and 1 <= res["candidates_per_request"] <= 8
    assert 0 < res["p50_ms"] <= res["p99_ms"] and set(res["stages_p50_ms"]) >= {"encode", "fetch", "history", "features", "model", "total"}
    assert res["cross_encoder_requests"] == 2 and res["cross_encoder_p50_ms"] > 0
    assert res["speedup"] == pytest.approx(res["cross_encoder_p50_ms"] / res["p50_ms"], rel=0.01)
    assert res["distinct_queries"] == 3 and res["text_backend"] == "torch"  # 6 calls cycle over 3 queries
    assert res["aligned_cache"] is None  # a model without an alignment has no photos to cache
    assert res["machine"]["cpu_count"] == os.cpu_count() and "cpu_isa" in res["machine"]  # the machine it ran on
    assert "mmr" in res["stages_p50_ms"] and res["diversity"] == 0.0
    both = bench_rerank(r, ["black shoes", "red dress"], ["u1", None], candidates=8, requests=4, warmup=1, ce_requests=0,
                        diversity="auto", compare_diversity=True)
    cmp_ = both["diversity_compare"]
    assert both["diversity"] == "auto" and cmp_["on_p50_ms"] > 0 and cmp_["off_p50_ms"] > 0
    # the three figures are each rounded to 3 decimals: their difference may be off by up to 1.5e-3
    assert cmp_["added_p50_ms"] == pytest.approx(cmp_["on_p50_ms"] - cmp_["off_p50_ms"], abs=2e-3) and both["p50_ms"] == cmp_["on_p50_ms"]
    paired = cmp_["added_paired_ms"]  # each request's own difference: quartiles in order, within the calls' spread
    assert paired["p25"] <= paired["p50"] <= paired["p75"] and abs(paired["p50"]) <= max(cmp_["on_p99_ms"], cmp_["off_p99_ms"])


# ----------------------------------------------------------------------------- the diversity step
def _text_vectors(world, ids):
    import numpy as np

    got = world[0].get(INDEX, list(ids), fields=[F.TEXT_VEC])
    return {i: np.asarray(got[i][F.TEXT_VEC], dtype=np.float64) for i in ids}


def test_diversity_zero_is_the_model_order_and_one_picks_the_least_similar_next(world):
    import numpy as np

    r = _reranker(world, budget_ms=10_000)
    resp = _bm25_response(world[0], "black leather shoes", size=8)
    base = r.rerank("black leather shoes", resp)
    zero = r.rerank("black leather shoes", resp, diversity=0)
    assert [h["_id"] for h in zero["hits"]["hits"]] == [h["_id"] for h in base["hits"]["hits"]]
    assert zero["fusionrank"]["diversity"]["lambda"] == 0.0 and zero["fusionrank"]["diversity"]["applied"] is False
    assert "mmr" in zero["fusionrank"]["timings_ms"]

    full = r.rerank("black leather shoes", resp, diversity=1.0)
    ids = [h["_id"] for h in full["hits"]["hits"]]
    model_order = [h["_id"] for h in base["hits"]["hits"]]
    assert sorted(ids) == sorted(model_order) and ids[0] == model_order[0]  # the first place is the most relevant
    # lambda 1: every next place goes to the candidate least similar to those above (the index's own text vectors;
    # this small index has no photos)
    vec = _text_vectors(world, ids)
    cos = lambda a, b: max(float(vec[a] @ vec[b] / (np.linalg.norm(vec[a]) * np.linalg.norm(vec[b]))), 0.0)  # noqa: E731
    for p in range(1, len(ids)):
        placed = ids[:p]
        worst = {c: max(cos(c, q) for q in placed) for c in ids[p:]}
        assert worst[ids[p]] == pytest.approx(min(worst.values()), abs=1e-5), (p, ids[p])
        assert full["hits"]["hits"][p]["_explanation"]["diversity"]["max_similarity"] == pytest.approx(worst[ids[p]], abs=1e-4)
    block = full["fusionrank"]["diversity"]
    assert block == {"lambda": 1.0, "requested": 1.0, "source": "request", "reason": "lambda 1 as requested", "applied": True}
    ranks = {h["_id"]: h["_explanation"]["diversity"]["relevance_rank"] for h in full["hits"]["hits"]}
    assert [i for i, _ in sorted(ranks.items(), key=lambda kv: kv[1])] == model_order
    # _score stays the model's relevance (the same per hit as without diversity)
    assert {h["_id"]: h["_score"] for h in full["hits"]["hits"]} == {h["_id"]: h["_score"] for h in base["hits"]["hits"]}


def test_diversity_auto_explains_itself_and_follows_the_query_and_the_history(world):
    r = _reranker(world, budget_ms=10_000, diversity_config=__import__("rerank.diversity", fromlist=["x"]).DiversityConfig(auto_max=0.6))
    hits = [{"_id": f"p{i}", "_score": 10.0 - i} for i in (0, 10, 11)]  # the three shoes
    vague = r.rerank("shoes", hits, diversity="auto")
    d = vague.diversity
    assert d["requested"] == "auto" and d["lambda"] == pytest.approx(0.6) and d["qualifiers"] == [] and d["history_events"] == 0
    assert "vague query" in d["reason"] and all(h.explanation["diversity"]["lambda"] == pytest.approx(0.6) for h in vague.hits)
    named = r.rerank("black shoes", hits, diversity="auto").diversity
    assert 0 < named["lambda"] < 0.3 and named["qualifiers"] == ["black"]
    known = r.rerank("shoes", hits, diversity="auto", user_id="u1").diversity  # u1: a purchase, a click, a view
    assert 0 < known["lambda"] < d["lambda"] and known["history_events"] == 3 and 0 < known["history_strength"] < 1


def test_diversity_default_bad_values_and_candidates_without_vectors(world):
    r = _reranker(world, budget_ms=10_000, diversity=0.5)
    hits = [{"_id": "p0", "_score": 9.0}, {"_id": "nowhere-1", "_score": 8.0}, {"_id": "p10", "_score": 7.0},
            {"_id": "nowhere-2", "_score": 6.0}, {"_id": "p4", "_score": 5.0}]
    out = r.rerank("black shoes", hits)  # the reranker's default applies
    assert out.degraded is None and out.diversity["lambda"] == 0.5 and out.diversity["source"] == "default"
    ids = out.ids
    assert sorted(ids) == sorted(h["_id"] for h in hits)
    # the two products the index does not hold have no vectors: never an error, their relative order is their relevance order
    rel = {h.id: h.explanation["diversity"]["relevance_rank"] for h in out.hits}
    a, b = sorted(["nowhere-1", "nowhere-2"], key=lambda i: rel[i])
    assert ids.index(a) < ids.index(b)
    assert r.rerank("black shoes", hits, diversity=0).diversity["lambda"] == 0.0  # a call's own value wins
    for bad in (1.5, -0.1, "lots", True, float("nan")):
        with pytest.raises(ConfigError, match=r'a number in \[0, 1\] or "auto"'):
            r.rerank("black shoes", hits, diversity=bad)
        with pytest.raises(ConfigError, match=r"\[0, 1\]"):
            r.search("black shoes", diversity=bad)
    with pytest.raises(ConfigError, match="default diversity"):
        _reranker(world, diversity=2)
    found = r.search("black shoes", size=3, diversity="auto")
    assert found.diversity["requested"] == "auto" and len(found) <= 3 and "mmr" in found.timings
    # the noop reranker and a failed-open call keep the first-stage order and say so
    noop = Reranker.noop(world[0], INDEX, text_encoder=world[1]).rerank("black shoes", hits, diversity=0.9)
    assert noop.ids == [h["_id"] for h in hits] and noop.diversity["applied"] is False and "noop" in noop.diversity["reason"]
    assert all(h.explanation["diversity"]["lambda"] == 0.0 for h in noop.hits)


# ----------------------------------------------------------------------------- bench batch (the forward pass replayed)
def test_request_features_are_what_rerank_scores(world):
    r = _reranker(world, budget_ms=10_000)
    resp = _bm25_response(world[0])
    for user in ("u1", None):
        req = r.request_features("black leather shoes", resp, user_id=user)
        assert list(req.ids) == [h["_id"] for h in resp["hits"]["hits"]]
        assert bool(req.hist_mask.any()) is (user == "u1")  # u1's profile is in the features, a cold start has none
        scored = r.model.ranker.score(req)
        by_features = [req.ids[i] for i in sorted(range(len(req)), key=lambda i: (-float(scored.scores[i]), req.ids[i]))]
        out = r.rerank("black leather shoes", resp, user_id=user)
        assert [h["_id"] for h in out["hits"]["hits"]] == by_features
        assert [h["_score"] for h in out["hits"]["hits"]] == pytest.approx(sorted((float(s) for s in scored.scores), reverse=True), abs=1e-4)
    with pytest.raises(ConfigError, match="at least one hit"):
        r.request_features("shoes", {"hits": {"hits": []}})
    with pytest.raises(ConfigError, match="needs a reranker with a model"):
        Reranker.noop(world[0], INDEX, text_encoder=world[1]).request_features("shoes", resp)


def test_bench_batch_saves_replays_and_times_direct_and_micro_batched(world, tmp_path):
    import numpy as np

    from workers.bench.batch import export_requests, load_requests, run_batch_bench, save_requests
    from rerank.model.inputs import ARRAY_FIELDS

    r = _reranker(world, budget_ms=10_000)
    reqs = export_requests(r, ["black shoes", "red dress", "leather bag", "blue jeans"], ["u1", None], candidates=8)
    assert len(reqs) == 4 and [bool(q.hist_mask.any()) for q in reqs] == [True, False, True, False]
    path = save_requests(tmp_path / "f" / "features.npz", reqs, meta={"note": "test"})
    back, meta = load_requests(path)
    assert meta["count"] == 4 and meta["note"] == "test" and not list(path.parent.glob("*.tmp"))
    for a, b in zip(reqs, back):  # the same inputs, bit for bit
        assert a.ids == b.ids and a.hist_ids == b.hist_ids
        for name in ARRAY_FIELDS:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
            assert getattr(a, name).dtype == getattr(b, name).dtype

    res = run_batch_bench(back, world[2].path, device="cpu", levels=(1, 4), per_level=24, max_batch=8, max_wait_ms=2.0)
    assert set(res["levels"]) == {"1", "4"} and res["device"] == "cpu" and res["device_name"] is None
    for lv in res["levels"].values():
        for mode in ("direct", "micro_batched"):
            m = lv[mode]
            assert m["requests"] == 24 and m["rps"] > 0 and 0 < m["p50_ms"] <= m["p99_ms"]
    assert res["levels"]["1"]["micro_batched"]["largest_batch"] == 1  # one thread: nobody to share a pass with
    assert 1 < res["levels"]["4"]["micro_batched"]["mean_batch"] <= res["levels"]["4"]["micro_batched"]["largest_batch"] <= 4
    assert res["distinct_requests"] == 4 and res["requests_with_history"] == 2 and res["candidates_median"] <= 8
    assert res["machine"]["cpu_count"] == os.cpu_count()


def test_bench_batch_refuses_what_it_cannot_replay(world, tmp_path):
    import numpy as np

    from workers.bench.batch import load_requests, main, parse_levels, run_batch_bench, save_requests

    with pytest.raises(ConfigError, match="does not exist"):
        load_requests(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="could not be read"):
        load_requests(tmp_path / "junk.npz")
    np.savez(tmp_path / "old.npz", meta=np.asarray('{"format": 0, "count": 0}'))
    with pytest.raises(ConfigError, match="format 0"):
        load_requests(tmp_path / "old.npz")
    r = _reranker(world, budget_ms=10_000)
    req = r.request_features("black shoes", _bm25_response(world[0]), user_id="u1")
    wrong = dataclasses.replace(req, query=req.query[:100])  # a query vector of another text model
    with pytest.raises(ConfigError, match=r"query has shape \(100,\)"):
        run_batch_bench([wrong], world[2].path, device="cpu", levels=(1,), per_level=2)
    with pytest.raises(ConfigError, match="integers >= 1"):
        parse_levels("1,0")
    with pytest.raises(ConfigError, match="comma-separated integers"):
        parse_levels("1,x")
    save_requests(tmp_path / "ok.npz", [req])
    assert main(["--features", str(tmp_path / "ok.npz"), "--model", str(world[2].path), "--device", "cpu", "--levels", "1,0"]) == 2

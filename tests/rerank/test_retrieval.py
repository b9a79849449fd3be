"""Hybrid retrieval against a real LocalEngine index of a real fashion slice (with photos)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from indexing import fields as F
from indexing.engines.base import Filters
from indexing.errors import ConfigError, UnknownNameError
from rerank.retrieval.signals import feature_names, first_stage_features
from rerank.retrieval.retriever import BM25, KNN_IMAGE, KNN_TEXT, RetrievalConfig, Retriever, fuse_first_stage
from tests.rerank.evaldata import build_fashion_slice

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def indexed(shared_data, tmp_path_factory):
    from indexing.encoders import get_image_encoder, get_text_encoder
    from indexing.engines import create_engine
    from indexing.pipeline import IndexJob
    from workers.jobs import run_index_job
    from workers.settings import load_settings

    d = tmp_path_factory.mktemp("retrieval")
    sl = build_fashion_slice(shared_data, d / "data", n_queries=4, judged_per_query=6, others=24, with_images=True)
    engine = create_engine("local", path=d / "engine")
    job = IndexJob(catalog=str(sl.catalog), index="products", images_root=str(sl.images_root))
    summary = run_index_job(engine, load_settings(data_dir=d), job, progress=False)
    assert summary.failed == 0
    return engine, get_text_encoder("minilm"), get_image_encoder("efficientnet_lite0"), sl


def test_text_query_runs_bm25_and_knn_text_and_says_why_not_image(indexed):
    engine, text, image, _ = indexed
    r = Retriever(engine, "products", text_encoder=text, image_encoder=image, config=RetrievalConfig(top_n=10))
    cs = r.retrieve("black shoes for men", with_source=True)
    assert cs.lists == (BM25, KNN_TEXT) and "text-to-image alignment" in cs.skipped[KNN_IMAGE]
    assert 0 < len(cs.candidates) <= 10
    assert [c.rank for c in cs.candidates] == list(range(1, len(cs.candidates) + 1))
    keys = [(-c.score, c.id) for c in cs.candidates]
    assert keys == sorted(keys)
    for c in cs.candidates:
        assert set(c.signals) == {BM25, KNN_TEXT, KNN_IMAGE}
        assert c.missing(KNN_IMAGE) and c.list_score(KNN_IMAGE) is None
        assert not (c.missing(BM25) and c.missing(KNN_TEXT))
        assert c.source and c.source[F.ID] == c.id
    with pytest.raises(dataclasses.FrozenInstanceError):
        cs.candidates[0].score = 1.0  # type: ignore[misc]
    # BM25's first hit matches a query word; every BM25 hit that made the top 10 carries its list rank and score
    stage = r.first_stage("black shoes for men")
    top = engine.get("products", [stage.lists[BM25][0].id])[stage.lists[BM25][0].id]
    assert any(w in (top[F.TITLE] + " " + top.get(F.ATTRIBUTES, "")).lower() for w in ("black", "shoe", "men"))
    ranks = {h.id: i + 1 for i, h in enumerate(sorted(stage.lists[BM25], key=lambda h: (-h.score, h.id)))}
    for c in cs.candidates:
        if not c.missing(BM25):
            assert c.signals[BM25].rank == ranks[c.id]


def test_query_image_searches_image_vec(indexed):
    engine, text, image, sl = indexed
    from indexing.images import load_image

    docs = [d for d in engine.iter_documents("products") if d.get(F.HAS_IMAGE)]
    assert docs
    target = docs[0]
    photo = load_image(target[F.IMAGE], sl.images_root)
    r = Retriever(engine, "products", text_encoder=text, image_encoder=image)
    cs = r.retrieve("", query_image=photo)  # image only: no text lists
    assert cs.lists == (KNN_IMAGE,) and set(cs.skipped) == {BM25, KNN_TEXT}
    assert cs.candidates[0].id == target[F.ID]  # the product's own photo is its nearest neighbour
    assert all(c.signals[KNN_IMAGE].missing is False for c in cs.candidates)
    assert all(c.source.get(F.HAS_IMAGE) is not False for c in r.retrieve("", query_image=photo, with_source=True).candidates)


def test_query_to_image_space_hook_lets_a_text_query_search_image_vec(indexed):
    engine, text, image, _ = indexed
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((text.dim, image.dim)).astype(np.float32)  # a (random, untrained) linear alignment
    seen = []

    def align(v: np.ndarray) -> np.ndarray:
        seen.append(v.shape)
        out = v @ proj
        return out / np.linalg.norm(out)

    r = Retriever(engine, "products", text_encoder=text, query_to_image_space=align)
    cs = r.retrieve("red heels")
    assert KNN_IMAGE in cs.lists and seen == [(text.dim,)]
    assert any(not c.missing(KNN_IMAGE) for c in cs.candidates)


def test_filters_apply_to_every_list(indexed):
    engine, text, _, _ = indexed
    r = Retriever(engine, "products", text_encoder=text)
    f = Filters(terms={F.GENDER: "Women"})
    cs = r.retrieve("shoes", filters=f, with_source=True)
    assert cs.candidates and all(c.source[F.GENDER] == "Women" for c in cs.candidates)


def test_bad_arguments(indexed):
    engine, text, _, _ = indexed
    r = Retriever(engine, "products", text_encoder=text)
    with pytest.raises(ConfigError, match="empty query"):
        r.retrieve("   ")
    with pytest.raises(ConfigError, match="must be a string"):
        r.retrieve(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="valid lists"):
        RetrievalConfig(lists=("bm25", "sparse"))
    with pytest.raises(UnknownNameError, match="minmax, rrf"):
        RetrievalConfig(fusion="borda")


def test_minmax_weights_renormalized_over_lists_that_ran_and_features(indexed):
    engine, text, _, _ = indexed
    r = Retriever(engine, "products", text_encoder=text)
    stage = r.first_stage("white casual shoes", per_list=20)
    # the image list did not run: its weight is dropped and the rest renormalized to sum to 1
    cs = fuse_first_stage(stage, method="minmax", weights={BM25: 0.3, KNN_TEXT: 0.3, KNN_IMAGE: 0.4}, top_n=None)
    assert cs.candidates and all(0.0 <= c.score <= 1.0 for c in cs.candidates)
    X = first_stage_features(cs.candidates)
    names = feature_names()
    assert X.shape == (len(cs.candidates), len(names)) and np.isfinite(X).all()
    col = {n: i for i, n in enumerate(names)}
    for row, c in zip(X, cs.candidates):
        assert row[col["knn_image_missing"]] == 1.0 and row[col["knn_image_score"]] == 0.0
        for l in (BM25, KNN_TEXT):
            sig = c.signals[l]
            assert row[col[f"{l}_missing"]] == float(sig.missing)
            assert row[col[f"{l}_rr"]] == pytest.approx(0.0 if sig.missing else 1.0 / sig.rank)
            assert 0.0 <= row[col[f"{l}_norm"]] <= 1.0
        assert row[col["lists_present"]] == 2 - row[col["bm25_missing"]] - row[col["knn_text_missing"]]

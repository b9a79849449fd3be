"""The history's attribute agreement: the history products' categorical fields as inputs, compared with each
candidate's by the ranker (``rerank.model.ranker.history_agreement``)."""

from __future__ import annotations

import random

import numpy as np
import torch

from rerank.datasets.metrics import ndcg_at_k
from rerank.model.inputs import FeatureSpec, HistoryInput, build_request_features, collate, to_torch
from rerank.model.ranker import MODALITIES, RankerConfig, build_ranker, history_agreement
from rerank.retrieval.fusion import ListSignal
from rerank.retrieval.retriever import Candidate
from rerank.training.ranker import Example, TrainConfig, fit

SPEC = FeatureSpec(history_k=6)
C = len(SPEC.cat_fields)
COLOUR = SPEC.cat_fields.index("colour")
TD = 16


def _cands(n: int, rng: np.random.Generator) -> list[Candidate]:
    return [Candidate(f"p{i:02d}", 1.0 / (i + 1), i + 1, {"bm25": ListSignal(float(rng.random() * 5), i + 1, 0.5, False),
                                                          "knn_text": ListSignal(float(rng.random()), i + 1, 0.5, False),
                                                          "knn_image": ListSignal.absent()}) for i in range(n)]


def _history(colours, rng) -> HistoryInput:
    ids = tuple(f"h{i}" for i in range(len(colours)))
    return HistoryInput(ids, tuple(rng.normal(size=TD) for _ in ids), (None,) * len(ids), ("click",) * len(ids), (3600.0,) * len(ids),
                        tuple(None if c is None else {"article_type": "Tops", "colour": c} for c in colours))


def test_history_products_attributes_are_hashed_like_the_candidates_and_padding_stays_zero():
    rng = np.random.default_rng(0)
    docs = {f"p{i:02d}": {"text_vec": rng.normal(size=TD), "article_type": "Heels", "colour": c} for i, c in enumerate(["Black", "Red", ""])}
    r = build_request_features(rng.normal(size=TD), _cands(3, rng), docs, SPEC, history=_history(["Black", None, "Red"], rng), text_dim=TD)
    assert r.hist_cats.shape == (SPEC.history_k, C) and r.hist_cats.dtype == np.int64
    assert r.hist_cats[0, COLOUR] == r.cats[0, COLOUR] > 0 and r.hist_cats[2, COLOUR] == r.cats[1, COLOUR]
    assert not r.hist_cats[1].any()  # a history product without known attributes: every field missing
    assert not r.hist_cats[3:].any()  # padding
    # a profile without attributes (an old caller) and a request without history: zeros of the right shape
    plain = HistoryInput(("h0",), (rng.normal(size=TD),), (None,), ("view",), (1.0,))
    r2 = build_request_features(rng.normal(size=TD), _cands(3, rng), docs, SPEC, history=plain, text_dim=TD)
    assert r2.hist_cats.shape == (SPEC.history_k, C) and not r2.hist_cats.any()
    assert collate([r, r2])["hist_cats"].shape == (2, SPEC.history_k, C)


def test_agreement_is_the_share_of_history_products_with_the_candidates_value():
    # history colours: Black, Black, Red, (none), padding; candidates: Black, Red, Blue, (none)
    black, red, blue = 11, 12, 13
    hist = torch.zeros(1, 5, C, dtype=torch.int64)
    hist[0, :3, COLOUR] = torch.tensor([black, black, red])
    mask = torch.tensor([[True, True, True, True, False]])
    hist[0, 4, COLOUR] = blue  # a padded row's value is never counted
    cats = torch.zeros(1, 4, C, dtype=torch.int64)
    cats[0, :3, COLOUR] = torch.tensor([black, red, blue])
    a = history_agreement(cats, hist, mask)
    assert a.shape == (1, 4, 2 * C)
    assert torch.allclose(a[0, :, COLOUR], torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    assert a[0, :, C + COLOUR].tolist() == [1.0, 1.0, 1.0, 0.0]  # known, except for the candidate without a colour
    other = [j for j in range(C) if j != COLOUR]
    assert not a[0][:, other].any() and not a[0][:, [C + j for j in other]].any()  # no history product has those fields
    assert not history_agreement(cats, hist, torch.zeros_like(mask)).any()  # no history: nothing


def _model(**kw):
    cfg = RankerConfig(text_dim=TD, first_stage_dim=SPEC.first_stage_dim, n_cat_fields=C, hash_buckets=SPEC.hash_buckets, history_k=SPEC.history_k,
                       d_model=16, hidden=32, heads=2, **kw)
    return build_ranker(cfg, device="cpu", seed=0).eval()


def test_the_agreement_moves_scores_only_for_a_user_with_history_and_ablations_ignore_it():
    rng = np.random.default_rng(1)
    docs = {f"p{i:02d}": {"text_vec": rng.normal(size=TD), "article_type": "Heels", "colour": c} for i, c in enumerate(["Black", "Red", "Blue"])}
    q, cands = rng.normal(size=TD), _cands(3, rng)
    h_black, h_red = _history(["Black", "Black"], rng), None
    h_red = HistoryInput(h_black.product_ids, h_black.text, h_black.image, h_black.events, h_black.ages_s,
                         tuple({"article_type": "Tops", "colour": "Red"} for _ in h_black.product_ids))
    m = _model(history_agreement=True)
    s_black = m.score(build_request_features(q, cands, docs, SPEC, history=h_black, text_dim=TD)).scores
    s_red = m.score(build_request_features(q, cands, docs, SPEC, history=h_red, text_dim=TD)).scores
    assert np.isfinite(s_black).all() and not np.allclose(s_black, s_red)  # same vectors, other attributes: other scores
    # without the flag (an artifact trained before it) or in the no-history ablation, attributes change nothing
    for kw in ({}, {"history_agreement": True, "use_history": False}):
        m2 = _model(**kw)
        a = m2.score(build_request_features(q, cands, docs, SPEC, history=h_black, text_dim=TD)).scores
        b = m2.score(build_request_features(q, cands, docs, SPEC, history=h_red, text_dim=TD)).scores
        assert np.allclose(a, b, atol=1e-6)
    # training mode (the literal layers) and a user without history: finite scores, history gate 0
    r0 = build_request_features(q, cands, docs, SPEC, history=None, text_dim=TD)
    out = m.train()(to_torch(collate([r0, build_request_features(q, cands, docs, SPEC, history=h_black, text_dim=TD)])))
    assert torch.isfinite(out.scores).all() and float(out.gates.detach()[0, :, MODALITIES.index("history")].abs().max()) == 0.0


def _shoppers(n_queries: int, seed: int) -> list[Example]:
    """Shoppers whose taste is a colour seen only in their history's attributes: a candidate is relevant (gain 2) when
    its colour is the user's favourite, 1 otherwise; every vector is noise, so only the attributes tell."""
    rng = np.random.default_rng(seed)
    colours = ["Black", "Red", "Blue", "Green", "White"]
    out = []
    for qi in range(n_queries):
        fav = colours[qi % len(colours)]
        cands = _cands(20, rng)
        docs = {c.id: {"text_vec": rng.normal(size=TD), "article_type": "Heels", "colour": colours[int(rng.integers(len(colours)))]} for c in cands}
        hist_colours = [fav if rng.random() < 0.8 else colours[int(rng.integers(len(colours)))] for _ in range(5)]
        f = build_request_features(rng.normal(size=TD), cands, docs, SPEC, history=_history(hist_colours, rng), text_dim=TD)
        gains = np.array([2.0 if docs[c.id]["colour"] == fav else 1.0 for c in cands], dtype=np.float32)
        out.append(Example(f, gains, {c.id: float(g) for c, g in zip(cands, gains)}, f"q{qi}", "shoppers"))
    return out


def _ndcg(model, examples) -> float:
    vals = []
    for e, r in zip(examples, model.score_requests([e.features for e in examples])):
        vals.append(ndcg_at_k([d for _, d in sorted(zip((-r.scores).tolist(), r.ids))], e.all_gains, 10))
    return float(np.mean(vals))


def test_training_learns_a_taste_that_only_the_history_attributes_show():
    random.seed(0)
    train, valid = _shoppers(120, 0), _shoppers(40, 1)
    cfg = TrainConfig(epochs=6, min_epochs=6, batch_size=8, lr=5e-3, seed=3, threads=1, max_minutes=5)
    scores = {}
    for flag in (False, True):
        rcfg = RankerConfig(text_dim=TD, first_stage_dim=SPEC.first_stage_dim, n_cat_fields=C, hash_buckets=SPEC.hash_buckets,
                            history_k=SPEC.history_k, d_model=16, hidden=32, heads=2, history_agreement=flag)
        model, _ = fit(train, {"v": valid}, rcfg, cfg)
        scores[flag] = _ndcg(model, valid)
    # with the agreement the favourite colour comes first; without it the model has only noise (and hashed candidate
    # colours, which carry no preference of their own: every colour is a favourite of one user in five)
    assert scores[True] > 0.9 and scores[True] - scores[False] > 0.05, scores


# --------------------------------------------------------------------------- the rerank call fetches the history's attributes
from tests.rerank.test_reranker import INDEX, _bm25_response, world  # noqa: E402,F401 - the module's small index and shopper


def test_the_rerank_call_reads_the_history_products_attributes_for_a_model_that_compares_them(world, tmp_path):
    from indexing import fields as F
    from rerank import Reranker
    from rerank.model.artifact import EncoderRef, load_artifact, save_artifact
    from rerank.model.inputs import hash_categories

    engine, text, plain_art, history, _ = world
    spec = plain_art.feature_spec
    cfg = RankerConfig(text_dim=text.dim, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields), hash_buckets=spec.hash_buckets,
                       history_k=spec.history_k, d_model=16, hidden=32, heads=2, history_agreement=True)
    path = save_artifact(tmp_path / "model", build_ranker(cfg, device="cpu", seed=0), feature_spec=spec, text_encoder=EncoderRef(text.model_id, text.dim),
                         image_encoder=None)
    art = load_artifact(path, mapping=engine.get_mapping(INDEX), device="cpu")
    assert art.ranker.config.history_agreement
    resp = _bm25_response(engine)
    r = Reranker(engine, INDEX, art, text_encoder=text, history=history, budget_ms=10_000)
    f = r.request_features("black leather shoes", resp, user_id="u1")
    # u1's history, newest first: p0 (Shoes), p7 (Socks), p4 (Handbags); p7 and p4 are not all among the hits
    assert f.hist_ids == ("p0", "p7", "p4")
    want = hash_categories([{F.ARTICLE_TYPE: a} for a in ("Shoes", "Socks", "Handbags")], spec)
    assert f.hist_cats[:3].tolist() == want.tolist() and not f.hist_cats[3:].any()
    out = r.rerank("black leather shoes", resp, user_id="u1")
    assert out["fusionrank"]["degraded"] is None
    # read with the hits, and kept with a cached profile (its memo): the next call of that user reads only the hits
    from rerank.history import ProfileService
    from rerank.reranker import history_attribute_fields

    assert history_attribute_fields(art) == tuple(spec.cat_fields) and history_attribute_fields(plain_art) == ()
    cached = ProfileService(history.store, history.vectors, ttl_s=600)
    reads = []
    real = engine.get

    def counted(index, ids, **kw):  # an instance's own get: every reader goes through it (indexing.engines.base.array_getter)
        reads.append(sorted(ids))
        return real(index, ids, **kw)

    engine.get = counted
    hits = resp["hits"]["hits"]
    others = {**resp, "hits": {**resp["hits"], "hits": [h for h in hits if h["_id"] not in ("p4", "p7")]}}
    assert {"p0", "p4", "p7"} <= {h["_id"] for h in hits} and len(others["hits"]["hits"]) >= 2
    try:
        for service, hits_of, want in ((history, resp, 2), (history, others, 2), (history, others, 2), (cached, others, 2), (cached, others, 1)):
            reads.clear()
            g = Reranker(engine, INDEX, art, text_encoder=text, history=service, budget_ms=10_000).request_features("black leather shoes", hits_of, user_id="u1")
            assert g.hist_ids == f.hist_ids and g.hist_cats.tolist() == f.hist_cats.tolist()
            # the profile's vectors (unless cached), then one read of the hits and of the history products' attributes
            # where they are no hits (p4, p7; a hit the call fetches has them, a product without a brand included)
            # or the cached profile does not keep them already
            assert len(reads) == want, reads
            hit_ids = sorted(h["_id"] for h in hits_of["hits"]["hits"])
            assert reads[-1] == (sorted([*hit_ids, "p4", "p7"]) if hits_of is others and want == 2 else hit_ids)
    finally:
        del engine.get
    # a model trained before the agreement: nothing fetched, zeros
    f0 = Reranker(engine, INDEX, plain_art, text_encoder=text, history=history, budget_ms=10_000).request_features("black leather shoes", resp, user_id="u1")
    assert f0.hist_ids == ("p0", "p7", "p4") and not f0.hist_cats.any()


def test_the_onnx_graph_computes_the_agreement_as_torch_does():
    from rerank.model.onnx_ranker import OnnxRanker

    m = _model(history_agreement=True)
    reqs = [e.features for e in _shoppers(3, 5)]
    assert all(r.hist_cats.any() for r in reqs)
    fast = OnnxRanker(m)
    for got, want in zip(fast.score_requests(reqs), m.score_requests(reqs)):
        assert np.allclose(got.scores, want.scores, atol=1e-4)


def test_a_features_file_keeps_the_history_attributes_and_an_older_file_reads_them_as_unknown(tmp_path):
    from workers.bench.batch import load_requests, save_requests

    reqs = [e.features for e in _shoppers(2, 7)]
    path = save_requests(tmp_path / "f.npz", reqs)
    back, _ = load_requests(path)
    assert [r.hist_cats.tolist() for r in back] == [r.hist_cats.tolist() for r in reqs] and back[0].hist_cats.any()
    with np.load(path) as z:  # the same file as the code before hist_cats wrote it
        old = {k: z[k] for k in z.files if not k.endswith("/hist_cats")}
    np.savez_compressed(tmp_path / "old.npz", **old)
    back, _ = load_requests(tmp_path / "old.npz")
    assert all(r.hist_cats.shape == reqs[0].hist_cats.shape and not r.hist_cats.any() for r in back)
    assert np.array_equal(back[0].cats, reqs[0].cats)

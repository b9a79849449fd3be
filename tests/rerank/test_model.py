"""FusionRanker: shapes, masking, permutation equivariance, strategies, explain, batching."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from indexing.errors import ConfigError, UnknownNameError
from rerank.retrieval.fusion import ListSignal
from rerank.model.ranker import MODALITIES, STRATEGIES, FUSION_STRATEGIES, RankerConfig, build_ranker
from rerank.model.inputs import FeatureSpec, HistoryInput, build_request_features, collate, first_stage_inputs
from rerank.retrieval.retriever import Candidate

SPEC = FeatureSpec(history_k=6)
TD, ID = 32, 48
RNG_PROJ = np.random.default_rng(7).normal(size=(ID, TD)).astype(np.float32)


def _project(x: np.ndarray) -> np.ndarray:
    y = x @ RNG_PROJ
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def _request(n: int = 12, *, seed: int = 0, history: bool = True, photo_every: int = 2):
    rng = np.random.default_rng(seed)
    cands, docs = [], {}
    for i in range(n):
        sig = {
            "bm25": ListSignal(float(rng.random() * 9), i + 1, 0.5, False) if i % 3 else ListSignal.absent(),
            "knn_text": ListSignal(float(rng.random()), i + 1, 0.5, False),
            "knn_image": ListSignal(float(rng.random()), i + 1, 0.5, False) if i % photo_every == 0 else ListSignal.absent(),
        }
        cands.append(Candidate(f"p{i:02d}", 1.0 / (i + 1), i + 1, sig))
        docs[f"p{i:02d}"] = {
            "text_vec": rng.normal(size=TD),
            "image_vec": rng.normal(size=ID) if i % photo_every == 0 else None,
            "article_type": ["Shoes", "Shirts", "Bags"][i % 3],
            "colour": ["Black", "", "Red"][i % 3],
        }
    h = None
    if history:
        h = HistoryInput(("h1", "h2", "h3"), (rng.normal(size=TD), None, rng.normal(size=TD)), (None, rng.normal(size=ID), rng.normal(size=ID)),
                         ("view", "purchase", "click"), (60.0, 86_400.0 * 2, 86_400.0 * 30))
    return build_request_features(rng.normal(size=TD), cands, docs, SPEC, history=h, project=_project, text_dim=TD, image_dim=ID)


def _model(strategy: str = "attention", **kw):
    cfg = RankerConfig(text_dim=TD, first_stage_dim=SPEC.first_stage_dim, n_cat_fields=len(SPEC.cat_fields), hash_buckets=SPEC.hash_buckets,
                       history_k=SPEC.history_k, d_model=16, hidden=32, heads=2, strategy=strategy, **kw)
    return build_ranker(cfg, device="cpu", seed=0).eval()


def test_features_mask_missing_inputs_explicitly():
    r = _request()
    assert r.cand_text.shape == (12, TD) and r.cand_image.shape == (12, TD)
    assert r.cand_image_mask.tolist() == [i % 2 == 0 for i in range(12)]
    assert not r.cand_image[~r.cand_image_mask].any()
    assert r.hist_mask.tolist() == [True, True, True, False, False, False]
    assert r.hist_text_mask.tolist()[:3] == [True, False, True] and r.hist_image_mask.tolist()[:3] == [False, True, True]
    assert r.hist_event.tolist()[:4] == [1, 4, 2, 0]
    assert r.cats[1, 1] == 0 and r.cats[0, 1] > 0  # the empty colour is missing, not a bucket
    fs = first_stage_inputs([], SPEC.lists)
    assert fs.shape == (0, SPEC.first_stage_dim)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_scores_and_gates_sum_to_one(strategy):
    m = _model(strategy)
    out = m.score_requests([_request(12), _request(5, seed=1, history=False)])
    assert out[0].scores.shape == (12,) and out[1].scores.shape == (5,)
    for r in out:
        assert np.isfinite(r.scores).all()
        assert np.allclose(r.gates.sum(axis=1), 1.0, atol=1e-5)
    g = out[0].gates
    img = MODALITIES.index("image")
    assert (g[1::2, img] == 0).all() and (g[0::2, img] > 0).all()  # no photo -> image gate excluded
    assert (out[1].gates[:, MODALITIES.index("history")] == 0).all()  # no history -> history gate excluded
    ex = out[0].explain(0)
    assert set(ex["gates"]) == set(MODALITIES) and abs(sum(ex["gates"].values()) - 1) < 1e-4
    ws = [h["weight"] for h in ex["history_top"]]
    assert ws == sorted(ws, reverse=True) and {h["product_id"] for h in ex["history_top"]} <= {"h1", "h2", "h3"}
    assert out[1].explain(0)["history_top"] == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masked_inputs_do_not_change_scores(strategy):
    m = _model(strategy)
    r = _request(10, history=True)
    base = m.score(r).scores
    img = r.cand_image.copy()
    img[~r.cand_image_mask] = np.nan  # a masked photo, even NaN, is never read
    hist_t = r.hist_text.copy()
    hist_t[~r.hist_text_mask] = 1e6
    hist_i = r.hist_image.copy()
    hist_i[~r.hist_image_mask] = -3.0
    ev = r.hist_event.copy()
    ev[~r.hist_mask] = 3
    changed = dataclasses.replace(r, cand_image=img, hist_text=hist_t, hist_image=hist_i, hist_event=ev)
    assert np.allclose(m.score(changed).scores, base, atol=1e-5)
    # an unmasked change does change the scores (the test can fail)
    img2 = r.cand_image.copy()
    img2[r.cand_image_mask] *= -1
    assert not np.allclose(m.score(dataclasses.replace(r, cand_image=img2)).scores, base, atol=1e-5)


def test_user_without_history_and_product_without_photo_get_finite_scores():
    m = _model()
    r = _request(6, history=False, photo_every=100)  # only p00 has a photo
    s = m.score(r)
    assert np.isfinite(s.scores).all()
    assert not r.hist_mask.any()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scores_are_permutation_equivariant_and_batching_does_not_leak(strategy):
    m = _model(strategy)
    r = _request(9)
    base = dict(zip(r.ids, m.score(r).scores))
    perm = np.random.default_rng(3).permutation(len(r))
    arrays = {f: getattr(r, f)[perm] for f in ("cand_text", "cand_text_mask", "cand_image", "cand_image_mask", "first_stage", "cats")}
    shuffled = dataclasses.replace(r, ids=tuple(r.ids[i] for i in perm), **arrays)
    again = dict(zip(shuffled.ids, m.score(shuffled).scores))
    assert all(abs(base[k] - again[k]) < 1e-5 for k in base)
    # scored in a batch with a longer request (padding) and alone: the same scores
    batched = m.score_requests([r, _request(20, seed=5)])[0]
    assert np.allclose(batched.scores, m.score(r).scores, atol=1e-5)


def test_padded_batch_gives_minus_inf_to_padding_and_gradients_are_finite():
    m = _model("attention").train()
    from rerank.model.inputs import to_torch

    x = to_torch(collate([_request(4), _request(9, seed=2)]))
    out = m(x)
    assert out.scores.shape == (2, 9)
    assert torch.isinf(out.scores[0, 4:]).all() and torch.isfinite(out.scores[1]).all()
    loss = -torch.log_softmax(out.scores, -1)[:, 0].mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_ablation_flags_mask_their_modality():
    r = _request(6)
    g = _model(use_image=False, use_history=False).score(r).gates
    assert (g[:, MODALITIES.index("image")] == 0).all() and (g[:, MODALITIES.index("history")] == 0).all()
    assert np.allclose(g.sum(1), 1.0, atol=1e-5)


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="attention, concat, weighted"):
        RankerConfig(strategy="mean")
    assert FUSION_STRATEGIES.names() == sorted(STRATEGIES)
    with pytest.raises(ConfigError):
        RankerConfig(d_model=10, heads=4)

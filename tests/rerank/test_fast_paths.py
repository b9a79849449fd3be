"""The rerank call's fast paths give what the straightforward code gives.

Each optimization of the serving path is checked against a reference: the per-row feature builders
(copied here as they were), the literal forward pass (training mode with dropout 0: no inference
shortcut, the literal DIN concatenation), per-candidate ``explain``, ``copy.deepcopy`` and
``LocalEngine.get``. Speed itself is measured by ``fusionrank bench rerank``, not asserted here.
"""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import pytest
import torch

from indexing.errors import DimensionError
from rerank.fusion import ListSignal
from rerank.model import STRATEGIES, RankerConfig, build_ranker
from rerank.model_features import (
    FeatureSpec,
    HistoryInput,
    _vec_rows,
    build_request_features,
    collate,
    hash_categories,
    to_torch,
)
from rerank.retrieval import Candidate

SPEC = FeatureSpec(history_k=5)
TD, ID = 24, 40
PROJ = np.random.default_rng(3).normal(size=(ID, TD)).astype(np.float32)


# --------------------------------------------------------------------------- references (the code before)
def _ref_vec_rows(values, dim, what):
    out = np.zeros((len(values), dim), dtype=np.float32)
    mask = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is None:
            continue
        a = np.asarray(v, dtype=np.float32).reshape(-1)
        if a.shape[0] != dim:
            raise DimensionError(f"{what} of row {i} has dimension {a.shape[0]}, expected {dim}")
        if not np.isfinite(a).all():
            continue
        out[i], mask[i] = a, True
    return out, mask


def _ref_hash_categories(docs, spec):
    def bucket(field_name, value, buckets):
        h = hashlib.blake2b(f"{field_name}={value.strip().lower()}".encode(), digest_size=8).digest()
        return 1 + int.from_bytes(h, "little") % (buckets - 1)

    out = np.zeros((len(docs), len(spec.cat_fields)), dtype=np.int64)
    for i, d in enumerate(docs):
        if not d:
            continue
        for j, name in enumerate(spec.cat_fields):
            v = d.get(name)
            if v is None or (isinstance(v, str) and not v.strip()):
                continue
            out[i, j] = bucket(name, str(v), spec.hash_buckets)
    return out


# --------------------------------------------------------------------------- feature builders
@pytest.mark.parametrize("seed", range(4))
def test_vec_rows_matches_the_per_row_builder(seed):
    rng = np.random.default_rng(seed)
    values = []
    for i in range(30):
        kind = rng.integers(0, 5)
        if kind == 0:
            values.append(None)
        elif kind == 1:
            values.append(rng.normal(size=TD).tolist())  # JSON lists
        elif kind == 2:
            v = rng.normal(size=TD).astype(np.float32)
            v[rng.integers(0, TD)] = [np.nan, np.inf, -np.inf][i % 3]  # non-finite: masked
            values.append(v)
        else:
            values.append(rng.normal(size=TD).astype(np.float64 if kind == 3 else np.float32))
    got, ref = _vec_rows(values, TD, "v"), _ref_vec_rows(values, TD, "v")
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    assert got[1].any() and not got[1].all()
    assert _vec_rows([None, None], TD, "v")[1].tolist() == [False, False]


def test_vec_rows_names_the_first_bad_row_like_before():
    values = [np.zeros(TD), None, np.zeros(TD + 1), np.zeros(TD - 1)]
    with pytest.raises(DimensionError) as got:
        _vec_rows(values, TD, "text_vec")
    with pytest.raises(DimensionError) as ref:
        _ref_vec_rows(values, TD, "text_vec")
    assert str(got.value) == str(ref.value) == f"text_vec of row 2 has dimension {TD + 1}, expected {TD}"


def test_hash_categories_matches_the_uncached_hash():
    rng = np.random.default_rng(0)
    vocab = ["Shoes", " shoes ", "SHOES", "Red", "", "  ", None, 7, 3.5, "Men", "Casual", "Nike"]
    docs = [None, {}] + [{f: vocab[rng.integers(0, len(vocab))] for f in SPEC.cat_fields if rng.random() < 0.8} for _ in range(60)]
    for _ in range(2):  # the second pass answers from the memo
        got = hash_categories(docs, SPEC)
        assert got.dtype == np.int64 and got.shape == (len(docs), len(SPEC.cat_fields))
        assert np.array_equal(got, _ref_hash_categories(docs, SPEC))
    assert hash_categories([], SPEC).shape == (0, len(SPEC.cat_fields))


# --------------------------------------------------------------------------- the model's inference path
def _request(n, *, seed, history, photos):
    rng = np.random.default_rng(seed)
    cands, docs = [], {}
    for i in range(n):
        sig = {"bm25": ListSignal(float(rng.random() * 9), i + 1, float(rng.random()), False),
               "knn_text": ListSignal.absent(), "knn_image": ListSignal.absent()}
        cands.append(Candidate(f"p{i:03d}", 1.0 / (i + 1), i + 1, sig))
        docs[f"p{i:03d}"] = {"text_vec": rng.normal(size=TD) if i % 7 else None,
                             "image_vec": rng.normal(size=ID) if photos and i % 2 == 0 else None,
                             "article_type": ["Shoes", "Shirts", "Bags"][i % 3]}
    h = None
    if history:
        k = int(rng.integers(1, 9))  # shorter and longer than history_k
        h = HistoryInput(tuple(f"h{j}" for j in range(k)),
                         tuple(rng.normal(size=TD) if j % 3 else None for j in range(k)),
                         tuple(rng.normal(size=ID) if j % 2 else None for j in range(k)),
                         tuple(["view", "click", "add_to_cart", "purchase"][j % 4] for j in range(k)),
                         tuple(float(rng.random() * 86_400 * 30) for _ in range(k)))
    return build_request_features(rng.normal(size=TD), cands, docs, SPEC, history=h,
                                  project=lambda x: x @ PROJ, text_dim=TD, image_dim=ID)


def _ranker(strategy, **kw):
    cfg = RankerConfig(text_dim=TD, first_stage_dim=SPEC.first_stage_dim, n_cat_fields=len(SPEC.cat_fields),
                       hash_buckets=SPEC.hash_buckets, history_k=SPEC.history_k, d_model=16, hidden=32, heads=2,
                       dropout=0.0, strategy=strategy, **kw)
    return build_ranker(cfg, device="cpu", seed=1)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("history,photos", [(True, True), (True, False), (False, True), (False, False)])
def test_inference_forward_equals_the_literal_forward(strategy, history, photos):
    """Eval mode takes the shortcuts (no image MLP without photos, no history block without history, the
    split DIN layer); train mode with dropout 0 runs the literal code. Same scores (1e-5), same order."""
    m = _ranker(strategy)
    reqs = [_request(n, seed=s, history=history, photos=photos) for s, n in enumerate((40, 17, 1))]
    x = to_torch(collate(reqs))
    with torch.no_grad():
        m.train()
        ref = m(x)
        m.eval()
        fast = m(x)
    valid = x["cand_mask"]
    assert torch.equal(torch.isinf(ref.scores), torch.isinf(fast.scores))
    assert torch.allclose(fast.scores[valid], ref.scores[valid], atol=1e-5, rtol=0)
    assert torch.allclose(fast.gates, ref.gates, atol=1e-6, rtol=0)
    assert torch.allclose(fast.history_weights, ref.history_weights, atol=1e-6, rtol=0)
    for b, r in enumerate(reqs):
        assert torch.equal(torch.argsort(ref.scores[b, : len(r)], descending=True, stable=True),
                           torch.argsort(fast.scores[b, : len(r)], descending=True, stable=True))
    assert (fast.history_weights.sum() > 0) == history
    assert not m.training  # score_requests leaves the mode as found (below)


def test_score_requests_restores_training_mode_and_keeps_eval_mode():
    m = _ranker("attention")
    r = _request(10, seed=0, history=True, photos=True)
    m.train()
    a = m.score(r)
    assert m.training
    m.eval()
    b = m.score(r)
    assert not m.training and np.array_equal(a.scores, b.scores)


def test_saved_artifact_scores_the_same_through_the_fast_path(tmp_path):
    from rerank.artifacts import EncoderRef, load_artifact, save_artifact

    m = _ranker("attention")
    reqs = [_request(30, seed=9, history=True, photos=True)]
    with torch.no_grad():
        m.train()
        ref = m(to_torch(collate(reqs))).scores[0].numpy()
    m.eval()
    save_artifact(tmp_path / "a", m, feature_spec=SPEC, text_encoder=EncoderRef("t", TD), image_encoder=None)
    loaded = load_artifact(tmp_path / "a", device="cpu")
    got = loaded.ranker.score(reqs[0]).scores
    assert np.allclose(got, ref, atol=1e-5, rtol=0)
    assert np.argsort(-got, kind="stable").tolist() == np.argsort(-ref, kind="stable").tolist()


@pytest.mark.parametrize("history", [True, False])
def test_explain_all_equals_explain_per_candidate(history):
    m = _ranker("weighted").eval()
    scored = m.score(_request(25, seed=4, history=history, photos=True))
    assert scored.explain_all() == [scored.explain(i) for i in range(25)]
    assert scored.explain_all(top=1) == [scored.explain(i, top=1) for i in range(25)]
    assert any(e["history_top"] for e in scored.explain_all()) == history


# --------------------------------------------------------------------------- reranker helpers
def test_copy_json_is_a_deep_copy():
    from indexing.engines.base import copy_json as _copy_json

    src = {"_id": "a", "_score": 1.5, "_source": {"title": "x", "tags": ["a", {"b": [1, 2.0, None, True]}], "t": (1, [2])},
           "inner_hits": {"h": {"hits": {"hits": [{"_id": "c"}]}}}, "obj": {1, 2}}
    out = _copy_json(src)
    assert out == copy.deepcopy(src)
    out["_source"]["tags"][1]["b"].append(3)
    out["inner_hits"]["h"]["hits"]["hits"][0]["_id"] = "z"
    out["obj"].add(3)
    out["_source"]["t"][1].append(9)
    assert src["_source"]["tags"][1]["b"] == [1, 2.0, None, True] and src["inner_hits"]["h"]["hits"]["hits"][0]["_id"] == "c"
    assert src["obj"] == {1, 2} and src["_source"]["t"] == (1, [2])
    assert math.isnan(_copy_json({"x": float("nan")})["x"])

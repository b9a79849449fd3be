"""The rerank call's fast paths give what the straightforward code gives.

Each optimization of the serving path is checked against a reference: the per-row feature builders
(copied here as they were), the literal forward pass (training mode with dropout 0: no inference
shortcut, none of the folded layers, the literal DIN concatenation and ``nn.MultiheadAttention``),
per-candidate ``explain``, ``copy.deepcopy``, ``LocalEngine.get`` and, for the aligned-photo cache, the
projection itself. Speed itself is measured by ``fusionrank bench rerank``, not asserted here.
"""

from __future__ import annotations

import copy
import hashlib
import math
import threading

import numpy as np
import pytest
import torch

from indexing.errors import ConfigError, DimensionError
from rerank.model.alignment import AlignedCache, Alignment, AlignmentConfig, build_head
from rerank.retrieval.fusion import ListSignal
from rerank.model.ranker import STRATEGIES, RankerConfig, ScoredRequest, build_ranker
from rerank.model.inputs import (
    ARRAY_FIELDS,
    FeatureSpec,
    HistoryInput,
    _vec_rows,
    build_request_features,
    collate,
    hash_categories,
    to_torch,
)
from rerank.retrieval.retriever import Candidate

SPEC = FeatureSpec(history_k=5)
TD, ID = 24, 40
PROJ = np.random.default_rng(3).normal(size=(ID, TD)).astype(np.float32)


def _project(x):
    return x @ PROJ


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
    # 1, 1.0 and True are equal dict keys but different strings (different buckets); a list is unhashable
    vocab = ["Shoes", " shoes ", "SHOES", "Red", "", "  ", None, 7, 3.5, "Men", "Casual", "Nike", 1, 1.0, True, "1", ["Red", "Blue"]]
    docs = [None, {}] + [{f: vocab[rng.integers(0, len(vocab))] for f in SPEC.cat_fields if rng.random() < 0.8} for _ in range(60)]
    for _ in range(2):  # the second pass answers from the memo
        got = hash_categories(docs, SPEC)
        assert got.dtype == np.int64 and got.shape == (len(docs), len(SPEC.cat_fields))
        assert np.array_equal(got, _ref_hash_categories(docs, SPEC))
    assert hash_categories([], SPEC).shape == (0, len(SPEC.cat_fields))


# --------------------------------------------------------------------------- the model's inference path
def _request(n, *, seed, history, photos, aligned_cache=None):
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
                                  project=_project, aligned_cache=aligned_cache, text_dim=TD, image_dim=ID)


def _ranker(strategy, **kw):
    cfg = RankerConfig(text_dim=TD, first_stage_dim=SPEC.first_stage_dim, n_cat_fields=len(SPEC.cat_fields),
                       hash_buckets=SPEC.hash_buckets, history_k=SPEC.history_k, d_model=16, hidden=32, heads=2,
                       dropout=0.0, strategy=strategy, **kw)
    return build_ranker(cfg, device="cpu", seed=1)


def _literal_and_inference(m, reqs):
    """The ranker's outputs on ``reqs`` in train mode (dropout 0: the literal code) and in eval mode (the folded
    inference code), and the candidate mask; the ranker is left in eval mode."""
    x = to_torch(collate(reqs))
    with torch.no_grad():
        m.train()
        ref = m(x)
        m.eval()
        fast = m(x)
    return ref, fast, x["cand_mask"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("history,photos", [(True, True), (True, False), (False, True), (False, False)])
def test_inference_forward_equals_the_literal_forward(strategy, history, photos):
    """Eval mode takes the shortcuts (no image MLP without photos, no history block without history, the
    split DIN layer); train mode with dropout 0 runs the literal code. Same scores (1e-5), same order."""
    m = _ranker(strategy)
    reqs = [_request(n, seed=s, history=history, photos=photos) for s, n in enumerate((40, 17, 1))]
    ref, fast, valid = _literal_and_inference(m, reqs)
    assert torch.equal(torch.isinf(ref.scores), torch.isinf(fast.scores))
    assert torch.allclose(fast.scores[valid], ref.scores[valid], atol=1e-5, rtol=0)
    assert torch.allclose(fast.gates, ref.gates, atol=1e-6, rtol=0)
    assert torch.allclose(fast.history_weights, ref.history_weights, atol=1e-6, rtol=0)
    for b, r in enumerate(reqs):
        assert torch.equal(torch.argsort(ref.scores[b, : len(r)], descending=True, stable=True),
                           torch.argsort(fast.scores[b, : len(r)], descending=True, stable=True))
    assert (fast.history_weights.sum() > 0) == history
    assert not m.training  # score_requests leaves the mode as found (below)


@pytest.mark.parametrize("ablation", [{"use_image": False}, {"use_history": False}, {"use_product": False}])
def test_inference_forward_equals_the_literal_forward_in_ablations(ablation):
    m = _ranker("attention", **ablation)
    reqs = [_request(n, seed=s, history=True, photos=True) for s, n in enumerate((30, 9))]
    ref, fast, valid = _literal_and_inference(m, reqs)
    assert torch.allclose(fast.scores[valid], ref.scores[valid], atol=1e-5, rtol=0)
    assert torch.allclose(fast.gates, ref.gates, atol=1e-6, rtol=0)


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
    from rerank.model.artifact import EncoderRef, load_artifact, save_artifact

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


def test_explain_all_rounds_like_round_on_ties_and_edge_values():
    """``np.round`` in ``explain_all`` against ``round`` in ``explain``: float32 values whose ``x * 1e6`` is a
    half-integer (0.5078125 = 65/128 -> 507812.5), tiny, subnormal and 1.0."""
    edge = [0.5078125, 0.5234375, 1.5e-6, 2.5e-6, 5e-7, 1e-45, 0.9999995, 1.0, 0.0, 3.0517578125e-05]
    rng = np.random.default_rng(0)
    gates = np.array([edge[i:i + 5] for i in range(0, len(edge), 5)] + rng.random((6, 5)).tolist(), dtype=np.float32)
    hw = np.concatenate([gates, np.zeros((len(gates), 2), dtype=np.float32)], axis=1)
    n = len(gates)
    scored = ScoredRequest(tuple(f"p{i}" for i in range(n)), np.zeros(n, np.float32), gates, hw, tuple(f"h{j}" for j in range(7)))
    assert scored.explain_all(top=7) == [scored.explain(i, top=7) for i in range(n)]
    assert scored.explain_all()[0]["gates"]["text"] == round(0.5078125, 6) == 0.507812


# --------------------------------------------------------------------------- the aligned-photo cache
def _alignment():
    torch.manual_seed(0)
    return Alignment(build_head(ID, TD), image_dim=ID, text_dim=TD, config=AlignmentConfig())


class CountingProjection:
    """A real projection, counting the rows it is asked for (measuring, not mocking)."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, x):
        self.batches.append(len(x))
        return self.inner(x)


def test_aligned_cache_projects_only_unseen_rows_and_never_serves_a_stale_photo():
    project = CountingProjection(_alignment().project)
    cache = AlignedCache(project, max_entries=100)
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(6, ID)).astype(np.float32)
    ids = [f"p{i}" for i in range(6)]
    first = cache(ids[:4], raw[:4])
    assert project.batches == [4] and np.allclose(first, project.inner(raw[:4]), atol=1e-6, rtol=0)
    both = cache(ids, raw)  # 4 seen, 2 new: one batch of 2
    assert project.batches == [4, 2] and np.array_equal(both[:4], first)
    assert np.allclose(both, project.inner(raw), atol=1e-6, rtol=0)
    assert cache.stats == {"hits": 4, "misses": 6, "entries": 6, "max_entries": 100}

    reindexed = raw.copy()
    reindexed[2] = rng.normal(size=ID)  # product p2 got a new photo: a new key, the new vector
    got = cache(ids, reindexed)
    assert project.batches == [4, 2, 1]
    assert np.allclose(got[2], project.inner(reindexed[2:3])[0], atol=1e-6, rtol=0) and not np.allclose(got[2], both[2])
    assert np.array_equal(np.delete(got, 2, axis=0), np.delete(both, 2, axis=0))
    cache(["another"], raw[:1])  # the same photo under another id is another entry
    assert project.batches == [4, 2, 1, 1] and cache.stats["entries"] == 8
    with pytest.raises(ConfigError):
        AlignedCache(project, max_entries=0)


def test_aligned_cache_keeps_the_most_recently_used_entries():
    project = CountingProjection(_alignment().project)
    cache = AlignedCache(project, max_entries=3)
    raw = np.random.default_rng(2).normal(size=(4, ID)).astype(np.float32)
    cache(["a", "b", "c"], raw[:3])
    cache(["a"], raw[:1])  # a is now more recent than b
    cache(["d"], raw[3:])  # evicts b, the least recently used
    assert cache.stats["entries"] == 3 and project.batches == [3, 1]
    cache(["a", "c", "d"], raw[[0, 2, 3]])
    assert project.batches == [3, 1]
    cache(["b"], raw[1:2])
    assert project.batches == [3, 1, 1]


def test_aligned_cache_is_thread_safe():
    align = _alignment()
    cache = AlignedCache(align.project, max_entries=40)
    raw = np.random.default_rng(3).normal(size=(60, ID)).astype(np.float32)
    want = align.project(raw)
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(40):
            rows = rng.choice(60, size=int(rng.integers(1, 20)), replace=False)
            got = cache([f"p{i}" for i in rows], raw[rows])
            if not np.allclose(got, want[rows], atol=1e-6, rtol=0):
                errors.append(rows)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and cache.stats["entries"] <= 40 and cache.stats["hits"] > 0


@pytest.mark.parametrize("history", [True, False])
def test_features_through_the_aligned_cache_equal_the_projected_ones(history):
    """The candidates' and the history items' photos go through the cache (keyed by their product ids)."""
    project = CountingProjection(_project)
    cache = AlignedCache(project, max_entries=1000)
    plain = _request(40, seed=5, history=history, photos=True)
    cached = _request(40, seed=5, history=history, photos=True, aligned_cache=cache)
    for name in ARRAY_FIELDS:
        assert np.allclose(getattr(cached, name), getattr(plain, name), atol=1e-5, rtol=0), name
    photos = int(plain.cand_image_mask.sum()) + int(plain.hist_image_mask.sum())
    assert photos and cache.stats["misses"] == sum(project.batches) == photos and len(project.batches) == 1 + history
    again = _request(40, seed=5, history=history, photos=True, aligned_cache=cache)
    assert np.array_equal(again.cand_image, cached.cand_image) and np.array_equal(again.hist_image, cached.hist_image)
    assert sum(project.batches) == photos and cache.stats["hits"] == photos


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

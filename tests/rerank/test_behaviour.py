"""Behaviour features (rerank.model.behaviour): debiased click-through and conversion per (query, product) and per
product, neutral without behaviour, carried by the artifact, read by the feature builder and the rerank call."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from indexing.errors import DimensionError, ModelArtifactError
from rerank.datasets.clicks import Session
from rerank.model.behaviour import BEHAVIOUR_FEATURES, BehaviourStats
from rerank.model.inputs import FeatureSpec, behaviour_columns
from rerank.retrieval.signals import PER_LIST

THETA = [1.0, 0.5, 0.25, 0.1]
COL = {n: i for i, n in enumerate(BEHAVIOUR_FEATURES)}


def _log() -> list[Session]:
    """'red dress': 'top' always at rank 1 (clicked in 4 of 10 searches), 'deep' always at rank 4 (clicked in 2 of 10:
    a lower raw rate, but at rank 4 only a tenth of the users look), 'never' at rank 2 and never clicked; 'deep' also
    converts. 'shoes' (2 searches) shows 'top' unclicked."""
    out = []
    for k in range(10):
        clicks = {0} if k < 4 else set()
        conv = set()
        if k < 2:
            clicks.add(3)
            conv.add(3)
        out.append(Session("red dress", ("top", "never", "mid", "deep"), frozenset(clicks), client=f"c{k}", conversions=frozenset(conv)))
    out += [Session("shoes", ("top", "x"), frozenset(), client="c0") for _ in range(2)]
    return out


def test_position_debiased_click_through_orders_a_deep_clicked_product_above_a_top_one():
    b = BehaviourStats.from_sessions(_log(), THETA)
    f = b.features("Red  DRESS", ["top", "never", "deep", "unseen"])
    raw_top, raw_deep = 4 / 10, 2 / 10
    assert raw_deep < raw_top  # the naive rate prefers the top product ...
    assert f[2, COL["qd_ctr"]] > f[0, COL["qd_ctr"]] > 0 > f[1, COL["qd_ctr"]]  # ... clicks per examination prefer the deep one
    assert f[2, COL["qd_log_exams"]] < f[0, COL["qd_log_exams"]]  # and say the deep estimate rests on fewer examinations
    assert f[2, COL["qd_conv"]] > 0 and f[0, COL["qd_conv"]] < 0  # only 'deep' converts
    assert np.all(f[3, :6] == 0)  # a product the log never showed for the query: neutral (the query's count stays)
    assert np.all(f[:, COL["q_log_searches"]] == pytest.approx(np.log1p(10)))
    # the product columns pool every query: 'top' was also shown, unclicked, for 'shoes'
    assert f[0, COL["p_log_exams"]] == pytest.approx(np.log1p(10 * 1.0 + 2 * 1.0))
    assert f[0, COL["p_ctr"]] < f[0, COL["qd_ctr"]]


def test_unknown_query_gets_only_the_product_columns_and_query_level_off_hides_the_query():
    b = BehaviourStats.from_sessions(_log(), THETA)
    unknown = b.features("blue jeans", ["top", "deep", "nowhere"])
    q_cols = [COL["qd_ctr"], COL["qd_log_exams"], COL["qd_conv"], COL["q_log_searches"]]
    p_cols = [COL["p_ctr"], COL["p_log_exams"], COL["p_conv"]]
    assert np.all(unknown[:, q_cols] == 0) and np.all(unknown[2] == 0) and np.all(unknown[:2][:, p_cols] != 0)
    hidden = b.features("red dress", ["top", "deep"], query_level=False)
    assert np.all(hidden[:, q_cols] == 0)
    # shown as a query the log never saw: the products' behaviour under the *other* queries only ('top': the two unclicked
    # 'shoes' searches; 'deep': nothing), as a new query would see them; never this query's own clicks (its labels)
    assert hidden[0, COL["p_log_exams"]] == pytest.approx(np.log1p(2.0)) and hidden[0, COL["p_ctr"]] < 0
    assert np.all(hidden[1] == 0)
    assert np.all(hidden[:, p_cols] != b.features("red dress", ["top", "deep"])[:, p_cols])
    assert BehaviourStats().features("red dress", ["top"]).shape == (1, len(BEHAVIOUR_FEATURES))
    assert np.all(BehaviourStats().features("red dress", ["top"]) == 0)  # no log at all: neutral


def test_the_other_queries_scope_leaves_the_own_query_out_of_the_product_columns_for_every_query():
    """``product_scope="other_queries"``: the product columns of a query that reads its own behaviour are those a query the
    log never saw would read (the product under the other queries), and its own clicks stay in the query columns."""
    b = BehaviourStats.from_sessions(_log(), THETA)
    q_cols = [COL["qd_ctr"], COL["qd_log_exams"], COL["qd_conv"], COL["q_log_searches"]]
    p_cols = [COL["p_ctr"], COL["p_log_exams"], COL["p_conv"]]
    ids = ["top", "never", "deep", "unseen"]
    own, others = b.features("red dress", ids), b.features("red dress", ids, product_scope="other_queries")
    hidden = b.features("red dress", ids, query_level=False)
    assert np.array_equal(others[:, q_cols], own[:, q_cols]) and np.all(others[:, COL["q_log_searches"]] > 0)
    assert np.array_equal(others[:, p_cols], hidden[:, p_cols]) and not np.array_equal(others[:, p_cols], own[:, p_cols])
    assert others[0, COL["p_log_exams"]] == pytest.approx(np.log1p(2.0)) and np.all(others[2, p_cols] == 0)  # 'deep': no other query
    # a query the log never saw reads the same columns under either scope (it has no own searches to leave out)
    assert np.array_equal(b.features("blue jeans", ids), b.features("blue jeans", ids, product_scope="other_queries"))
    with pytest.raises(ValueError, match="unknown behaviour product scope"):
        b.features("red dress", ids, product_scope="mine")
    spec = FeatureSpec(behaviour=True, behaviour_product_scope="other_queries")
    assert FeatureSpec.from_dict(spec.to_dict()).behaviour_product_scope == "other_queries"
    assert FeatureSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "behaviour_product_scope"}).behaviour_product_scope == "all"
    from indexing.errors import ConfigError

    with pytest.raises(ConfigError, match="behaviour_product_scope"):
        FeatureSpec(behaviour=True, behaviour_product_scope="mine")


def test_training_hides_a_seeded_share_of_the_query_texts_the_same_way_every_time():
    b = BehaviourStats()
    texts = [f"query {i}" for i in range(2000)]
    kept = [b.keeps_query(t, 0.5, 13) for t in texts]
    assert 0.45 < 1 - sum(kept) / len(kept) < 0.55
    assert kept == [b.keeps_query(t.upper(), 0.5, 13) for t in texts]  # by normalised text: every request of a query agrees
    assert kept != [b.keeps_query(t, 0.5, 14) for t in texts]
    assert all(b.keeps_query(t, 0.0, 13) for t in texts) and not any(b.keeps_query(t, 1.0, 13) for t in texts)


def test_more_evidence_moves_the_estimate_further_from_the_prior():
    """The same click rate (one in two at rank 1) on 4 searches and on 100: the second estimate is further above the log's
    mean, and its count column says it rests on more."""
    log = [Session("few", ("a", "b"), frozenset({0} if k % 2 else ())) for k in range(4)]
    log += [Session("many", ("c", "b"), frozenset({0} if k % 2 else ())) for k in range(100)]
    b = BehaviourStats.from_sessions(log, [1.0, 0.5])
    few, many = b.features("few", ["a"])[0], b.features("many", ["c"])[0]
    assert many[COL["qd_ctr"]] > few[COL["qd_ctr"]] > 0
    assert many[COL["qd_log_exams"]] > few[COL["qd_log_exams"]] and many[COL["q_log_searches"]] > few[COL["q_log_searches"]]


def test_statistics_round_trip_and_bad_files_are_refused_by_name(tmp_path):
    b = BehaviourStats.from_sessions(_log(), THETA)
    p = b.save(tmp_path / "behaviour.json.gz")
    again = BehaviourStats.load(p)
    ids = ["top", "never", "mid", "deep", "x"]
    assert np.allclose(again.features("red dress", ids), b.features("red dress", ids), atol=1e-4)
    assert again.info["searches"] == 12 and again.query_searches("RED dress") == 10
    with pytest.raises(ModelArtifactError, match="not found"):
        BehaviourStats.load(tmp_path / "missing.json.gz")
    (tmp_path / "broken.json.gz").write_bytes(b"not gzip")
    with pytest.raises(ModelArtifactError, match="unreadable"):
        BehaviourStats.load(tmp_path / "broken.json.gz")
    body = json.loads(gzip.decompress(p.read_bytes()))
    body["features"] = ["qd_ctr"]
    with gzip.open(tmp_path / "other.json.gz", "wt") as f:
        json.dump(body, f)
    with pytest.raises(ModelArtifactError, match="features"):
        BehaviourStats.load(tmp_path / "other.json.gz")
    with pytest.raises(ValueError, match="theta"):
        BehaviourStats.from_sessions(_log(), [])


def test_the_feature_spec_adds_the_columns_and_an_old_spec_has_none():
    plain, with_b = FeatureSpec(), FeatureSpec(behaviour=True)
    assert with_b.first_stage_dim == plain.first_stage_dim + len(BEHAVIOUR_FEATURES)
    old = {k: v for k, v in with_b.to_dict().items() if k != "behaviour"}  # an artifact written before the field
    assert FeatureSpec.from_dict(old).behaviour is False
    assert FeatureSpec.from_dict(with_b.to_dict()).behaviour is True
    assert np.all(behaviour_columns(None, 3) == 0) and behaviour_columns(None, 3).shape == (3, len(BEHAVIOUR_FEATURES))
    with pytest.raises(DimensionError, match="behaviour columns"):
        behaviour_columns(np.zeros((3, 2)), 3)
    bad = np.full((1, len(BEHAVIOUR_FEATURES)), np.nan)
    assert np.all(behaviour_columns(bad, 1) == 0)


def test_the_request_features_carry_the_columns_after_the_signals():
    from rerank.model.inputs import build_request_features
    from rerank.reranker import candidates_from_hits

    b = BehaviourStats.from_sessions(_log(), THETA)
    spec = FeatureSpec(behaviour=True)
    cands = candidates_from_hits(["top", "deep"], [2.0, 1.0])
    docs = {"top": {"text_vec": [1.0, 0.0]}, "deep": {"text_vec": [0.0, 1.0]}}
    rows = b.features("red dress", ["top", "deep"])
    req = build_request_features(np.array([1.0, 0.0]), cands, docs, spec, behaviour=rows)
    start = len(spec.lists) * len(PER_LIST) + 1
    assert req.first_stage.shape == (2, spec.first_stage_dim)
    assert np.allclose(req.first_stage[:, start:start + len(BEHAVIOUR_FEATURES)], rows)
    neutral = build_request_features(np.array([1.0, 0.0]), cands, docs, spec)
    assert np.all(neutral.first_stage[:, start:] == 0) and np.allclose(neutral.first_stage[:, :start], req.first_stage[:, :start])


def _behaviour_artifact(path, stats):
    from rerank.model.artifact import EncoderRef, save_artifact
    from rerank.model.ranker import RankerConfig, build_ranker
    from tests.rerank.test_model import TD

    spec = FeatureSpec(behaviour=True)
    cfg = RankerConfig(text_dim=TD, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields), history_k=spec.history_k,
                       d_model=16, hidden=32, heads=2, use_history=False)
    return save_artifact(path, build_ranker(cfg, device="cpu", seed=1), feature_spec=spec, text_encoder=EncoderRef("minilm:x:32", TD),
                         image_encoder=None, behaviour=stats)


def test_the_artifact_carries_the_statistics_and_serves_neutral_without_them(tmp_path, caplog):
    from rerank.model.artifact import load_artifact, read_config

    stats = BehaviourStats.from_sessions(_log(), THETA)
    path = _behaviour_artifact(tmp_path / "m", stats)
    art = load_artifact(path, device="cpu")
    assert art.feature_spec.behaviour and art.behaviour is not None
    assert np.allclose(art.behaviour.features("red dress", ["deep", "top"]), stats.features("red dress", ["deep", "top"]), atol=1e-4)
    assert read_config(path)["behaviour"]["pairs"] == len(stats.pairs)
    (path / "behaviour.json.gz").unlink()  # lost statistics: the model still loads and reads the neutral columns
    with caplog.at_level("WARNING"):
        again = load_artifact(path, device="cpu")
    assert again.behaviour is None and "neutral behaviour features" in caplog.text

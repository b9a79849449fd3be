"""Metrics agree with trec_eval (via pytrec_eval) to 1e-6, plus hand-computed float-grade cases."""

from __future__ import annotations

import math
import random

import pytest

from indexing.errors import ConfigError, UnknownNameError
from rerank.datasets.metrics import (
    MetricSpec,
    dcg,
    gain_mapping,
    has_positive_gain,
    judged_at_k,
    map_gains,
    mean_metrics,
    mrr_at_k,
    ndcg_at_k,
    query_metrics,
    recall_at_k,
)

import pytrec_eval  # noqa: E402  (pytrec-eval-terrier, the `test` extra: the reference implementation)


def _fixture(seed: int, n_queries: int = 60):
    """Random integer-graded qrels (0..3) and runs with judged and unjudged documents, distinct scores."""
    rng = random.Random(seed)
    qrels, runs = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        docs = [f"d{i}" for i in range(rng.randint(5, 150))]
        judged = rng.sample(docs, rng.randint(1, len(docs)))
        grades = {d: rng.choice([0, 0, 1, 1, 2, 3]) for d in judged}
        grades[rng.choice(judged)] = rng.choice([1, 2, 3])  # at least one relevant document
        qrels[qid] = grades
        ranking = rng.sample(docs, rng.randint(1, len(docs)))
        runs[qid] = ranking
    return qrels, runs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_trec_eval(seed):
    qrels, runs = _fixture(seed)
    # trec_eval's ndcg uses the qrels value linearly: give it the exponential gain 2^g - 1 (integers here),
    # and relevance_level 1 on that value is exactly our threshold gain >= 1.
    ref_qrels = {q: {d: int(2**g - 1) for d, g in grades.items()} for q, grades in qrels.items()}
    # strictly decreasing scores, so trec_eval's own tie-breaking never matters
    ref_run = {q: {d: float(len(r) - i) for i, d in enumerate(r)} for q, r in runs.items()}
    ref_run10 = {q: {d: float(len(r) - i) for i, d in enumerate(r[:10])} for q, r in runs.items()}
    ev = pytrec_eval.RelevanceEvaluator(ref_qrels, {"ndcg_cut_10", "ndcg_cut_5", "recall_100", "recall_5"}, relevance_level=1)
    ref = ev.evaluate(ref_run)
    ref_rr = pytrec_eval.RelevanceEvaluator(ref_qrels, {"recip_rank"}, relevance_level=1).evaluate(ref_run10)
    for q, ranking in runs.items():
        gains = map_gains(qrels[q], "identity")
        assert ndcg_at_k(ranking, gains, 10) == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-6)
        assert ndcg_at_k(ranking, gains, 5) == pytest.approx(ref[q]["ndcg_cut_5"], abs=1e-6)
        assert recall_at_k(ranking, gains, 100) == pytest.approx(ref[q]["recall_100"], abs=1e-6)
        assert recall_at_k(ranking, gains, 5) == pytest.approx(ref[q]["recall_5"], abs=1e-6)
        assert mrr_at_k(ranking, gains, 10) == pytest.approx(ref_rr[q]["recip_rank"], abs=1e-6)


def test_minus1_mapping_agrees_with_trec_eval_on_shifted_grades():
    qrels, runs = _fixture(7, 30)
    hd = {q: {d: g + 1 for d, g in grades.items()} for q, grades in qrels.items()}  # ratings 1..4
    ref_qrels = {q: {d: int(2**g - 1) for d, g in grades.items()} for q, grades in qrels.items()}
    ref_run = {q: {d: float(len(r) - i) for i, d in enumerate(r)} for q, r in runs.items()}
    ref = pytrec_eval.RelevanceEvaluator(ref_qrels, {"ndcg_cut_10"}).evaluate(ref_run)
    for q, ranking in runs.items():
        assert ndcg_at_k(ranking, map_gains(hd[q], "minus1"), 10) == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-6)


def test_float_grades_hand_computed():
    # Home Depot style mean ratings: gains 2.0, 1.33, 0.0 after minus1; unjudged "x" in position 2
    gains = map_gains({"a": 3.0, "b": 2.33, "c": 1.0}, "minus1")
    assert gains == pytest.approx({"a": 2.0, "b": 1.33, "c": 0.0})
    ranking = ["b", "x", "a", "c"]
    dcg_run = (2**1.33 - 1) / math.log2(2) + 0 + (2**2.0 - 1) / math.log2(4)
    dcg_ideal = (2**2.0 - 1) / math.log2(2) + (2**1.33 - 1) / math.log2(3)
    assert ndcg_at_k(ranking, gains, 10) == pytest.approx(dcg_run / dcg_ideal, abs=1e-9)
    assert ndcg_at_k(ranking, gains, 1) == pytest.approx((2**1.33 - 1) / (2**2.0 - 1), abs=1e-9)
    assert mrr_at_k(ranking, gains, 10) == 1.0
    assert mrr_at_k(["c", "x", "b"], gains, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["c", "x", "b"], gains, 2) == 0.0
    assert recall_at_k(["a", "c"], gains, 100) == 0.5
    assert judged_at_k(ranking, gains, 10) == pytest.approx(3 / 10)
    assert judged_at_k(ranking, gains, 2) == pytest.approx(1 / 2)


def test_edge_cases():
    assert ndcg_at_k(["a"], {"a": 0.0, "b": 0.0}, 10) == 0.0  # no positive gain: 0 by convention
    assert not has_positive_gain({"a": 0.0})
    assert ndcg_at_k([], {"a": 1.0}, 10) == 0.0
    assert recall_at_k(["a"], {}, 10) == 0.0
    # a perfect ranking scores 1; a repeated id counts once
    g = {"a": 2.0, "b": 1.0}
    assert ndcg_at_k(["a", "b"], g, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["b", "b", "a"], g, 10) == pytest.approx(ndcg_at_k(["b", "a"], g, 10))
    assert dcg([]) == 0.0
    with pytest.raises(ConfigError):
        ndcg_at_k(["a"], g, 0)
    with pytest.raises(UnknownNameError, match="identity, minus1"):
        gain_mapping("linear")
    assert gain_mapping("identity")(-1) == 0.0


def test_query_metrics_and_mean():
    spec = MetricSpec()
    rows = [query_metrics(["a", "b"], {"a": 1.0}, spec), query_metrics(["b", "a"], {"a": 1.0}, spec)]
    assert set(rows[0]) == {"ndcg@10", "mrr@10", "recall@100", "judged@10"}
    m = mean_metrics(rows)
    assert m["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert m["recall@100"] == 1.0
    assert mean_metrics([]) == {}

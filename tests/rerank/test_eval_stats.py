"""Intervals and paired tests of the harness (rerank.evaluation.stats, scipy) and their place in the reports (pure, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexing.engines.base import Hit
from indexing.errors import ConfigError
from rerank.evaluation.harness import EvalReport, SystemResult, best_baseline, per_query_metrics, score_runs, with_statistics
from rerank.evaluation.report import format_table
from rerank.evaluation.stats import bootstrap_ci, derive_seed, paired_test
from rerank.evaluation.systems import EvalItem, candidates_for_pool
from rerank.datasets.metrics import MetricSpec
from rerank.retrieval.retriever import FirstStage


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_queries():
    rng = np.random.default_rng(0)
    small, large = rng.random(40), rng.random(1000)
    lo_s, hi_s = bootstrap_ci(small, seed=1)
    lo_l, hi_l = bootstrap_ci(large, seed=1)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3  # width ~ 1/sqrt(n): 25x the queries, ~5x narrower
    # uniform(0, 1): the standard error of a mean of 1000 is 0.289/sqrt(1000) = 0.0091; a 95% interval is ~0.036 wide
    assert 0.025 < hi_l - lo_l < 0.05
    assert bootstrap_ci(large, seed=1) == (lo_l, hi_l)  # seeded: the same interval every time
    assert bootstrap_ci([0.7], seed=1) is None  # one query: no interval
    assert bootstrap_ci([0.5, 0.5, 0.5], seed=1) == (0.5, 0.5)
    lo, hi = bootstrap_ci([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], seed=2)  # few queries: the percentile interval, inside [0, 1]
    assert 0.0 <= lo < 4 / 6 < hi <= 1.0
    with pytest.raises(ConfigError, match="finite"):
        bootstrap_ci([0.1, float("nan")], seed=1)


def test_paired_test_finds_a_real_difference_and_not_a_noise_one():
    rng = np.random.default_rng(3)
    base = rng.random(300)
    better = np.clip(base + 0.03 + rng.normal(0, 0.05, 300), 0, 1)
    t = paired_test(better, base, seed=5)
    assert t.significant and t.better and t.p < 0.001 and t.n == 300
    assert t.diff == pytest.approx(float(np.mean(better - base)))
    assert t.diff_ci95[0] < t.diff < t.diff_ci95[1] and t.diff_ci95[0] > 0
    noise = base + rng.normal(0, 0.05, 300)  # no shift: a difference within noise
    n = paired_test(noise, base, seed=5)
    assert n.p > 0.05 and not n.significant and not n.better
    worse = paired_test(base, better, seed=5)  # the other way round: significant, but not better
    assert worse.significant and not worse.better and worse.diff < 0
    same = paired_test(base, base, seed=5)
    assert same.p == 1.0 and same.diff == 0.0 and not same.significant
    # few queries: the exact test over every swap; 3 queries all +1 is p = 2/8 at best (two-sided)
    assert paired_test([1, 1, 1], [0, 0, 0], seed=1).p == pytest.approx(0.25)
    assert paired_test([1.0], [0.0], seed=1).p is None
    assert paired_test(better, base, seed=5) == t  # seeded
    with pytest.raises(ConfigError, match="same queries"):
        paired_test([1, 0], [1, 0, 1], seed=1)
    assert derive_seed(13, "a", "ndcg@10") == derive_seed(13, "a", "ndcg@10") != derive_seed(13, "b", "ndcg@10")


def _items(n: int) -> list[EvalItem]:
    out = []
    for q in range(n):
        ids = [f"q{q}d{i}" for i in range(4)]
        gains = {ids[0]: 2.0, ids[1]: 1.0, ids[2]: 0.0, ids[3]: 0.0}
        stage = FirstStage(f"query {q}", {"bm25": tuple(Hit(d, 4.0 - i) for i, d in enumerate(ids))}, {})
        out.append(EvalItem(f"q{q}", f"query {q}", None, gains, stage, tuple(ids), candidates_for_pool(stage, ids)))
    return out


def test_per_query_vectors_average_runs_per_query_and_score_runs_is_their_mean():
    items = _items(3)
    good = {it.query_id: list(it.pool) for it in items}  # ideal order
    bad = {it.query_id: list(reversed(it.pool)) for it in items}
    pq = per_query_metrics([good, bad], items, MetricSpec())
    assert pq["mrr@10"].tolist() == pytest.approx([(1.0 + 1 / 3) / 2] * 3)  # the mean over the two runs, per query
    assert pq["ndcg@10"].shape == (3,)
    assert score_runs([good, bad], items, MetricSpec()) == pytest.approx({k: float(v.mean()) for k, v in pq.items()})
    missing = per_query_metrics([{"q0": good["q0"]}], items, MetricSpec())  # a query the run left out scores 0
    assert missing["ndcg@10"].tolist() == pytest.approx([1.0, 0.0, 0.0])


def _result(name: str, ndcg: list[float], mrr: list[float] | None = None) -> SystemResult:
    pq = {"ndcg@10": np.asarray(ndcg), "mrr@10": np.asarray(mrr if mrr is not None else ndcg)}
    return SystemResult(name, {k: float(v.mean()) for k, v in pq.items()}, 1, 0.1, per_query=pq)


def test_every_row_gets_intervals_and_a_test_against_the_best_first_stage_system():
    rng = np.random.default_rng(7)
    base = rng.uniform(0.3, 0.9, 80)
    results = {
        "random": _result("random", list(base - 0.3)),
        "bm25": _result("bm25", list(base - 0.05)),
        "hybrid_rrf": _result("hybrid_rrf", list(base)),
        # trained systems never count as the baseline, however good
        "lambdamart": _result("lambdamart", list(np.clip(base + 0.08, 0, 1))),
        "fusion": _result("fusion", list(base + rng.normal(0, 0.01, 80))),
    }
    assert best_baseline(results) == "hybrid_rrf"
    assert best_baseline({"fusion": results["fusion"], "random": results["random"]}) is None
    out, best = with_statistics(results, seed=13)
    assert best == "hybrid_rrf"
    for name, r in out.items():
        for m in ("ndcg@10", "mrr@10"):
            lo, hi = r.ci95[m]
            assert lo <= r.metrics[m] <= hi, (name, m)
        assert r.vs_best_baseline["system"] == "hybrid_rrf"
    assert out["hybrid_rrf"].vs_best_baseline["is_best_baseline"] and out["hybrid_rrf"].vs_best_baseline["ndcg@10"].p == 1.0
    assert out["lambdamart"].vs_best_baseline["ndcg@10"].better
    assert out["random"].vs_best_baseline["ndcg@10"].significant and out["random"].vs_best_baseline["ndcg@10"].diff == pytest.approx(-0.3)
    assert not out["fusion"].vs_best_baseline["ndcg@10"].significant  # within noise: the report must not call it a win
    again, _ = with_statistics(results, seed=13)
    assert {n: r.ci95 for n, r in again.items()} == {n: r.ci95 for n, r in out.items()}  # reproducible
    # the order the systems ran in does not change any number
    rev, _ = with_statistics(dict(reversed(list(results.items()))), seed=13)
    assert rev["fusion"].vs_best_baseline["ndcg@10"] == out["fusion"].vs_best_baseline["ndcg@10"]

    rep = EvalReport("toy", "rerank", 80, "test", "identity", out, {}, {}, best_baseline=best)
    js = json.loads(json.dumps(rep.to_json()))
    assert js["best_baseline"] == "hybrid_rrf" and js["statistics"]["alpha"] == 0.05 and "permutation_test" in js["statistics"]["test"]
    f = js["systems"]["fusion"]
    assert len(f["ci95"]["ndcg@10"]) == 2 and f["ci95"]["ndcg@10"][0] <= f["ndcg@10"] <= f["ci95"]["ndcg@10"][1]
    vs = f["vs_best_baseline"]
    assert vs["system"] == "hybrid_rrf" and vs["is_best_baseline"] is False
    assert set(vs["ndcg@10"]) == {"diff", "p", "significant", "diff_ci95", "queries"} and vs["ndcg@10"]["queries"] == 80
    assert vs["ndcg@10"]["significant"] is False and 0.05 < vs["ndcg@10"]["p"] <= 1.0
    assert js["systems"]["lambdamart"]["vs_best_baseline"]["mrr@10"]["significant"] is True
    table = format_table(rep)
    assert "95% CI" in table and "(best baseline)" in table and "best baseline (hybrid_rrf)" in table
    lm = next(line for line in table.splitlines() if line.startswith("lambdamart"))
    assert "+0.08" in lm and "*" in lm
    fu = next(line for line in table.splitlines() if line.startswith("fusion "))
    assert "*" not in fu

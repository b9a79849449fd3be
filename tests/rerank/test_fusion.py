"""Score fusion: hand-computed cases, OpenSearch min-max edge cases, ties, missing docs, properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexing.engines.base import Hit
from indexing.errors import UnknownNameError
from rerank.retrieval.fusion import (
    MIN_SCORE,
    FusionInputError,
    ListSignal,
    fuse,
    minmax,
    minmax_normalize,
    ranked_list,
    rrf,
)


def test_rrf_hand_computed_with_missing_doc():
    lists = {"bm25": [("a", 9.0), ("b", 5.0), ("c", 1.0)], "knn": [("c", 0.9), ("a", 0.8)]}
    out = rrf(lists)
    score = {d.id: d.score for d in out}
    assert score["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert score["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert score["b"] == pytest.approx(1 / 62)
    assert [d.id for d in out] == ["a", "c", "b"]
    assert [d.rank for d in out] == [1, 2, 3]
    b = next(d for d in out if d.id == "b")
    assert b.signals["knn"] == ListSignal.absent() and b.signals["knn"].missing
    assert b.signals["bm25"] == ListSignal(5.0, 2, pytest.approx(1 / 62), False)


def test_rrf_ties_broken_by_id_inside_lists_and_in_the_fused_order():
    # equal scores: ranks follow id order, not the engine's order
    out = rrf({"x": [("b", 1.0), ("a", 1.0)]})
    assert [(d.id, d.signals["x"].rank) for d in out] == [("a", 1), ("b", 2)]
    # symmetric lists -> equal fused scores -> id order
    out = rrf({"x": [("b", 2.0), ("a", 1.0)], "y": [("a", 2.0), ("b", 1.0)]})
    assert out[0].score == out[1].score and [d.id for d in out] == ["a", "b"]


def test_minmax_matches_opensearch_normalization():
    assert minmax_normalize([10.0, 5.0, 0.0]) == [1.0, 0.5, MIN_SCORE]
    assert minmax_normalize([3.0, 3.0, 3.0]) == [1.0, 1.0, 1.0]  # all equal
    assert minmax_normalize([7.0]) == [1.0]  # single result
    assert minmax_normalize([]) == []
    # just above the minimum: raised to MIN_SCORE too, so normalization stays monotone
    assert minmax_normalize([1.0, 1e-9, 0.0]) == [1.0, MIN_SCORE, MIN_SCORE]


def test_minmax_weighted_mean_and_missing_policies():
    lists = {"bm25": [("a", 10.0), ("b", 5.0), ("c", 0.0)], "knn": [("b", 0.9), ("d", 0.5)]}
    w = {"bm25": 0.3, "knn": 0.7}
    ex = {d.id: d.score for d in minmax(lists, weights=w, missing="exclude")}
    # exclude: mean over the lists that returned the doc
    assert ex["a"] == pytest.approx(1.0)
    assert ex["b"] == pytest.approx(0.3 * 0.5 + 0.7 * 1.0)
    assert ex["c"] == pytest.approx(MIN_SCORE)
    assert ex["d"] == pytest.approx(MIN_SCORE)
    zero = {d.id: d.score for d in minmax(lists, weights=w, missing="zero")}
    assert {d.id: d.score for d in minmax(lists, weights=w)} == zero  # the default: OpenSearch 2.19's arithmetic_mean
    assert zero["a"] == pytest.approx(0.3)
    assert zero["d"] == pytest.approx(0.7 * MIN_SCORE)
    assert [d.id for d in minmax(lists, weights=w, missing="zero")] == ["b", "a", "d", "c"]


def test_minmax_all_equal_scores_everywhere_orders_by_id():
    out = minmax({"x": [("c", 2.0), ("a", 2.0), ("b", 2.0)]})
    assert [d.id for d in out] == ["a", "b", "c"]
    assert all(d.score == 1.0 for d in out)


def test_accepts_hits_dedups_and_top_n():
    out = fuse("rrf", {"bm25": [Hit("a", 2.0), Hit("a", 3.0), Hit("b", 1.0)]}, top_n=1)
    assert [d.id for d in out] == ["a"] and out[0].signals["bm25"].score == 3.0
    assert ranked_list("l", [(1, 2.0)]) == [("1", 2.0)]  # ids become strings


def test_bad_inputs_raise_precise_errors():
    with pytest.raises(FusionInputError, match="not finite"):
        rrf({"bm25": [("a", float("nan"))]})
    with pytest.raises(FusionInputError, match="sum to 1"):
        minmax({"a": [("x", 1.0)], "b": [("y", 1.0)]}, weights={"a": 0.5, "b": 0.6})
    with pytest.raises(FusionInputError, match="unknown lists"):
        minmax({"a": [("x", 1.0)]}, weights={"a": 1.0, "zz": 0.0})
    with pytest.raises(FusionInputError, match="missing for lists"):
        minmax({"a": [("x", 1.0)], "b": []}, weights={"a": 1.0})
    with pytest.raises(FusionInputError, match="at least one"):
        rrf({})
    with pytest.raises(FusionInputError, match="rank_constant"):
        rrf({"a": []}, rank_constant=0)
    with pytest.raises(FusionInputError, match="missing must be"):
        minmax({"a": []}, missing="drop")
    with pytest.raises(UnknownNameError, match="minmax, rrf"):
        fuse("borda", {"a": []})


# ------------------------------------------------------------------ properties
ids = st.sampled_from([f"p{i}" for i in range(30)])
scores = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
one_list = st.lists(st.tuples(ids, scores), max_size=25)
named_lists = st.dictionaries(st.sampled_from(["bm25", "knn_text", "knn_image"]), one_list, min_size=1, max_size=3)


@settings(max_examples=150, deadline=None)
@given(named_lists, st.sampled_from(["rrf", "minmax_exclude", "minmax_zero"]))
def test_fused_order_is_a_permutation_with_finite_sorted_scores(lists, method):
    if method == "rrf":
        out = rrf(lists)
    else:
        out = minmax(lists, missing=method.split("_")[1])
    all_ids = {str(d) for items in lists.values() for d, _ in items}
    assert sorted(d.id for d in out) == sorted(all_ids)  # every candidate once, nothing invented
    assert [d.rank for d in out] == list(range(1, len(out) + 1))
    assert all(math.isfinite(d.score) for d in out)
    keys = [(-d.score, d.id) for d in out]
    assert keys == sorted(keys)  # score descending, ties by id
    for d in out:
        assert set(d.signals) == set(lists)
        for name, sig in d.signals.items():
            present = any(str(i) == d.id for i, _ in lists[name])
            assert sig.missing is (not present)
            assert (sig.rank is None) is sig.missing
        if method.startswith("minmax"):
            assert 0.0 <= d.score <= 1.0 + 1e-12


@settings(max_examples=100, deadline=None)
@given(one_list)
def test_single_list_fusion_keeps_the_list_order(items):
    canon = [d for d, _ in ranked_list("x", items)]
    assert [d.id for d in rrf({"x": items})] == canon
    # min-max is monotone (not strictly: a score within 0.1% of the range above the minimum ties with the
    # minimum's MIN_SCORE): fused scores never increase along the list order
    fused = {d.id: d.score for d in minmax({"x": items})}
    along = [fused[d] for d in canon]
    assert along == sorted(along, reverse=True)

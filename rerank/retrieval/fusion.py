"""Score fusion of first-stage candidate lists: pure functions (no torch, no I/O).

Every function takes *named lists* (``{"bm25": [...], "knn_text": [...]}``), each a sequence of
``(id, score)`` pairs or objects with ``.id`` and ``.score`` (``indexing.engines.base.Hit``), and
returns :class:`FusedDoc` values that keep every per-list signal (raw score, rank, normalized score,
missing flag) beside the fused score.

Rules, stated once and applied everywhere:

* **Order inside a list** is by score descending, ties broken by id ascending; ranks are 1-based.
  The engine's own tie order is not trusted, so the same scores always give the same ranks.
* **Duplicates** inside one list keep their best score (a list is a set of documents).
* **Non-finite scores** (NaN, +-inf) are refused with :class:`FusionInputError` naming list and id.
* **Final order** is by fused score descending, ties broken by id ascending.
* **Missing from a list**: the document's signal for that list is ``ListSignal.absent()`` (``missing=True``,
  no score, no rank). In ``rrf`` it contributes nothing. In ``minmax`` it depends on ``missing``:
  ``"zero"`` (default; the list contributes 0 with its weight: what OpenSearch 2.19's ``arithmetic_mean``
  combination does, measured on a real node, ``tests/contract/test_hybrid_live.py``) or ``"exclude"`` (the
  weighted mean runs over the lists that returned the document only).
* **minmax normalization** follows OpenSearch's ``min_max`` technique: ``(s - min) / (max - min)``, the
  list's minimum maps to ``MIN_SCORE`` (0.001) rather than 0 so a returned document never scores like a
  missing one, and a list whose scores are all equal (including a one-document list) maps every
  document to ``SINGLE_RESULT_SCORE`` (1.0). One deliberate difference: OpenSearch raises only an exact 0
  to 0.001, so a score a hair above the minimum (normalized to, say, 1e-9) would rank *below* the minimum;
  here every normalized value below 0.001 becomes 0.001, which keeps the normalization monotone.
* **Weights** are per list, non-negative, and must sum to 1 (within 1e-6), as OpenSearch requires;
  ``None`` means equal weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from indexing.errors import ConfigError
from indexing.registry import Registry

RRF_RANK_CONSTANT = 60
MIN_SCORE = 0.001
SINGLE_RESULT_SCORE = 1.0
WEIGHT_SUM_TOLERANCE = 1e-6

MissingPolicy = Literal["exclude", "zero"]


class FusionInputError(ConfigError, ValueError):
    """A candidate list or a fusion parameter is invalid (non-finite score, bad weights, unknown list)."""


@dataclass(frozen=True)
class ListSignal:
    """What one first-stage list says about one document."""

    score: float | None  # raw engine score; None when missing
    rank: int | None  # 1-based rank in that list; None when missing
    normalized: float | None  # min-max normalized score (minmax) or RRF term w/(k+rank) (rrf); None when missing
    missing: bool

    @staticmethod
    def absent() -> "ListSignal":
        return ListSignal(None, None, None, True)


@dataclass(frozen=True)
class FusedDoc:
    """One fused candidate: id, fused score, 1-based fused rank, and every list's signal."""

    id: str
    score: float
    rank: int
    signals: Mapping[str, ListSignal]


ScoredItem = Any  # (id, score) tuple or an object with .id and .score
FusionFn = Callable[..., list[FusedDoc]]

FUSION_METHODS: Registry[list[FusedDoc]] = Registry("fusion method")


# --------------------------------------------------------------------------- helpers
def _pair(item: ScoredItem) -> tuple[str, float]:
    if isinstance(item, tuple) and len(item) == 2:
        doc_id, score = item
    elif hasattr(item, "id") and hasattr(item, "score"):
        doc_id, score = item.id, item.score
    else:
        raise FusionInputError(f"a candidate must be an (id, score) pair or have .id and .score, got {item!r}")
    return str(doc_id), score


def ranked_list(name: str, items: Iterable[ScoredItem]) -> list[tuple[str, float]]:
    """Canonical form of one list: unique ids, finite float scores, sorted by (-score, id)."""
    best: dict[str, float] = {}
    for item in items:
        doc_id, score = _pair(item)
        try:
            s = float(score)
        except (TypeError, ValueError):
            raise FusionInputError(f"list {name!r}: score of {doc_id!r} is not a number: {score!r}") from None
        if not math.isfinite(s):
            raise FusionInputError(f"list {name!r}: score of {doc_id!r} is not finite: {s!r}")
        if doc_id not in best or s > best[doc_id]:
            best[doc_id] = s
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))


def _canonical(lists: Mapping[str, Iterable[ScoredItem]]) -> dict[str, list[tuple[str, float]]]:
    if not lists:
        raise FusionInputError("fusion needs at least one candidate list")
    return {name: ranked_list(name, items) for name, items in lists.items()}


def check_weights(names: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Per-list weights: equal when ``None``; otherwise every list named, non-negative, summing to 1."""
    if weights is None:
        return {n: 1.0 / len(names) for n in names}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise FusionInputError(f"weights name unknown lists {unknown}; lists are {sorted(names)}")
    absent = sorted(set(names) - set(weights))
    if absent:
        raise FusionInputError(f"weights are missing for lists {absent}")
    out: dict[str, float] = {}
    for n in names:
        w = float(weights[n])
        if not math.isfinite(w) or w < 0:
            raise FusionInputError(f"weight of list {n!r} must be a finite number >= 0, got {weights[n]!r}")
        out[n] = w
    total = sum(out.values())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise FusionInputError(f"weights must sum to 1 (as OpenSearch's normalization processor requires), they sum to {total:.6g}")
    return out


def _finish(scores: dict[str, float], signals: dict[str, dict[str, ListSignal]], names: Sequence[str], top_n: int | None) -> list[FusedDoc]:
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise FusionInputError(f"top_n must be a non-negative integer or None, got {top_n!r}")
    order = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    if top_n is not None:
        order = order[:top_n]
    return [
        FusedDoc(
            id=doc_id,
            score=score,
            rank=i + 1,
            signals={n: signals[doc_id].get(n, ListSignal.absent()) for n in names},
        )
        for i, (doc_id, score) in enumerate(order)
    ]


# --------------------------------------------------------------------------- min-max
def minmax_normalize(scores: Sequence[float]) -> list[float]:
    """OpenSearch ``min_max``: ``(s-min)/(max-min)``, values below 0.001 -> 0.001, all-equal -> 1.0."""
    if not scores:
        return []
    lo, hi = min(scores), max(scores)
    if hi == lo:
        return [SINGLE_RESULT_SCORE] * len(scores)
    span = hi - lo
    if not math.isfinite(span):  # scores near +-1.8e308: the span overflows; halve everything first (same ratios)
        lo, span = lo / 2, hi / 2 - lo / 2
        scores = [s / 2 for s in scores]
    out = []
    for s in scores:
        v = min((s - lo) / span, 1.0)
        out.append(max(v, MIN_SCORE))
    return out


@FUSION_METHODS.register("minmax")
def minmax(
    lists: Mapping[str, Iterable[ScoredItem]],
    *,
    weights: Mapping[str, float] | None = None,
    missing: MissingPolicy = "zero",
    top_n: int | None = None,
) -> list[FusedDoc]:
    """Per-query min-max normalization of each list, then a weighted arithmetic mean.

    ``missing="zero"`` (OpenSearch 2.19's ``arithmetic_mean``, checked on a node): ``sum(w_l * n_l)`` over all
    lists, a missing document contributing 0 (weights sum to 1, so this is a weighted mean with missing = 0);
    ``missing="exclude"``: ``sum(w_l * n_l) / sum(w_l)`` over the lists that returned the document.
    """
    if missing not in ("exclude", "zero"):
        raise FusionInputError(f"missing must be 'exclude' or 'zero', got {missing!r}")
    canon = _canonical(lists)
    names = list(canon)
    w = check_weights(names, weights)
    signals: dict[str, dict[str, ListSignal]] = {}
    for name, items in canon.items():
        norm = minmax_normalize([s for _, s in items])
        for rank, ((doc_id, s), n) in enumerate(zip(items, norm), start=1):
            signals.setdefault(doc_id, {})[name] = ListSignal(s, rank, n, False)
    scores: dict[str, float] = {}
    for doc_id, per in signals.items():
        num = sum(w[n] * per[n].normalized for n in sorted(per))  # type: ignore[operator]  (canonical order, as in rrf)
        if missing == "exclude":
            den = sum(w[n] for n in sorted(per))
            scores[doc_id] = num / den if den > 0 else 0.0
        else:
            scores[doc_id] = num
    return _finish(scores, signals, names, top_n)


# --------------------------------------------------------------------------- reciprocal rank fusion
@FUSION_METHODS.register("rrf")
def rrf(
    lists: Mapping[str, Iterable[ScoredItem]],
    *,
    rank_constant: int = RRF_RANK_CONSTANT,
    weights: Mapping[str, float] | None = None,
    top_n: int | None = None,
) -> list[FusedDoc]:
    """Reciprocal rank fusion: ``score(d) = sum_l w_l / (rank_constant + rank_l(d))``.

    With ``weights=None`` every list has weight 1 (the classic RRF of Cormack et al. 2009); given
    weights must sum to 1 (then the scores are the weighted version, the order is the same as classic
    RRF when the weights are equal). A document missing from a list gets no term from it.
    """
    if isinstance(rank_constant, bool) or not isinstance(rank_constant, int) or rank_constant < 1:
        raise FusionInputError(f"rank_constant must be an integer >= 1, got {rank_constant!r}")
    canon = _canonical(lists)
    names = list(canon)
    w = {n: 1.0 for n in names} if weights is None else check_weights(names, weights)
    signals: dict[str, dict[str, ListSignal]] = {}
    scores: dict[str, float] = {}
    for name in sorted(canon):  # one summation order whatever the lists' order: float sums then tie the same way
        for rank, (doc_id, s) in enumerate(canon[name], start=1):
            term = w[name] / (rank_constant + rank)
            signals.setdefault(doc_id, {})[name] = ListSignal(s, rank, term, False)
            scores[doc_id] = scores.get(doc_id, 0.0) + term
    return _finish(scores, signals, names, top_n)


def fuse(method: str, lists: Mapping[str, Iterable[ScoredItem]], **kwargs: Any) -> list[FusedDoc]:
    """Fuse with the method registered as ``method`` (``rrf`` | ``minmax``)."""
    return FUSION_METHODS.create(method, lists, **kwargs)


__all__ = [
    "FUSION_METHODS",
    "FusedDoc",
    "FusionInputError",
    "ListSignal",
    "MIN_SCORE",
    "RRF_RANK_CONSTANT",
    "SINGLE_RESULT_SCORE",
    "check_weights",
    "fuse",
    "minmax",
    "minmax_normalize",
    "ranked_list",
    "rrf",
]

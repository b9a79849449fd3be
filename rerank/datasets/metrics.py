"""Ranking metrics: NDCG@k (exponential gain), MRR@k, Recall@k, judged@k. Pure Python, no I/O.

Conventions (stated, and checked against trec_eval through ``pytrec_eval`` in the tests):

* **Grades -> gains.** Judgments carry *grades* (int or float). A gain mapping turns a grade into a
  non-negative *gain* ``g``: ``identity`` (``g = grade``; fashion benchmark, grades 0/1/2) or ``minus1``
  (``g = grade - 1``; Home Depot / CrowdFlower ratings 1..3, so 1.0 = irrelevant). Negative results are
  clipped to 0. Unjudged documents have gain 0.
* **NDCG@k** uses the exponential gain ``2**g - 1`` and the discount ``1/log2(rank + 1)``; the ideal DCG
  is computed from *all* judged gains of the query (not only the retrieved ones), as trec_eval does.
  A query whose ideal DCG is 0 (no positive gain) scores 0 here; the harness leaves such queries out
  and says how many.
* **Binary relevance** for MRR and Recall: a document is relevant when its gain is >= ``threshold``
  (default 1.0: grade >= 1 with ``identity``, rating >= 2 "partly relevant" with ``minus1``), the
  analogue of trec_eval's ``relevance_level``.
* **MRR@k** = 1/rank of the first relevant document in the top k (0 if none).
* **Recall@k** = relevant documents in the top k / all relevant documents of the query (0 if none).
* **judged@k** = fraction of the top k positions that hold a judged document (denominator k, as
  ir_measures' ``Judged@k``); tells how far an NDCG in retrieve mode can be trusted.

Diversity of a list (no judgments needed):

* **ild@k** (intra-list diversity) = the mean over the pairs of the top k of ``1 - similarity``, the similarity of
  :func:`rerank.diversity.similarity_matrix` (the mean of the text and photo cosines, clipped to [0, 1]; a
  product without vectors is at distance 1 from every other). 0 for fewer than two documents.
* **distinct@k** of a field = the number of distinct non-empty values of that field among the top k (documents
  without a value are not counted: "where present").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from indexing.errors import ConfigError
from indexing.registry import Registry

DEFAULT_REL_THRESHOLD = 1.0

GainFn = Callable[[float], float]
GAIN_MAPPINGS: Registry[float] = Registry("gain mapping")


@GAIN_MAPPINGS.register("identity")
def gain_identity(grade: float) -> float:
    """Fashion benchmark: grade 0/1/2 is the gain (negative grades clip to 0)."""
    return max(float(grade), 0.0)


@GAIN_MAPPINGS.register("minus1")
def gain_minus1(grade: float) -> float:
    """Home Depot / CrowdFlower: mean rating 1..3 -> gain 0..2 (1.0 = irrelevant)."""
    return max(float(grade) - 1.0, 0.0)


GAIN_DESCRIPTIONS = {
    "identity": "gain = grade (clipped at 0); NDCG term 2^gain - 1",
    "minus1": "gain = grade - 1 (clipped at 0); NDCG term 2^gain - 1",
}


def gain_mapping(name: str) -> GainFn:
    """The gain function registered as ``name`` (``identity`` | ``minus1``)."""
    return GAIN_MAPPINGS.get(name)


def map_gains(grades: Mapping[str, float], mapping: str | GainFn) -> dict[str, float]:
    """Apply a gain mapping to one query's ``{doc_id: grade}``."""
    fn = gain_mapping(mapping) if isinstance(mapping, str) else mapping
    out = {}
    for d, g in grades.items():
        v = fn(g)
        if not math.isfinite(v):
            raise ConfigError(f"grade of {d!r} maps to a non-finite gain: {g!r}")
        out[str(d)] = v
    return out


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"cutoff k must be an integer >= 1, got {k!r}")
    return k


def _top(ranking: Sequence[str], k: int) -> list[str]:
    """The first k distinct ids (a repeated id counts once, at its first position)."""
    seen: set[str] = set()
    out: list[str] = []
    for d in ranking:
        d = str(d)
        if d in seen:
            continue
        seen.add(d)
        out.append(d)
        if len(out) == k:
            break
    return out


def dcg(gains_in_order: Iterable[float]) -> float:
    """``sum_i (2**g_i - 1) / log2(i + 1)`` over 1-based positions i."""
    return sum((2.0**g - 1.0) / math.log2(i + 1) for i, g in enumerate(gains_in_order, start=1))


def ndcg_at_k(ranking: Sequence[str], gains: Mapping[str, float], k: int = 10) -> float:
    """NDCG@k with exponential gain; ``gains`` are mapped gains (``map_gains``); unjudged = 0."""
    k = _check_k(k)
    ideal = dcg(sorted((g for g in gains.values() if g > 0), reverse=True)[:k])
    if ideal <= 0:
        return 0.0
    return dcg(gains.get(d, 0.0) for d in _top(ranking, k)) / ideal


def mrr_at_k(ranking: Sequence[str], gains: Mapping[str, float], k: int = 10, *, threshold: float = DEFAULT_REL_THRESHOLD) -> float:
    k = _check_k(k)
    for i, d in enumerate(_top(ranking, k), start=1):
        if gains.get(d, 0.0) >= threshold:
            return 1.0 / i
    return 0.0


def recall_at_k(ranking: Sequence[str], gains: Mapping[str, float], k: int = 100, *, threshold: float = DEFAULT_REL_THRESHOLD) -> float:
    k = _check_k(k)
    relevant = {d for d, g in gains.items() if g >= threshold}
    if not relevant:
        return 0.0
    return sum(1 for d in _top(ranking, k) if d in relevant) / len(relevant)


def judged_at_k(ranking: Sequence[str], judged: Iterable[str], k: int = 10) -> float:
    k = _check_k(k)
    judged = set(judged)
    return sum(1 for d in _top(ranking, k) if d in judged) / k


def distinct_at_k(ranking: Sequence[str], values: Mapping[str, Any], k: int = 10) -> int:
    """Distinct non-empty values among the first k distinct ids (``values[id]``; ids without one are not counted)."""
    k = _check_k(k)
    seen = set()
    for d in _top(ranking, k):
        v = values.get(d)
        if isinstance(v, str):
            v = v.strip().lower()
        if v not in (None, ""):
            seen.add(v)
    return len(seen)


def ild_at_k(ranking: Sequence[str], text: Mapping[str, Any], image: Mapping[str, Any] | None = None, k: int = 10, *,
             text_weight: float = 0.5, image_weight: float = 0.5) -> float:
    """Intra-list diversity of the first k distinct ids: mean pairwise ``1 - similarity`` (see the module doc);
    ``text[id]`` / ``image[id]``: the product's vectors (absent: None or missing)."""
    import numpy as np

    from rerank.diversity import intra_list_distance, similarity_matrix

    k = _check_k(k)
    top = _top(ranking, k)
    if len(top) < 2:
        return 0.0

    def rows(vecs: Mapping[str, Any] | None) -> tuple[np.ndarray | None, np.ndarray]:
        got = [None if vecs is None else vecs.get(d) for d in top]
        dim = next((len(v) for v in got if v is not None), 0)
        if not dim:
            return None, np.zeros(len(top), dtype=bool)
        mat = np.zeros((len(top), dim), dtype=np.float32)
        mask = np.zeros(len(top), dtype=bool)
        for i, v in enumerate(got):
            if v is not None and len(v) == dim:
                mat[i], mask[i] = v, True
        return mat, mask

    t, tm = rows(text)
    im, imm = rows(image)
    if t is None and im is None:
        return 1.0  # no vectors at all: every pair maximally dissimilar
    if t is None:
        t, tm, text_weight = np.zeros((len(top), 1), dtype=np.float32), np.zeros(len(top), dtype=bool), 0.0
    return intra_list_distance(similarity_matrix(t, tm, im, imm, text_weight=text_weight, image_weight=image_weight if im is not None else 0.0))


def has_positive_gain(gains: Mapping[str, float]) -> bool:
    """Whether NDCG is defined for the query (some judged document has gain > 0)."""
    return any(g > 0 for g in gains.values())


@dataclass(frozen=True)
class MetricSpec:
    """Which cutoffs a report uses (the harness's defaults: NDCG@10, MRR@10, Recall@100, judged@10)."""

    ndcg_k: int = 10
    mrr_k: int = 10
    recall_k: int = 100
    judged_k: int = 10
    threshold: float = DEFAULT_REL_THRESHOLD

    def names(self) -> list[str]:
        return [f"ndcg@{self.ndcg_k}", f"mrr@{self.mrr_k}", f"recall@{self.recall_k}", f"judged@{self.judged_k}"]


def query_metrics(ranking: Sequence[str], gains: Mapping[str, float], spec: MetricSpec = MetricSpec()) -> dict[str, float]:
    """Every metric of ``spec`` for one query; judged@k counts ids present in ``gains`` (the qrels)."""
    return {
        f"ndcg@{spec.ndcg_k}": ndcg_at_k(ranking, gains, spec.ndcg_k),
        f"mrr@{spec.mrr_k}": mrr_at_k(ranking, gains, spec.mrr_k, threshold=spec.threshold),
        f"recall@{spec.recall_k}": recall_at_k(ranking, gains, spec.recall_k, threshold=spec.threshold),
        f"judged@{spec.judged_k}": judged_at_k(ranking, gains.keys(), spec.judged_k),
    }


def mean_metrics(per_query: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Arithmetic mean of each metric over queries (empty input -> empty dict)."""
    rows = list(per_query)
    if not rows:
        return {}
    keys = list(rows[0])
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


__all__ = [
    "DEFAULT_REL_THRESHOLD",
    "GAIN_DESCRIPTIONS",
    "GAIN_MAPPINGS",
    "MetricSpec",
    "dcg",
    "distinct_at_k",
    "gain_mapping",
    "has_positive_gain",
    "ild_at_k",
    "judged_at_k",
    "map_gains",
    "mean_metrics",
    "mrr_at_k",
    "ndcg_at_k",
    "query_metrics",
    "recall_at_k",
]

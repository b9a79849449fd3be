"""First-stage feature vectors of candidates: pure functions (numpy only; no torch, no I/O).

Used by the LambdaMART baseline and meant for the fusion model too. Per candidate and per list
``l`` in :data:`rerank.retrieval.retriever.LISTS` (``bm25``, ``knn_text``, ``knn_image``), in this order:

* ``<l>_score``: the raw engine score (0 when missing);
* ``<l>_norm``: the score min-max normalized *within the query's list* (OpenSearch rule: minimum ->
  0.001, all-equal -> 1.0; 0 when missing), so BM25's unbounded scale is comparable across queries;
* ``<l>_rr``: reciprocal rank ``1/rank`` in that list (0 when missing);
* ``<l>_missing``: 1.0 when the candidate is not in that list (or the list did not run), else 0.0;

then ``lists_present`` (how many lists returned the candidate). A missing value is never silently
zero-filled: its ``_missing`` flag says so, and models can mask on it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rerank.retrieval.fusion import minmax_normalize
from rerank.retrieval.retriever import LISTS, Candidate

PER_LIST = ("score", "norm", "rr", "missing")


def feature_names(lists: Sequence[str] = LISTS) -> list[str]:
    return [f"{l}_{p}" for l in lists for p in PER_LIST] + ["lists_present"]


def first_stage_features(candidates: Sequence[Candidate], lists: Sequence[str] = LISTS) -> np.ndarray:
    """``(n_candidates, len(feature_names(lists)))`` float32 matrix for one query's candidates."""
    n = len(candidates)
    names = feature_names(lists)
    out = np.zeros((n, len(names)), dtype=np.float32)
    if n == 0:
        return out
    for j, l in enumerate(lists):
        base = j * len(PER_LIST)
        present, raw, rr = [], [], []
        for i, c in enumerate(candidates):  # one pass per list; the columns are written once each (not per cell)
            sig = c.signals.get(l)
            if sig is not None and not sig.missing:
                present.append(i)
                raw.append(float(sig.score))  # type: ignore[arg-type]
                rr.append(1.0 / sig.rank if sig.rank else 0.0)
        out[:, base + 3] = 1.0
        if present:
            at = np.asarray(present, dtype=np.intp)
            out[at, base + 0] = raw
            out[at, base + 1] = minmax_normalize(raw)
            out[at, base + 2] = rr
            out[at, base + 3] = 0.0
    out[:, -1] = len(lists) - out[:, [j * len(PER_LIST) + 3 for j in range(len(lists))]].sum(axis=1)
    return out


__all__ = ["PER_LIST", "feature_names", "first_stage_features"]

"""The retraining loop's library half: which searches a candidate may learn from, how it is judged against the
serving model on behaviour neither learned from, and the promotion rule. No settings, no I/O beyond the files
:func:`write_judgments` writes; :mod:`workers.retrain` composes it with the store, the trainer and the registry.

**Held-out behaviour.** A query text belongs to the held-out part when a salted hash of its normalised text falls
below ``holdout`` (:func:`is_heldout`). The split is by query, never by search, and it is the same in every
retraining: no model the loop trains ever learns from a held-out query's searches, so the serving model (trained by
an earlier run) and the candidate are judged on behaviour that neither saw.

**The estimate.** The click model (PBM by EM, with spam capping: :func:`rerank.datasets.ubi_judgments.judgments_from_sessions`)
is fitted on the held-out searches alone; its implicit judgments (0..2: debiased clicks per examination, shrunk at the
validation prior :data:`rerank.datasets.ubi_judgments.VALIDATION_PRIOR_STRENGTH`, as the candidate's own verdict reads
its validation queries) are the gains. Each model then answers every held-out query as the service would (``search(query) -> ids``: retrieval over
the whole index, then its rerank) and is scored by NDCG@10 against those gains; products the log never showed for
the query count as irrelevant, for both models alike. With qrels supplied, the same is done on them.

**The rule** (:func:`decide`): promote only when the candidate's mean NDCG@10 on the held-out log beats the serving
model's by at least ``margin`` and, where qrels were given, by at least ``margin`` there too. With no model serving,
the candidate is measured against the first-stage order (the ``noop`` reranker).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rerank.datasets import clicks as C
from rerank.datasets.metrics import ndcg_at_k

SALT = "fusionrank-retrain-holdout-v1"


def is_heldout(query: str, holdout: float) -> bool:
    """Whether the (normalised) query text is in the held-out part of the log (a stable hash split by query)."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")
    h = int.from_bytes(hashlib.sha256(f"{SALT}:{C.normalize_query(query)}".encode()).digest()[:8], "big")
    return h / 2**64 < holdout


def split_sessions_by_query(sessions: Sequence[C.Session], holdout: float) -> tuple[list[C.Session], list[C.Session]]:
    """``(train, held_out)`` sessions of the log (:func:`is_heldout` on each one's query)."""
    train, held = [], []
    for s in sessions:
        (held if is_heldout(s.query, holdout) else train).append(s)
    return train, held


def write_judgments(judgments: Mapping[str, Mapping[str, float]], texts: Mapping[str, str], out: Path) -> tuple[Path, Path]:
    """Write ``queries.tsv`` and ``qrels.tsv`` (the harness's and the trainer's formats) of implicit judgments
    ``{normalised query: {product: grade}}`` under ``out``; ``(queries, qrels)``."""
    from rerank.datasets.ubi_judgments import write_qrels, write_queries

    out.mkdir(parents=True, exist_ok=True)
    qf, rf = out / "queries.tsv", out / "qrels.tsv"
    write_queries(qf, judgments, texts)
    write_qrels(rf, judgments)
    return qf, rf


@dataclass(frozen=True)
class Estimate:
    """Mean NDCG@10 of one model over the judged queries (those with a positive gain), with the per-query values."""

    ndcg: float
    queries: int
    per_query: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"ndcg@10": round(self.ndcg, 4), "queries": self.queries}


def estimate(search: Callable[[str], Sequence[str]], judgments: Mapping[str, Mapping[str, float]], *, k: int = 10) -> Estimate:
    """NDCG@k of ``search(query_text) -> ranked product ids`` against ``{query text: {product: gain}}``; queries
    without a positive gain are left out (nothing to find)."""
    per: dict[str, float] = {}
    for q in sorted(judgments):
        gains = {d: float(g) for d, g in judgments[q].items()}
        if not any(g > 0 for g in gains.values()):
            continue
        per[q] = ndcg_at_k(list(search(q)), gains, k)
    mean = sum(per.values()) / len(per) if per else 0.0
    return Estimate(mean, len(per), per)


def paired(candidate: Estimate, serving: Estimate) -> dict[str, Any]:
    """The candidate minus the serving model on the queries both were scored on: mean difference, wins and losses."""
    qs = sorted(set(candidate.per_query) & set(serving.per_query))
    diffs = [candidate.per_query[q] - serving.per_query[q] for q in qs]
    return {"diff": round(sum(diffs) / len(diffs), 4) if diffs else 0.0, "queries": len(qs),
            "better": sum(d > 1e-9 for d in diffs), "worse": sum(d < -1e-9 for d in diffs)}


def decide(comparisons: Mapping[str, Mapping[str, Any]], margin: float) -> tuple[bool, str]:
    """``(promote, why)``: every comparison (``log``, and ``qrels`` when given) must show a mean gain >= ``margin``
    over at least one query."""
    if "log" not in comparisons:
        raise ValueError("decide needs the held-out log comparison")
    reasons = []
    ok = True
    for name, c in comparisons.items():
        if c["queries"] == 0:
            ok = False
            reasons.append(f"{name}: no judged query to compare on")
            continue
        passed = c["diff"] >= margin
        ok = ok and passed
        reasons.append(f"{name}: NDCG@10 {c['diff']:+.4f} on {c['queries']} queries ({c['better']} better, {c['worse']} worse) "
                       f"{'>=' if passed else '<'} margin {margin:+.4f}")
    return ok, "; ".join(reasons)


__all__ = ["Estimate", "SALT", "decide", "estimate", "is_heldout", "paired", "split_sessions_by_query", "write_judgments"]

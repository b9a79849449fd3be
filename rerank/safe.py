"""The safe choice: what a fusion artifact serves when training could not show that its model beats the first stage.

A reranker must never make search worse than the order it reorders. :func:`decide_serving` runs when
``rerank.training.ranker`` has fitted a model: on the validation queries it compares the model with every first-stage signal
(:data:`SIGNALS`) by a paired randomization test over queries (:func:`rerank.evaluation.stats.paired_test`). When
the model beats the best signal (by NDCG@10) significantly (p < 0.05, mean difference > 0) *and* no signal has a
significantly better MRR@10 (the model must not put a non-relevant product first more often than the first stage
does), the artifact serves the model; otherwise it serves the **safe choice**: the best signal's own order. The decision and its numbers go into the
artifact's ``config.json`` (``"serving"``), the training report, every response's ``fusionrank`` block and the
harness's report.

The signals are read from what every rerank call has, its :class:`~rerank.model.inputs.RequestFeatures` (rows in
the order the call received the candidates), so the safe choice is served from the same inputs in
:meth:`rerank.reranker.Reranker.rerank` (hits given by the caller), :meth:`~rerank.reranker.Reranker.search`
(the hybrid retrieval), the service and the harness:

* ``first_stage``: the order the call received: the hybrid RRF fusion in ``search``, the harness and training
  (``hybrid_rrf`` there), the caller's own order in ``rerank`` (e.g. its BM25 order);
* ``bm25``: the BM25 list's score where the candidate is in the list (the caller's scores in ``rerank``);
* ``knn_text``: the cosine of the query's and the candidate's text vectors (the ``knn_text`` list's similarity);
* ``knn_image``: the cosine of the query vector and the candidate's *aligned* photo vector (the model's own image
  input; the ``knn_image`` list searches the raw photo space, so this is its approximation), with a photo.

A candidate a signal knows nothing about (no photo, not in the BM25 list) goes below every candidate it knows;
ties go by id, as the model's scores do. Pure numpy, no torch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from indexing.errors import ConfigError
from rerank.retrieval.signals import PER_LIST
from rerank.retrieval.retriever import BM25

SIGNALS: tuple[str, ...] = ("first_stage", "bm25", "knn_text", "knn_image")
#: the harness's system of the same order (what the verdict's numbers are comparable with)
BASELINE_OF = {"first_stage": "hybrid_rrf", "bm25": "bm25", "knn_text": "knn_text", "knn_image": "knn_image"}
MODEL, SAFE_CHOICE = "model", "safe_choice"
POLICIES = (MODEL, SAFE_CHOICE)


def _cosine(q: np.ndarray, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    rows = np.asarray(rows, dtype=np.float64)
    qn = float(np.linalg.norm(q))
    rn = np.linalg.norm(rows, axis=1)
    ok = np.asarray(mask, dtype=bool) & (rn > 0) & (qn > 0)
    out = np.full(len(rows), np.nan)
    out[ok] = rows[ok] @ q / (rn[ok] * qn)
    return out


def available_signals(features: Any, lists: Sequence[str]) -> tuple[str, ...]:
    """The signals a request's features can give (``knn_image`` needs a model with photo inputs; ``bm25`` a spec
    with the BM25 list)."""
    out = ["first_stage", "knn_text"]
    if BM25 in lists:
        out.insert(1, "bm25")
    if getattr(features, "cand_image", None) is not None and features.cand_image.shape[-1] == features.cand_text.shape[-1] \
            and bool(np.asarray(features.cand_image_mask).any()):
        out.append("knn_image")
    return tuple(s for s in SIGNALS if s in out)


def signal_scores(signal: str, features: Any, lists: Sequence[str]) -> np.ndarray:
    """``(N,)`` float64 scores of the request's candidates by ``signal`` (higher is better; see the module doc).
    ``lists``: the feature spec's first-stage lists (where the BM25 columns are)."""
    if signal not in SIGNALS:
        raise ConfigError(f"unknown safe-choice signal {signal!r}; valid: {', '.join(SIGNALS)}")
    n = len(features.ids)
    if signal == "first_stage":
        return -np.arange(n, dtype=np.float64)
    if signal == "bm25":
        if BM25 not in lists:
            raise ConfigError(f"the signal bm25 needs the bm25 list among the model's first-stage lists, got {list(lists)}")
        col = list(lists).index(BM25) * len(PER_LIST)
        fs = np.asarray(features.first_stage, dtype=np.float64)
        raw = fs[:, col].copy()
        raw[fs[:, col + 3] > 0.5] = np.nan  # the missing flag
    elif signal == "knn_text":
        raw = _cosine(features.query, features.cand_text, features.cand_text_mask)
    else:
        if features.cand_image.shape[-1] != features.cand_text.shape[-1]:
            raise ConfigError("the signal knn_image needs aligned photo vectors (a model trained with photos)")
        raw = _cosine(features.query, features.cand_image, features.cand_image_mask)
    known = ~np.isnan(raw)
    floor = (float(raw[known].min()) if known.any() else 0.0) - 1.0
    return np.where(known, raw, floor)


def order(ids: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Ids by score descending, ties by id (the order every ranker of this project uses)."""
    return [d for _, d in sorted(zip((-np.asarray(scores, dtype=np.float64)).tolist(), ids))]


def serving_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """An artifact's ``serving`` block, checked; an artifact trained before the verdict existed serves its model and
    says that it was never tested."""
    sv = config.get("serving")
    if sv is None:
        return {"policy": MODEL, "signal": None, "verdict": None,
                "reason": "the artifact was trained before training compared the model with the first stage: not tested"}
    if not isinstance(sv, Mapping) or sv.get("policy") not in POLICIES:
        raise ConfigError(f"artifact serving block {sv!r}: policy must be one of {', '.join(POLICIES)}")
    if sv["policy"] == SAFE_CHOICE and sv.get("signal") not in SIGNALS:
        raise ConfigError(f"artifact serving block: the safe choice names signal {sv.get('signal')!r}; valid: {', '.join(SIGNALS)}")
    return dict(sv)


def response_block(serving: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The short form for a response's ``fusionrank`` block: policy, signal and one line of why."""
    if serving is None:
        return None
    verdict = serving.get("verdict") or {}
    return {"policy": serving.get("policy"), "signal": serving.get("signal"), "reason": verdict.get("summary") or serving.get("reason")}


def decide_serving(model_scores: Sequence[tuple[Sequence[str], np.ndarray, Mapping[str, float], Any]], lists: Sequence[str], *,
                   seed: int, alpha: float = 0.05) -> dict[str, Any]:
    """The verdict on the validation queries and what the artifact serves.

    ``model_scores``: one ``(candidate ids, the model's scores, every judged gain, RequestFeatures)`` per validation
    query. Every available signal is scored on the same queries (NDCG@10, ideal DCG from every judged gain); the
    model is tested against each with :func:`rerank.evaluation.stats.paired_test`. Returns the artifact's
    ``serving`` block: ``{"policy", "signal", "verdict": {...}}``."""
    from rerank.evaluation.stats import TEST_METHOD, derive_seed, paired_test
    from rerank.datasets.metrics import DEFAULT_REL_THRESHOLD, mrr_at_k, ndcg_at_k

    if not model_scores:
        return {"policy": SAFE_CHOICE, "signal": "first_stage",
                "verdict": {"validation_queries": 0, "model_ndcg@10": None, "baselines": {}, "best_signal": "first_stage",
                            "model_beats_best": False, "test": TEST_METHOD,
                            "summary": "no validation query: the model could not be compared with the first stage; serving the first-stage order"}}
    have = {s for _, _, _, f in model_scores for s in available_signals(f, lists)}
    signals = [s for s in SIGNALS if s in have]
    def metrics(ids: Sequence[str], scores: Any, gains: Mapping[str, float]) -> tuple[float, float]:
        o = order(ids, scores)
        return ndcg_at_k(o, gains, 10), mrr_at_k(o, gains, 10, threshold=DEFAULT_REL_THRESHOLD)

    model_m = np.array([metrics(ids, sc, gains) for ids, sc, gains, _ in model_scores]).reshape(-1, 2)
    sig_m = {s: np.array([metrics(ids, signal_scores(s, f, lists), gains) for ids, _, gains, f in model_scores]).reshape(-1, 2) for s in signals}
    model_v, sig_v = model_m[:, 0], {s: v[:, 0] for s, v in sig_m.items()}
    best = min(signals, key=lambda s: (-float(sig_v[s].mean()), SIGNALS.index(s)))
    baselines = {}
    for s in signals:
        t = paired_test(model_v, sig_v[s], seed=derive_seed(seed, "verdict", s), alpha=alpha)
        tm = paired_test(model_m[:, 1], sig_m[s][:, 1], seed=derive_seed(seed, "verdict-mrr", s), alpha=alpha)
        baselines[s] = {"system": BASELINE_OF[s], "ndcg@10": round(float(sig_v[s].mean()), 6), "model_vs": t.to_dict(),
                        "model_better": t.better, "mrr@10": round(float(sig_m[s][:, 1].mean()), 6), "model_vs_mrr": tm.to_dict(),
                        "model_worse_mrr": tm.significant and tm.diff < 0}
    bt = baselines[best]["model_vs"]
    beats = bool(baselines[best]["model_better"])
    # never lose what the first stage gets right: a model significantly worse at the first relevant hit than any signal
    # (MRR@10: a product of the asked type first) is not served, whatever its NDCG@10
    mrr_losses = [s for s in signals if baselines[s]["model_worse_mrr"]]
    n = len(model_scores)
    p = "n/a" if bt["p"] is None else f"{bt['p']:.4g}"
    if beats and not mrr_losses:
        summary = (f"the model beats the best first-stage signal {best} on {n} validation queries: NDCG@10 {model_v.mean():.4f} vs "
                   f"{sig_v[best].mean():.4f} ({bt['diff']:+.4f}, p {p}), and no signal has a significantly better MRR@10; serving the model")
    elif beats:
        worst = min(mrr_losses, key=lambda s: baselines[s]["model_vs_mrr"]["diff"])
        tm = baselines[worst]["model_vs_mrr"]
        summary = (f"the model beats the best first-stage signal {best} on NDCG@10 on {n} validation queries ({model_v.mean():.4f} vs "
                   f"{sig_v[best].mean():.4f}, {bt['diff']:+.4f}, p {p}) but its MRR@10 is significantly below "
                   f"{', '.join(mrr_losses)}'s ({worst}: {tm['diff']:+.4f}, p {tm['p']:.4g}): it puts a non-relevant product first more "
                   f"often than the first stage; serving the safe choice, {best}'s order")
    else:
        summary = (f"the model does not beat the best first-stage signal {best} significantly on {n} validation queries: NDCG@10 "
                   f"{model_v.mean():.4f} vs {sig_v[best].mean():.4f} ({bt['diff']:+.4f}, p {p}, alpha {alpha}); serving the safe "
                   f"choice, {best}'s order")
    served = beats and not mrr_losses
    return {
        "policy": MODEL if served else SAFE_CHOICE,
        "signal": None if served else best,
        "verdict": {"validation_queries": n, "model_ndcg@10": round(float(model_v.mean()), 6), "model_mrr@10": round(float(model_m[:, 1].mean()), 6),
                    "baselines": baselines, "best_signal": best, "model_beats_best": beats, "model_worse_mrr_than": mrr_losses,
                    "alpha": alpha, "test": TEST_METHOD, "summary": summary},
    }


__all__ = ["BASELINE_OF", "MODEL", "POLICIES", "SAFE_CHOICE", "SIGNALS", "available_signals", "decide_serving", "order", "response_block",
           "serving_of", "signal_scores"]

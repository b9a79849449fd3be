"""Does OpenSearch's own hybrid fusion (a search pipeline) give the order fusionrank's client-side fusion gives?

``fusionrank eval --engine opensearch`` runs this on the evaluated queries: for each query, the hybrid query of
:func:`rerank.retrieval.opensearch_bodies.hybrid_search_body` (BM25 + kNN on the text vector, ``per_list`` hits each) is
searched through a min-max pipeline (:func:`~rerank.retrieval.opensearch_bodies.normalization_pipeline_body`) and an RRF
pipeline (:func:`~rerank.retrieval.opensearch_bodies.rrf_pipeline_body`), and the top ``k`` ids are compared with
:func:`rerank.retrieval.retriever.fuse_first_stage` over the same query's ``bm25`` and ``knn_text`` lists (the harness's own
first stage on the same cluster). Both pipelines are created under random names and deleted afterwards.

The report per method: ``queries``, ``same_top_k`` (queries whose top ``k`` ids come back in the same order),
``overlap_at_k`` (mean share of the top ``k`` ids both hold), and ``first_differences`` (up to 5 queries that differ,
with both orders). OpenSearch keeps fused scores as float32, so two candidates whose fused scores differ by less
than float32's resolution may come back in either order; ``near_ties`` counts the differing queries where that
explains the first difference.

RRF reads ranks, and inside one list fusionrank ranks equal scores by id (the same ranks on every engine) while
OpenSearch ranks them in its internal document order. Product titles tie often in BM25 (every fashion dev query
had ties in its top 50), so for RRF the report adds ``same_top_k_engine_tie_order``: the queries whose pipeline
order equals RRF over the lists' own positions, i.e. what is left once that tie rule is taken out.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from rerank.retrieval.opensearch_bodies import hybrid_search_body, normalization_pipeline_body, rrf_pipeline_body
from rerank.retrieval.retriever import BM25, KNN_TEXT, FirstStage, fuse_first_stage

log = logging.getLogger(__name__)


def pipeline_fusion_agreement(
    client: Any,
    index: str,
    stages: Sequence[FirstStage],
    query_vectors: np.ndarray,
    *,
    per_list: int,
    k: int = 10,
    opensearch_version: str | None = None,
) -> dict[str, Any]:
    """Compare the pipelines' top ``k`` with client-side fusion for every stage that ran both text lists."""
    rrf_kwargs = {"opensearch_version": opensearch_version} if opensearch_version else {}
    bodies = {"hybrid_minmax": ("minmax", normalization_pipeline_body()), "hybrid_rrf": ("rrf", rrf_pipeline_body(**rrf_kwargs))}
    names = {system: f"fusionrank-check-{system}-{uuid.uuid4().hex[:8]}" for system in bodies}
    t = client.transport
    report: dict[str, Any] = {"k": k, "per_list": per_list, "lists": [BM25, KNN_TEXT]}
    try:
        for system, (_, body) in bodies.items():
            t.perform_request("PUT", f"/_search/pipeline/{names[system]}", body=body)
        for system, (method, _) in bodies.items():
            same = near = n = same_pos = 0
            overlaps: list[float] = []
            diffs: list[dict[str, Any]] = []
            for stage, qv in zip(stages, query_vectors):
                if not (stage.lists.get(BM25) and stage.lists.get(KNN_TEXT)):
                    continue  # a query with an empty list: the pipeline would fuse fewer lists than asked
                client_side = fuse_first_stage(stage, method=method, lists=[BM25, KNN_TEXT], top_n=k)
                want = [c.id for c in client_side.candidates]
                body = hybrid_search_body(stage.query, text_vector=qv, size=k, per_list=per_list)
                got_hits = t.perform_request("POST", f"/{index}/_search", params={"search_pipeline": names[system]}, body=body)["hits"]["hits"]
                got = [str(h["_id"]) for h in got_hits]
                n += 1
                overlaps.append(len(set(got) & set(want)) / max(len(want), 1))
                if method == "rrf":
                    same_pos += int(got == _rrf_by_position(stage, k))
                if got == want:
                    same += 1
                    continue
                scores = {c.id: c.score for c in client_side.candidates}
                first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                tie = first < len(got) and got[first] in scores and want[first] in scores and \
                    np.float32(scores[got[first]]) == np.float32(scores[want[first]])
                near += int(bool(tie))
                if len(diffs) < 5:
                    diffs.append({"query": stage.query, "pipeline": got, "client_side": want, "first_difference": first, "near_tie": bool(tie)})
            report[system] = {"queries": n, "same_top_k": same, "near_ties": near,
                              "overlap_at_k": round(float(np.mean(overlaps)), 4) if overlaps else None, "first_differences": diffs}
            if method == "rrf":
                report[system]["same_top_k_engine_tie_order"] = same_pos
    finally:
        for name in names.values():
            try:
                t.perform_request("DELETE", f"/_search/pipeline/{name}")
            except Exception as e:  # never hide the real outcome
                log.warning("deleting the check pipeline %s failed: %s", name, e)
    return report


def _rrf_by_position(stage: FirstStage, k: int, rank_constant: int = 60) -> list[str]:
    """RRF over the bm25 and knn_text lists with ranks as the engine returned them (equal scores in engine order)."""
    scores: dict[str, float] = {}
    for name in (BM25, KNN_TEXT):
        for rank, hit in enumerate(stage.lists.get(name) or (), start=1):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (rank_constant + rank)
    return [d for d, _ in sorted(scores.items(), key=lambda kv: -kv[1])][:k]


def summary_line(report: Mapping[str, Any]) -> str:
    parts = []
    for system in ("hybrid_minmax", "hybrid_rrf"):
        r = report.get(system) or {}
        if r:
            extra = (f", {r['same_top_k_engine_tie_order']} with equal list scores in engine order"
                     if "same_top_k_engine_tie_order" in r else "")
            parts.append(f"{system}: {r['same_top_k']}/{r['queries']} queries with the same top {report['k']} "
                         f"(overlap {r['overlap_at_k']}, near float32 ties {r['near_ties']}{extra})")
    return "pipeline vs client-side fusion: " + "; ".join(parts)


__all__ = ["pipeline_fusion_agreement", "summary_line"]

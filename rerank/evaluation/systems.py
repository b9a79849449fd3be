"""The baseline systems of the harness, registered by explicit name (``SYSTEMS``).

Every system sees the same :class:`EvalItem` s (one per evaluated query: its gains, its first-stage
lists and its *pool*) and returns one or more *runs* (``{query_id: ranked ids}``); metrics are
averaged over runs (``random`` returns five seeded runs, the others one).

The pool is what a system may reorder, identical for every system:

* ``rerank`` mode: the judged products of the query (ESCI task-1 style). The first-stage lists ran
  restricted to exactly those products (a term filter on the product id), so BM25 and kNN scores are
  the engine's own. A judged product a list did not return (no term match, no photo, not indexed)
  goes after the ones it did, in id order.
* ``retrieve`` mode: single-list systems rank the whole catalog (their own top ``per_list``);
  hybrids fuse the lists; ``random``, ``lambdamart`` and ``cross_encoder`` reorder the ``hybrid_rrf``
  top N (the same candidates for all three).

Trainable systems (``lambdamart``, ``cross_encoder``) are trained on :attr:`EvalContext.train_items`
(the training split, or the ``--train-*`` files), validated on :attr:`EvalContext.valid_items`, and
cached by a content hash of what they were trained on (:mod:`rerank.evaluation.trainers`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from indexing.registry import Registry
from rerank.fusion import ListSignal
from rerank.retrieval import BM25, KNN_IMAGE, KNN_TEXT, LISTS, Candidate, CandidateSet, FirstStage, fuse_first_stage

log = logging.getLogger(__name__)

Run = dict[str, list[str]]


class NotApplicable(Exception):
    """The system cannot run on this dataset/mode (e.g. knn_image with text queries and no alignment)."""


@dataclass(frozen=True)
class EvalItem:
    """One query as every system sees it."""

    query_id: str
    query: str
    user_id: str | None
    gains: Mapping[str, float]  # mapped gains of the judged products
    stage: FirstStage
    pool: tuple[str, ...]  # ids a reranking system may reorder (see module doc)
    pool_candidates: CandidateSet  # the pool with every first-stage signal, in hybrid_rrf order


@dataclass
class EvalContext:
    """What systems may use: the engine/index (texts by id), the items, training items, where to cache."""

    mode: str
    items: Sequence[EvalItem]
    train_items: Sequence[EvalItem] = ()
    valid_items: Sequence[EvalItem] = ()
    fetch_sources: Callable[[Sequence[str]], Mapping[str, Mapping[str, Any]]] | None = None
    train_fetch_sources: Callable[[Sequence[str]], Mapping[str, Mapping[str, Any]]] | None = None
    cache_dir: Path | None = None
    train_key: str = ""  # content hash of the training inputs (files + index + mode)
    model_dirs: Mapping[str, Path] = field(default_factory=dict)  # --model overrides
    seed: int = 13
    rerank_depth: int = 100  # retrieve mode: how deep the cross-encoder reorders the pool
    device: str = "auto"
    progress: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # per system, shown in the report


class System:
    name: str = ""
    trainable: bool = False

    def runs(self, ctx: EvalContext) -> list[Run]:  # pragma: no cover - interface
        raise NotImplementedError


SYSTEMS: Registry[System] = Registry("evaluation system")
DEFAULT_SYSTEMS = ("random", "bm25", "knn_text", "knn_image", "hybrid_minmax", "hybrid_rrf", "lambdamart", "cross_encoder")


# --------------------------------------------------------------------------- helpers
def complete(order: Sequence[str], pool: Sequence[str]) -> list[str]:
    """``order`` (ids in the pool, first occurrence) then the rest of the pool in id order."""
    pool_set = set(pool)
    seen: set[str] = set()
    out = []
    for d in order:
        if d in pool_set and d not in seen:
            seen.add(d)
            out.append(d)
    out.extend(sorted(pool_set - seen))
    return out


def candidates_for_pool(stage: FirstStage, pool: Sequence[str], lists: Sequence[str] = LISTS) -> CandidateSet:
    """Every pool id as a candidate, in hybrid RRF order; ids no list returned come last (id order)."""
    fused = fuse_first_stage(stage, method="rrf", lists=lists, top_n=None)
    pool_set = set(pool)
    kept = [c for c in fused.candidates if c.id in pool_set]
    have = {c.id for c in kept}
    absent = {n: ListSignal.absent() for n in lists}
    rest = [Candidate(d, 0.0, 0, absent) for d in sorted(pool_set - have)]
    cands = tuple(Candidate(c.id, c.score, i + 1, c.signals, c.source) for i, c in enumerate(kept + rest))
    return CandidateSet(stage.query, cands, fused.lists, fused.skipped, "rrf", stage.user_id)


# --------------------------------------------------------------------------- random
@SYSTEMS.register("random")
class RandomSystem(System):
    """A seeded random order of the pool; five seeds, metrics averaged."""

    name = "random"
    seeds = (0, 1, 2, 3, 4)

    def runs(self, ctx: EvalContext) -> list[Run]:
        out = []
        for s in self.seeds:
            run: Run = {}
            for it in ctx.items:
                ids = sorted(it.pool)
                random.Random(f"{ctx.seed}:{s}:{it.query_id}").shuffle(ids)
                run[it.query_id] = ids
            out.append(run)
        return out


# --------------------------------------------------------------------------- single lists
class _ListSystem(System):
    list_name = ""

    def runs(self, ctx: EvalContext) -> list[Run]:
        ran = [it for it in ctx.items if self.list_name in it.stage.lists]
        if not ran:
            reasons = {it.stage.skipped.get(self.list_name, "") for it in ctx.items}
            raise NotApplicable(f"the {self.list_name} list ran for no query ({'; '.join(sorted(r for r in reasons if r)) or 'no queries'})")
        run: Run = {}
        for it in ctx.items:
            hits = it.stage.lists.get(self.list_name, ())
            order = [d for d, _ in sorted({h.id: h.score for h in hits}.items(), key=lambda kv: (-kv[1], kv[0]))]
            run[it.query_id] = complete(order, it.pool) if ctx.mode == "rerank" else order
        if len(ran) < len(ctx.items):
            ctx.notes[self.name] = f"the {self.list_name} list ran for {len(ran)} of {len(ctx.items)} queries"
        return [run]


@SYSTEMS.register("bm25")
class BM25System(_ListSystem):
    name, list_name = "bm25", BM25


@SYSTEMS.register("knn_text")
class KnnTextSystem(_ListSystem):
    name, list_name = "knn_text", KNN_TEXT


@SYSTEMS.register("knn_image")
class KnnImageSystem(_ListSystem):
    name, list_name = "knn_image", KNN_IMAGE


# --------------------------------------------------------------------------- hybrids
class _HybridSystem(System):
    method = ""

    def runs(self, ctx: EvalContext) -> list[Run]:
        run: Run = {}
        opts = dict(ctx.options.get(f"{self.name}_options", {}))
        for it in ctx.items:
            top_n = None if ctx.mode == "rerank" else ctx.options.get("top_n", 200)
            cs = fuse_first_stage(it.stage, method=self.method, lists=LISTS, top_n=top_n, **opts)
            run[it.query_id] = complete(cs.ids, it.pool) if ctx.mode == "rerank" else cs.ids
        return [run]


@SYSTEMS.register("hybrid_rrf")
class HybridRRF(_HybridSystem):
    name, method = "hybrid_rrf", "rrf"


@SYSTEMS.register("hybrid_minmax")
class HybridMinMax(_HybridSystem):
    name, method = "hybrid_minmax", "minmax"


# --------------------------------------------------------------------------- trained
def _rerank_pool(ctx: EvalContext, it: EvalItem, scores: Mapping[str, float], depth: int | None) -> list[str]:
    """Pool order by model score (ties by id); in retrieve mode only the first ``depth`` are reordered."""
    base = [c.id for c in it.pool_candidates.candidates]
    head, tail = (base, []) if depth is None else (base[:depth], base[depth:])
    head = sorted(head, key=lambda d: (-scores[d], d))
    return head + tail


@SYSTEMS.register("lambdamart")
class LambdaMART(System):
    """LightGBM lambdarank on :func:`rerank.features.first_stage_features`, trained on the training split."""

    name, trainable = "lambdamart", True

    def runs(self, ctx: EvalContext) -> list[Run]:
        from rerank.evaluation.trainers import LambdaMARTModel

        model = LambdaMARTModel.for_context(ctx)
        run: Run = {}
        for it in ctx.items:
            scores = model.score(it.pool_candidates.candidates)
            run[it.query_id] = _rerank_pool(ctx, it, dict(zip(it.pool_candidates.ids, scores)), None)
        return [run]


@SYSTEMS.register("cross_encoder")
class CrossEncoderSystem(System):
    """all-MiniLM-L6-v2 fine-tuned as a cross-encoder on the training split (no pretrained one exists offline)."""

    name, trainable = "cross_encoder", True

    def runs(self, ctx: EvalContext) -> list[Run]:
        from rerank.evaluation.trainers import CrossEncoderModel, doc_text

        model = CrossEncoderModel.for_context(ctx)
        depth = None if ctx.mode == "rerank" else ctx.rerank_depth
        pairs: list[tuple[str, str, str]] = []  # (query_id, doc id, doc text)
        texts: dict[str, str] = {}
        need = sorted({d for it in ctx.items for d in (list(it.pool_candidates.ids)[:depth] if depth else it.pool)})
        assert ctx.fetch_sources is not None
        for chunk in range(0, len(need), 1000):
            srcs = ctx.fetch_sources(need[chunk : chunk + 1000])
            for d in need[chunk : chunk + 1000]:
                texts[d] = doc_text(srcs.get(d))
        queries = {it.query_id: it.query for it in ctx.items}
        for it in ctx.items:
            ids = list(it.pool_candidates.ids)[:depth] if depth else list(it.pool)
            pairs.extend((it.query_id, d, texts[d]) for d in ids)
        scores = model.score([queries[q] for q, _, _ in pairs], [t for _, _, t in pairs], progress=ctx.progress)
        by_q: dict[str, dict[str, float]] = {}
        for (q, d, _), s in zip(pairs, scores):
            by_q.setdefault(q, {})[d] = float(s)
        run: Run = {}
        for it in ctx.items:
            run[it.query_id] = _rerank_pool(ctx, it, by_q.get(it.query_id, {}), depth)
        ctx.notes.setdefault(self.name, model.note)
        return [run]


__all__ = [
    "DEFAULT_SYSTEMS",
    "EvalContext",
    "EvalItem",
    "NotApplicable",
    "Run",
    "SYSTEMS",
    "System",
    "candidates_for_pool",
    "complete",
]

"""``fusionrank bench rerank``: latency of the drop-in rerank call against the cross-encoder baseline.

Each request is one query with its first-stage candidates (the hybrid retrieval's top ``candidates``,
prepared before the clock starts) handed to :meth:`Reranker.rerank` as an OpenSearch response whose
``_source`` holds no vectors, so the timed call does what it does in production: encode the query,
fetch the candidates' vectors by id (one request), look up the user's profile in the history store,
build the features and run one forward pass. Users cycle through the given ones, so profile lookups
are mostly cache misses (cold: SQL + vector fetch).

The cross-encoder (:class:`rerank.evaluation.trainers.CrossEncoderModel`, MiniLM with a 1-logit head)
scores the same candidates' texts for a subset of the same requests in the same run; its latency does
not depend on its weights, so an untrained head is used unless a trained directory is given. Both run
with the same torch thread count. ``speedup`` = cross-encoder p50 / rerank p50.

``aligned_cache``: the reranker's aligned-photo cache (:class:`rerank.model.alignment.AlignedCache`) after the run,
warm-up calls included: ``misses`` rows were projected (a product's photo seen for the first time, the
candidates' and the history items' alike), ``hits`` were not; ``null`` for a model without images or a
reranker built with ``aligned_cache_size=0``. The timed calls cycle over ``distinct_queries`` queries, so
after the first round their candidates' photos are cached: a service sees the same once its traffic has
touched the catalog (a product's aligned vector is kept until evicted or its photo changes).

``diversity``: the calls pass it (a lambda or ``"auto"``; None: the reranker's default); ``stages_p50_ms["mmr"]`` is
the diversity step. ``compare_diversity``: each request is also timed with diversity 0, the two calls alternating
(the order swapped every request), so that the difference is measured in the same phase of a noisy machine:
``diversity_compare`` holds both p50/p99, ``added_p50_ms`` (the p50 with minus the p50 without: what the issue's
target reads) and ``added_paired_ms`` (the median, 25th and 75th percentile of each request's own difference: the
same request's two calls a few milliseconds apart, so most of the machine's drift cancels; two medians of noisy
calls can differ by more than the step costs).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from indexing import fields as F
from indexing.machine import machine_info

log = logging.getLogger(__name__)

SOURCE_FIELDS = [F.ID, F.TITLE, F.BRAND, F.CATEGORY]


def percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else float("nan")


def first_stage_responses(reranker: Any, queries: Sequence[str], candidates: int) -> list[dict[str, Any]]:
    """OpenSearch-shaped responses of the hybrid first stage (no vectors in ``_source``)."""
    out = []
    for q in queries:
        cs = reranker.retriever.retrieve(q, top_n=candidates, with_source=True)
        hits = [{"_index": reranker.index, "_id": c.id, "_score": float(c.score),
                 "_source": {k: v for k, v in (c.source or {}).items() if k in SOURCE_FIELDS}} for c in cs.candidates]
        out.append({"took": 0, "timed_out": False, "hits": {"total": {"value": len(hits), "relation": "eq"},
                                                           "max_score": hits[0]["_score"] if hits else None, "hits": hits}})
    return out


def time_rerank_calls(reranker: Any, calls: Iterable[tuple[str, Any, str | None]], *, warmup: int = 0,
                      diversity: float | str | None = None) -> tuple[list[float], int, dict[str, list[float]]]:
    """Time ``reranker.rerank(query, response, user_id=user, diversity=diversity)`` for each call, the first ``warmup``
    untimed: ``(milliseconds per call, degraded calls, {stage: [its timings_ms]})``."""
    totals: list[float] = []
    stages: dict[str, list[float]] = {}
    degraded = 0
    for i, (query, response, user) in enumerate(calls):
        t = time.perf_counter()
        out = reranker.rerank(query, response, user_id=user, diversity=diversity)
        ms = (time.perf_counter() - t) * 1000.0
        if i < warmup:
            continue
        totals.append(ms)
        fr = out["fusionrank"]
        degraded += fr["degraded"] is not None
        for st, v in fr.get("timings_ms", {}).items():
            stages.setdefault(st, []).append(v)
    return totals, degraded, stages


def closed_loop(c: int, send: Callable[[Any], Any], items: Sequence[Any], *, warm_up: Sequence[Any] = ()) -> tuple[list[Any], float]:
    """``send`` over ``items`` from ``c`` threads, each taking the next item as soon as its previous one returned
    (a closed loop: at most ``c`` in flight); first over ``warm_up``, untimed, by the same threads (so a thread's
    keep-alive connection carries over), then over ``items``. Returns ``send``'s results in ``items`` order and the
    seconds from the moment every thread had finished the warm-up to the last result.

    Why not ``ThreadPoolExecutor.map``: it creates a future for every item up front, in the calling thread, while
    the pool's threads are already sending; at 1 500 items that burst held the load generator's GIL long enough to
    delay the first responses' reads, and those delays were counted as server latency (``bench serve`` at c=8, same
    server, alternating: p99 37-44 ms with ``map`` against 33-39 ms with this loop, the slowest requests of a ``map``
    level bunched in its first 0.1 s). The first exception raised by ``send`` stops every thread and is raised here."""
    if c < 1:
        raise ValueError(f"a closed loop needs at least one thread, got {c}")
    phases = (list(warm_up), list(items))
    results: list[Any] = [None] * len(phases[1])
    taken = [0, 0]
    lock = threading.Lock()
    failed: list[BaseException] = []
    started = [0.0]
    barrier = threading.Barrier(c, action=lambda: started.__setitem__(0, time.perf_counter()))

    def take(phase: int) -> int | None:
        with lock:
            i = taken[phase]
            if failed or i >= len(phases[phase]):
                return None
            taken[phase] = i + 1
            return i

    def run(phase: int) -> None:
        try:
            while (i := take(phase)) is not None:
                out = send(phases[phase][i])
                if phase:
                    results[i] = out
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            with lock:
                failed.append(e)

    def worker() -> None:
        run(0)
        barrier.wait()
        run(1)

    threads = [threading.Thread(target=worker, name=f"bench-client-{k}", daemon=True) for k in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started[0]
    if failed:
        raise failed[0]
    return results, wall


def _doc_text(src: dict[str, Any]) -> str:
    from rerank.evaluation.trainers import doc_text

    return doc_text(src)


def bench_rerank(
    reranker: Any,
    queries: Sequence[str],
    users: Sequence[str | None],
    *,
    candidates: int = 100,
    requests: int = 200,
    warmup: int = 10,
    cross_encoder: Any | None = None,
    ce_requests: int = 20,
    progress: bool = False,
    diversity: float | str | None = None,
    compare_diversity: bool = False,
) -> dict[str, Any]:
    """Time ``requests`` rerank calls (after ``warmup``) and ``ce_requests`` cross-encoder passes (see the module doc
    for ``diversity`` and ``compare_diversity``)."""
    from tqdm import tqdm

    if not queries:
        raise ValueError("bench_rerank needs at least one query")
    n_distinct = min(len(queries), requests + warmup)
    responses = first_stage_responses(reranker, queries[:n_distinct], candidates)
    sizes = [len(r["hits"]["hits"]) for r in responses]
    calls = [(queries[i % n_distinct], responses[i % n_distinct], users[i % len(users)] if users else None)
             for i in range(warmup + requests)]
    compare: dict[str, Any] | None = None
    if compare_diversity:
        on: list[float] = []
        off: list[float] = []
        stages = {}
        degraded = 0
        for i, call in enumerate(tqdm(calls, desc="rerank (diversity on/off)", unit="req", disable=not progress)):
            pair = [(diversity, on, True), (0.0, off, False)]
            for div, sink, keep_stages in (pair if i % 2 == 0 else pair[::-1]):
                ms, deg, st = time_rerank_calls(reranker, [call], diversity=div)
                if i < warmup:
                    continue
                sink.extend(ms)
                if keep_stages:
                    degraded += deg
                    for k, v in st.items():
                        stages.setdefault(k, []).extend(v)
        totals = on
        paired = [a - b for a, b in zip(on, off)]  # the same request with and without, timed back to back
        compare = {"diversity": diversity, "on_p50_ms": round(percentile(on, 50), 3), "on_p99_ms": round(percentile(on, 99), 3),
                   "off_p50_ms": round(percentile(off, 50), 3), "off_p99_ms": round(percentile(off, 99), 3),
                   "added_p50_ms": round(percentile(on, 50) - percentile(off, 50), 3),
                   "added_paired_ms": {f"p{q}": round(percentile(paired, q), 3) for q in (25, 50, 75)},
                   "note": "each request timed with the diversity and with 0, alternating (order swapped every request)"}
    else:
        totals, degraded, stages = time_rerank_calls(reranker, tqdm(calls, desc="rerank", unit="req", disable=not progress), warmup=warmup,
                                                     diversity=diversity)
    res: dict[str, Any] = {
        "machine": machine_info(),
        "requests": requests,
        "candidates_per_request": round(float(np.mean(sizes)), 1),
        "p50_ms": round(percentile(totals, 50), 3),
        "p99_ms": round(percentile(totals, 99), 3),
        "mean_ms": round(float(np.mean(totals)), 3),
        "stages_p50_ms": {k: round(percentile(v, 50), 3) for k, v in stages.items()},
        "degraded": degraded,
        "users": len(set(users)) if users else 0,
        # how many different query texts the timed calls used: with as many as calls, no query repeats (the
        # reranker keeps no query-embedding cache, so every call encodes its query either way)
        "distinct_queries": len({queries[i % n_distinct] for i in range(warmup, warmup + requests)}),
        "text_backend": getattr(reranker.text_encoder, "backend", None),
        "model_version": reranker.model.version if reranker.model is not None else None,
        "model_runtime": reranker.model_runtime,
        "micro_batch": reranker.batcher is not None,
        "aligned_cache": reranker.aligned_cache.stats if reranker.aligned_cache is not None else None,
        "diversity": diversity if diversity is not None else getattr(reranker, "diversity", None),
    }
    if compare is not None:
        res["diversity_compare"] = compare
    if cross_encoder is not None and ce_requests > 0:
        ce_ms = []
        for i in tqdm(range(min(ce_requests, n_distinct) + 1), desc="cross_encoder", unit="req", disable=not progress):
            k = i % n_distinct
            hits = responses[k]["hits"]["hits"]
            docs = [_doc_text(h["_source"]) for h in hits]
            t = time.perf_counter()
            cross_encoder.score([queries[k]] * len(docs), docs)
            if i:  # the first pass warms up
                ce_ms.append((time.perf_counter() - t) * 1000.0)
        res["cross_encoder_requests"] = len(ce_ms)
        res["cross_encoder_p50_ms"] = round(percentile(ce_ms, 50), 3)
        res["speedup"] = round(res["cross_encoder_p50_ms"] / res["p50_ms"], 2) if res["p50_ms"] > 0 else None
    return res


__all__ = ["bench_rerank", "first_stage_responses", "percentile", "time_rerank_calls"]

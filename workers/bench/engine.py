"""The engine benchmark behind ``fusionrank bench engine``: build, then time BM25, kNN and filtered kNN, on the
LocalEngine or (``--engine opensearch``) an OpenSearch cluster.

:func:`run_engine_bench` builds an index of synthetic products (titles, descriptions, categories and
brands drawn from a small generated vocabulary; 100 colours, so one colour is a 1% filter; prices;
unit-norm random vectors) in a LocalEngine under a temporary folder and returns one flat dict:

``bm25_ms_p50/p99`` (multi_match top-``k`` over the default fields), ``knn_ms_p50/p99`` (top-``k`` on
``text_vec``), ``filtered_knn_ms_p50/p99`` and ``filtered_knn_recall`` (top-``k`` among the 1% of
documents of one colour, against an exact numpy brute force over the same documents),
``upsert_docs_per_s`` (one streaming bulk call, commit included), ``snapshot_load_ms`` (first load of
the whole index), ``refresh_after_small_commit_ms`` (another instance picking up a 100-document
commit), plus ``docs``, ``dim`` and the run's parameters. Latencies are wall-clock per query, after one warm-up query per kind.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from indexing import fields as F
from indexing.machine import machine_info

log = logging.getLogger(__name__)

N_COLOURS = 100  # one colour = 1% of the documents
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zen", "dor", "pel", "quin", "bar", "tas", "lum", "fi")


def vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    """``size`` distinct pseudo-words of 2-4 syllables (so the English stemmer leaves them alone)."""
    words: set[str] = set()
    while len(words) < size:
        n = int(rng.integers(2, 5))
        words.add("".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), n)))
    return sorted(words)


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def synthetic_documents(n: int, dim: int, seed: int = 0) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """``n`` product documents (``text_vec`` as float32 rows), their vector matrix and colour codes."""
    rng = np.random.default_rng(seed)
    vocab = np.array(vocabulary(2000, rng))
    categories = [" > ".join(vocab[rng.integers(0, len(vocab), 3)]) for _ in range(50)]
    brands = list(vocab[rng.integers(0, len(vocab), 200)])
    vecs = unit_vectors(n, dim, rng)
    colours = rng.integers(0, N_COLOURS, n)
    title_words = rng.integers(0, len(vocab), (n, 6))
    title_len = rng.integers(3, 7, n)
    desc_words = rng.integers(0, len(vocab), (n, 16))
    cat = rng.integers(0, len(categories), n)
    brand = rng.integers(0, len(brands), n)
    price = np.round(rng.uniform(1, 500, n), 2)
    rating = np.round(rng.uniform(1, 5, n), 1)
    docs = []
    for i in range(n):
        docs.append({
            F.ID: f"p{i:07d}",
            F.TITLE: " ".join(vocab[title_words[i, : title_len[i]]]),
            F.DESCRIPTION: " ".join(vocab[desc_words[i]]),
            F.CATEGORY: categories[cat[i]],
            F.BRAND: brands[brand[i]],
            F.COLOUR: f"colour{colours[i]:02d}",
            F.PRICE: float(price[i]),
            F.RATING: float(rating[i]),
            F.TEXT_VEC: vecs[i],
        })
    return docs, vecs, colours


def _ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(samples) * 1e3, q)), 3)


@contextlib.contextmanager
def _dropped(engine: Any, index: str) -> Iterator[None]:
    """Delete ``index`` from a remote ``engine`` afterwards, whatever happened (nothing for the local engine)."""
    try:
        yield
    finally:
        if engine is not None and engine.index_exists(index):
            engine.delete_index(index)


def run_engine_bench(
    *,
    docs: int = 100_000,
    dim: int = 384,
    queries: int = 200,
    seed: int = 0,
    k: int = 100,
    chunk_size: int = 1000,
    faiss_threshold: int | None = None,
    path: Path | str | None = None,
    progress: bool = False,
    engine: Any = None,
    hnsw_engine: str | None = None,
) -> dict[str, Any]:
    """Build a synthetic index of ``docs`` documents in a LocalEngine and time the three searches.

    ``engine``: another engine to build it in and search (an ``OpenSearchEngine``: index ``bench-<random>``, deleted
    afterwards, vector fields on ``hnsw_engine``); the LocalEngine-only figures (snapshot load, a second reader's
    refresh) are then None. The result's ``engine`` names which."""
    from indexing.engines.base import BulkAction, Filters
    from indexing.engines.local import LocalEngine
    from indexing.errors import ConfigError
    from indexing.lifecycle import load_body

    for label, v, lo in (("docs", docs, 1), ("dim", dim, 1), ("queries", queries, 1), ("k", k, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{label} must be an integer >= {lo}, got {v!r}")
    t_gen = time.perf_counter()
    documents, vecs, colours = synthetic_documents(docs, dim, seed)
    log.info("generated %d documents in %.1fs", docs, time.perf_counter() - t_gen)
    rng = np.random.default_rng(seed + 1)
    vocab = sorted({w for d in documents[: min(docs, 5000)] for w in d[F.TITLE].split()})

    remote = engine
    name = f"bench-{uuid.uuid4().hex[:10]}" if remote is not None else "bench"
    with tempfile.TemporaryDirectory(prefix="fusionrank-bench-", dir=path) as tmp, _dropped(remote, name):
        engine = remote if remote is not None else LocalEngine(Path(tmp) / "engine", faiss_threshold=faiss_threshold)
        engine.create_index(name, load_body("products-v1", text_dim=dim, image_dim=dim, hnsw_engine=hnsw_engine))

        def actions() -> Iterator[BulkAction]:
            it = documents
            if progress:
                from tqdm import tqdm

                it = tqdm(documents, desc="indexing", unit="doc")
            for d in it:
                yield BulkAction.index(d[F.ID], d)

        t0 = time.perf_counter()
        summary = engine.bulk(name, actions(), chunk_size=chunk_size)
        index_s = time.perf_counter() - t0
        if summary.failed:
            raise RuntimeError(f"benchmark documents were rejected: {summary.failed[:3]}")
        t0 = time.perf_counter()
        engine.refresh(name)
        load_ms = (time.perf_counter() - t0) * 1e3

        bm25_queries = [" ".join(rng.choice(vocab, int(rng.integers(1, 4)))) for _ in range(queries)]
        qvecs = unit_vectors(queries, dim, rng)
        qcolours = rng.integers(0, N_COLOURS, queries)

        engine.bm25_search(name, bm25_queries[0], size=k)  # warm-up
        bm25 = []
        for q in bm25_queries:
            t = time.perf_counter()
            engine.bm25_search(name, q, size=k)
            bm25.append(time.perf_counter() - t)

        engine.knn_search(name, F.TEXT_VEC, qvecs[0], k=k)
        knn = []
        for q in qvecs:
            t = time.perf_counter()
            engine.knn_search(name, F.TEXT_VEC, q, k=k)
            knn.append(time.perf_counter() - t)

        fknn, recalls = [], []
        engine.knn_search(name, F.TEXT_VEC, qvecs[0], k=k, filters=Filters(terms={F.COLOUR: f"colour{qcolours[0]:02d}"}))
        for q, c in zip(qvecs, qcolours):
            flt = Filters(terms={F.COLOUR: f"colour{c:02d}"})
            t = time.perf_counter()
            hits = engine.knn_search(name, F.TEXT_VEC, q, k=k, filters=flt)
            fknn.append(time.perf_counter() - t)
            members = np.flatnonzero(colours == c)
            scores = vecs[members] @ q
            want = members[np.argsort(-scores, kind="stable")[:k]]
            truth = {documents[i][F.ID] for i in want.tolist()}
            recalls.append(len(truth & {h.id for h in hits}) / max(len(truth), 1))
        count = engine.count(name)

        refresh_ms: float | None = None
        if remote is None:
            # a reader in another instance picks up a small commit: only the new rows are loaded
            reader = LocalEngine(Path(tmp) / "engine")
            reader.count(name)
            extra = synthetic_documents(100, dim, seed + 2)[0]
            engine.bulk(name, (BulkAction.index(f"extra{i}", d) for i, d in enumerate(extra)))
            t0 = time.perf_counter()
            reader.refresh(name)
            refresh_ms = (time.perf_counter() - t0) * 1e3
            reader.close()
            engine.close()

    return {
        "machine": machine_info(),
        "engine": getattr(remote, "name", "local") if remote is not None else "local",
        "hnsw_engine": hnsw_engine if remote is not None else ("faiss" if faiss_threshold is not None else None),
        "docs": docs,
        "dim": dim,
        "queries": queries,
        "k": k,
        "count": count,
        "bm25_ms_p50": _ms(bm25, 50),
        "bm25_ms_p99": _ms(bm25, 99),
        "knn_ms_p50": _ms(knn, 50),
        "knn_ms_p99": _ms(knn, 99),
        "filtered_knn_ms_p50": _ms(fknn, 50),
        "filtered_knn_ms_p99": _ms(fknn, 99),
        "filtered_knn_selectivity": round(1 / N_COLOURS, 4),
        "filtered_knn_recall": round(float(np.mean(recalls)), 6),
        "upsert_docs_per_s": round(docs / index_s, 1),
        "index_s": round(index_s, 3),
        "snapshot_load_ms": round(load_ms, 1),  # LocalEngine: loading its snapshot; OpenSearch: the refresh call
        "refresh_after_small_commit_ms": round(refresh_ms, 1) if refresh_ms is not None else None,
        "faiss_threshold": faiss_threshold,
    }

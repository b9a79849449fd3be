"""``fusionrank bench reindex``: reindex time with vectors reused and with a changed text model, under searches.

1. builds the source generation: the first ``limit`` rows of the catalog through the inline indexing job
   into a fresh LocalEngine (a temporary folder) with the configured models;
2. ``reuse_s``: a reindex with unchanged models (every vector copied, nothing encoded);
3. ``reembed_s``: a reindex with the other text backend (torch <-> onnx-int8: another model id, so every
   text vector is re-encoded; image vectors are copied).

During both jobs a searcher thread, on its own engine instance (as another process would have), runs BM25
and kNN searches and a count through the alias without pause. ``failed_searches`` counts searches that
raised or saw a count other than the full one; ``max_pause_ms`` is the longest search latency among the
searches that started in the swap window (from the swap request until 2 s after it, which covers the
readers' first look at the new generation).
"""

from __future__ import annotations

import logging
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexing import fields as F
from indexing.errors import ConfigError
from indexing.machine import machine_info

log = logging.getLogger(__name__)

SWAP_WINDOW_AFTER_S = 2.0


@dataclass
class SearchLog:
    """Every search of the concurrent searcher: (start time, latency s, kind, ok, detail)."""

    rows: list[tuple[float, float, str, bool, str]] = field(default_factory=list)
    counts: set[int] = field(default_factory=set)


class Searcher(threading.Thread):
    """BM25 + kNN + count through the alias in a loop until stopped; failures are recorded, never raised."""

    def __init__(self, engine, alias: str, queries: list[str], vectors: list[list[float]], expect_count: int):
        super().__init__(daemon=True)
        self.engine, self.alias, self.queries, self.vectors, self.expect = engine, alias, queries, vectors, expect_count
        self.log = SearchLog()
        self._halt = threading.Event()

    def stop(self) -> SearchLog:
        self._halt.set()
        self.join(timeout=30)
        return self.log

    def _one(self, kind: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - a failed search is what we count
            ok, detail = False, f"{type(e).__name__}: {e}"
        self.log.rows.append((t0, time.perf_counter() - t0, kind, ok, detail))

    def run(self) -> None:
        rng = random.Random(0)
        while not self._halt.is_set():
            q = rng.choice(self.queries)
            v = rng.choice(self.vectors)
            self._one("bm25", lambda: (bool(self.engine.bm25_search(self.alias, q, size=10)), q))
            self._one("knn", lambda: (bool(self.engine.knn_search(self.alias, F.TEXT_VEC, v, k=10)), "knn"))

            def count():
                n = self.engine.count(self.alias)
                self.log.counts.add(n)
                return n == self.expect, f"count {n}"

            self._one("count", count)


def run_reindex_bench(settings, *, catalog: Path, images_root: Path, limit: int = 2000, batch_size: int = 256,
                      work_dir: Path | None = None) -> dict[str, Any]:
    from indexing.engines import create_engine
    from indexing.pipeline import IndexJob
    from rerank.history.store import upgrade
    from workers.jobs import run_index_job
    from workers.reindex_jobs import ReindexJobStore, make_plan, start_job

    if not Path(catalog).is_file():
        raise ConfigError(f"benchmark catalog not found: {catalog} (set FUSIONRANK_SHARED_DATA or pass --catalog)")
    alias = "bench-reindex"
    with tempfile.TemporaryDirectory(prefix="fusionrank-bench-reindex-", dir=work_dir) as tmp:
        tmp_path = Path(tmp)
        s = settings.model_copy(update={"index_alias": alias, "data_dir": tmp_path, "engine": "local", "sql_url": None})
        url = s.effective_sql_url
        upgrade(url)
        engine = create_engine("local", path=tmp_path / "engine")
        reader = create_engine("local", path=tmp_path / "engine")
        job = IndexJob(catalog=str(Path(catalog).resolve()), index=alias, images_root=str(Path(images_root).resolve()),
                       text_model=s.text_model, text_backend=s.text_backend, image_model=s.image_model, device=s.device,
                       batch_size=batch_size)
        t0 = time.perf_counter()
        built = run_index_job(engine, s, job, limit=limit, progress=False)
        build_s = time.perf_counter() - t0
        engine.refresh(alias)
        n = engine.count(alias)
        docs = []
        for d in engine.iter_documents(alias, batch_size=500):
            docs.append(d)
            if len(docs) >= 200:
                break
        queries = [str(d[F.TITLE]) for d in docs if d.get(F.TITLE)][:50] or ["shirt"]
        vectors = [list(d[F.TEXT_VEC]) for d in docs if d.get(F.TEXT_VEC)][:50]
        other_backend = "onnx-int8" if s.text_backend == "torch" else "torch"

        searcher = Searcher(reader, alias, queries, vectors, n)
        swaps: list[tuple[float, float]] = []
        marks: dict[str, float] = {}

        def checkpoint(step: str) -> None:
            if step == "swap":
                marks["swap"] = time.perf_counter()
            elif step == "swapped":
                swaps.append((marks.pop("swap"), time.perf_counter()))

        out: dict[str, Any] = {"machine": machine_info(), "limit": limit, "docs": n, "build_s": round(build_s, 2), "build_failed": built.failed}
        searcher.start()
        try:
            with ReindexJobStore(url) as store:
                for key, backend in (("reuse", s.text_backend), ("reembed", other_backend)):
                    plan = make_plan(engine, alias=alias, mapping=s.mapping, text_model=s.text_model, text_backend=backend,
                                     image_model=s.image_model, images_root=job.images_root, device=s.device,
                                     batch_size=batch_size, hnsw_engine=s.hnsw_engine)
                    t = time.perf_counter()
                    summary = start_job(engine, store, plan, checkpoint=checkpoint, progress=False)
                    out[f"{key}_s"] = round(time.perf_counter() - t, 2)
                    out[f"{key}_copied"] = summary.copied
                    out[f"{key}_reencoded"] = summary.reencoded
                    out[f"{key}_failed"] = summary.failed
                    time.sleep(SWAP_WINDOW_AFTER_S)  # let the searcher run into the new generation
        finally:
            slog = searcher.stop()
            engine.close()
            reader.close()
        in_window = [r for r in slog.rows if any(a <= r[0] <= b + SWAP_WINDOW_AFTER_S for a, b in swaps)]
        fails = [r for r in slog.rows if not r[3]]
        lat = sorted(r[1] for r in slog.rows)
        out.update({
            "searches": len(slog.rows),
            "failed_searches": len(fails),
            "failures": [f"{r[2]}: {r[4]}" for r in fails[:5]],
            "counts_seen": sorted(slog.counts),
            "swaps": len(swaps),
            "swap_request_ms": [round((b - a) * 1000, 2) for a, b in swaps],
            "searches_in_swap_window": len(in_window),
            "max_pause_ms": round(max((r[1] for r in in_window), default=0.0) * 1000, 2),
            "p50_search_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
            "p99_search_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
            "text_backends": [s.text_backend, other_backend],
        })
        return out

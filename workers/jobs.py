"""Running an indexing job end to end, inline or through Celery workers, with progress and one summary."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

from indexing.errors import ConfigError, FusionRankError
from indexing.lifecycle import ensure_alias
from indexing.pipeline import BatchResult, Encoders, IndexJob, IndexSummary, ItemError, plan_batches, run_batches, summarize

if TYPE_CHECKING:
    from indexing.engines.base import SearchEngine
    from workers.settings import Settings

log = logging.getLogger(__name__)


class NoWorkerError(FusionRankError):
    """No Celery worker consumes the queue a job needs."""


def prepare(engine: "SearchEngine", settings: "Settings", job: IndexJob, *, limit: int | None = None):
    """Scan the catalog, make sure the alias has a generation with matching dimensions, plan the batches."""
    from indexing.catalog import scan_catalog
    from indexing.pipeline import _field_map

    if not Path(job.catalog).is_file():
        raise ConfigError(f"catalog file not found: {job.catalog}")
    scan = scan_catalog(job.catalog, _field_map(job))
    rows = scan.rows if limit is None else min(limit, scan.rows)
    enc = Encoders.for_job(job)
    index = ensure_alias(
        engine, job.index, settings.mapping, text_dim=enc.text_info.dim, image_dim=enc.image_info.dim, hnsw_engine=settings.hnsw_engine
    )
    return rows, plan_batches(rows, job.batch_size), sorted(r for r in scan.duplicate_rows if r < rows), enc, index


def run_index_job(
    engine: "SearchEngine",
    settings: "Settings",
    job: IndexJob,
    *,
    via: Literal["inline", "celery"] = "inline",
    limit: int | None = None,
    progress: bool | None = None,
    timeout_s: float | None = None,
    on_batch: Callable[[BatchResult], None] | None = None,
) -> IndexSummary:
    """Index ``job.catalog`` (its first ``limit`` rows) into ``job.index``; returns the job summary."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    rows, batches, dups, enc, index = prepare(engine, settings, job, limit=limit)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=rows, unit="doc", desc=f"indexing {Path(job.catalog).name}", disable=not show, file=sys.stderr)

    def progress_cb(r: BatchResult) -> None:
        bar.update(r.stop - r.start)
        bar.set_postfix(indexed=r.indexed, failed=len(r.errors), refresh=False)
        if on_batch:
            on_batch(r)

    try:
        if via == "inline":
            results = run_batches(engine, job, batches, dups, on_batch=progress_cb, encoders=enc)
        elif via == "celery":
            results = _run_celery(settings, job, batches, dups, on_batch=progress_cb, timeout_s=timeout_s)
            engine.refresh(job.index)
        else:
            raise ConfigError(f"unknown --via {via!r}; valid: inline, celery")
    finally:
        bar.close()
    return summarize(index, via, rows, results, time.perf_counter() - t0)


def _run_celery(settings: "Settings", job: IndexJob, batches, dups, *, on_batch, timeout_s: float | None) -> list[BatchResult]:
    from celery import group

    from workers.celery_app import create_app

    app = create_app(settings)  # the caller's settings, not whatever the module-level app was built from
    consumers = app.control.inspect(timeout=2.0).active_queues() or {}
    if not any(q.get("name") == "embed" for qs in consumers.values() for q in qs):
        raise NoWorkerError(
            f"no Celery worker consumes the 'embed' queue on {_safe(settings.broker_url)}; "
            "start one with: fusionrank worker --queues embed,index"
        )
    sigs = [app.signature("fusionrank.index_batch", args=(job.to_dict(), s, e, [d for d in dups if s <= d < e])) for s, e in batches]
    res = group(sigs, app=app).apply_async()
    by_id = {r.id: i for i, r in enumerate(res.results)}
    done: dict[int, BatchResult] = {}

    def cb(task_id: str, value) -> None:
        i = by_id[task_id]
        if isinstance(value, dict):
            done[i] = BatchResult.from_dict(value)
            on_batch(done[i])

    res.join_native(timeout=timeout_s, propagate=False, callback=cb)
    out = []
    for i, (s, e) in enumerate(batches):
        if i in done:
            out.append(done[i])
        else:  # the task failed after its retries: every row of its range is reported, none silently lost
            err = res.results[i].result
            reason = f"batch failed after retries: {err!r}"
            out.append(BatchResult(s, e, 0, 0, tuple(ItemError(r, None, reason) for r in range(s, e)), 0.0))
    return out


def _safe(url: str) -> str:
    from workers.settings import redact_url

    return redact_url(url) or ""

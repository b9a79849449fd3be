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


class JobTimeoutError(FusionRankError):
    """A job through Celery did not finish within its time limit."""


class WorkerEngineMismatchError(ConfigError):
    """A Celery worker writes to another search engine than the one the job was prepared on.

    Workers build their engine from their own settings (``FUSIONRANK_ENGINE``, ``FUSIONRANK_OPENSEARCH_URL``,
    ``FUSIONRANK_DATA_DIR``); the job names the index generation it prepared, and a worker whose engine does not
    hold it refuses the batch instead of writing the products somewhere the job does not look."""


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
    stall_s: float = 20.0,
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
            results = _run_celery(settings, job, batches, dups, on_batch=progress_cb, timeout_s=timeout_s, stall_s=stall_s,
                                  generation=index)
            engine.refresh(job.index)
        else:
            raise ConfigError(f"unknown --via {via!r}; valid: inline, celery")
    finally:
        bar.close()
    return summarize(index, via, rows, results, time.perf_counter() - t0)


def _run_celery(
    settings: "Settings", job: IndexJob, batches, dups, *, on_batch, timeout_s: float | None, stall_s: float = 20.0,
    require_worker: bool = True, generation: str | None = None,
) -> list[BatchResult]:
    """Dispatch one task per batch and collect the results as they come.

    ``generation``: the concrete index the job prepared behind ``job.index``; each task checks that its worker's
    engine holds it, so a worker configured for another engine fails the job with
    :class:`WorkerEngineMismatchError` instead of writing elsewhere.

    Kombu's Redis transport takes a message off the queue before it records it as unacknowledged, so a
    worker killed in between loses that message for good (no visibility timeout brings it back). So when
    no result has arrived for ``stall_s`` seconds and no worker holds a task (nothing active, nothing
    reserved), the batches still missing are sent again. Batches are idempotent: a duplicate only finds
    its products unchanged, and the first result per batch is the one counted.
    """
    from celery.exceptions import TimeoutError as CeleryTimeout
    from celery.result import ResultSet

    from workers.celery_app import create_app

    app = create_app(settings)  # the caller's settings, not whatever the module-level app was built from
    consumers = (app.control.inspect(timeout=2.0).active_queues() or {}) if require_worker else {}
    if require_worker and not any(q.get("name") == "embed" for qs in consumers.values() for q in qs):
        raise NoWorkerError(
            f"no Celery worker consumes the 'embed' queue on {_safe(settings.broker_url)}; "
            "start one with: fusionrank worker --queues embed,index"
        )

    def send(i: int):
        s, e = batches[i]
        kwargs = {"generation": generation} if generation is not None else {}
        r = app.send_task("fusionrank.index_batch", args=(job.to_dict(), s, e, [d for d in dups if s <= d < e]), kwargs=kwargs)
        by_id[r.id] = i
        handles[i].append(r)
        return r

    by_id: dict[str, int] = {}
    handles: dict[int, list] = {i: [] for i in range(len(batches))}
    for i in range(len(batches)):
        send(i)
    done: dict[int, BatchResult] = {}
    failed: dict[int, BaseException] = {}

    def cb(task_id: str, value) -> None:
        i = by_id[task_id]
        if i in done or i in failed:
            return  # a duplicate of a re-sent batch: the first result counts
        if isinstance(value, dict):
            done[i] = BatchResult.from_dict(value)
            on_batch(done[i])
        else:  # the task failed after its retries
            failed[i] = value

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while len(done) + len(failed) < len(batches):
        missing = [i for i in range(len(batches)) if i not in done and i not in failed]
        wait = stall_s if deadline is None else max(0.0, min(stall_s, deadline - time.monotonic()))
        try:
            ResultSet([r for i in missing for r in handles[i]], app=app).join_native(timeout=wait, propagate=False, callback=cb)
        except CeleryTimeout:
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(
                    f"{len(missing)} of {len(batches)} batches unfinished after {timeout_s} s; "
                    "the products already written stay written: run the job again to finish (unchanged products are skipped)"
                ) from None
            if _workers_hold_tasks(app):
                continue  # slow, not lost
            still = [i for i in missing if i not in done and i not in failed]
            if not still:
                continue
            log.warning("re-sending %d batch(es) that no worker holds (lost with a killed worker?): %s",
                        len(still), [batches[i] for i in still])
            for i in still:
                send(i)
    mismatch = next((v for v in failed.values() if isinstance(v, WorkerEngineMismatchError)), None)
    if mismatch is not None:  # a configuration error of the whole job, not of its rows
        raise WorkerEngineMismatchError(str(mismatch))
    out = []
    for i, (s, e) in enumerate(batches):
        if i in done:
            out.append(done[i])
        else:  # failed after its retries: every row of its range is reported, none silently lost
            reason = f"batch failed after retries: {failed[i]!r}"
            out.append(BatchResult(s, e, 0, 0, tuple(ItemError(r, None, reason) for r in range(s, e)), 0.0))
    return out


def _workers_hold_tasks(app) -> bool:
    """True when some worker has a task running or reserved. No answer at all counts as holding nothing:
    a batch sent again then waits in the queue for the next worker."""
    insp = app.control.inspect(timeout=2.0)
    active, reserved = insp.active(), insp.reserved()
    if active is None and reserved is None:
        return False
    return any((active or {}).values()) or any((reserved or {}).values())


def engine_description(settings: "Settings") -> str:
    """Which engine ``settings`` select, as a message can name it (no credentials)."""
    if settings.engine == "local":
        return f"the local engine under {settings.data_dir / 'engine'} (FUSIONRANK_DATA_DIR)"
    return f"{settings.engine} at {_safe(settings.opensearch_url)} (FUSIONRANK_ENGINE, FUSIONRANK_OPENSEARCH_URL)"


def check_worker_engine(engine: "SearchEngine", settings: "Settings", job: IndexJob, generation: str) -> None:
    """Raise :class:`WorkerEngineMismatchError` when ``engine`` (this worker's) lacks the job's ``generation``."""
    if engine.index_exists(generation):
        return
    raise WorkerEngineMismatchError(
        f"this worker writes to {engine_description(settings)}, which has no index {generation!r} (the generation the "
        f"job prepared behind alias {job.index!r}): the job runs on another engine, or that generation was deleted since. "
        "Start the worker with the same FUSIONRANK_ENGINE, FUSIONRANK_OPENSEARCH_URL (and FUSIONRANK_DATA_DIR for the "
        "local engine) as the process that runs the job"
    )


def _safe(url: str) -> str:
    from workers.settings import redact_url

    return redact_url(url) or ""

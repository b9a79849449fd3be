"""Reindex jobs end to end: the job record in the SQL store, orchestration (inline or Celery), resume, rollback.

The record (tables ``reindex_jobs`` / ``reindex_batches``, migration 0003 of the history store) holds the
job's plan, its step (create / fill / verify / swap / done) and every finished fill batch (its ordinal
range in the source); the job's ``details`` keep the product id ranges those batches covered
(``fill_coverage``, an :class:`indexing.reindex.FillCoverage`), written in the same transaction as the batch.
:func:`run_job` runs the remaining steps of a job; it is what ``start``, ``resume`` and the Celery admin
tasks call. A job that died (killed process or worker, engine error) is resumed from its record: the fill
reads the source again in product id order after the covered ids and writes the rest (each batch is
idempotent), verification is redone, and the swap is sent only if the alias does not point at the target
already. The library steps are in :mod:`indexing.reindex`.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, Sequence

from sqlalchemy import delete, exc, select, update

from indexing.errors import ConfigError
from indexing.lifecycle import generation_name
from indexing.reindex import (
    Checkpoint,
    FillBatchResult,
    FillCoverage,
    ReindexError,
    ReindexPlan,
    count_batches,
    create_target,
    current_generation,
    fill,
    fill_batch,
    generations,
    iter_source_batches,
    plan_encoders,
    resume_point,
    swap,
    verify,
)
from rerank.history.models import ReindexBatch, ReindexJob
from rerank.history.store import HistoryStore, sql_errors

if TYPE_CHECKING:
    from indexing.engines.base import SearchEngine
    from workers.settings import Settings

log = logging.getLogger(__name__)

UNFINISHED = ("running", "failed")


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- the record store
@dataclass(frozen=True)
class JobInfo:
    job_id: str
    alias: str
    source: str
    target: str
    plan: dict[str, Any]
    via: str
    status: str
    step: str
    total_docs: int | None
    total_batches: int | None
    finished_batches: int
    details: dict[str, Any]
    error: str | None
    created_at: str
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReindexJobStore:
    """Job records in the (migrated) history database; ``NotMigratedError`` says to run ``fusionrank db upgrade``."""

    def __init__(self, url: str):
        self._hs = HistoryStore(url)
        self.engine = self._hs.engine
        self.url = self._hs.url

    def close(self) -> None:
        self._hs.close()

    def __enter__(self) -> "ReindexJobStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create(self, plan: ReindexPlan, via: str) -> None:
        with sql_errors("creating a reindex job record", self.url), self.engine.begin() as conn:
            conn.execute(
                ReindexJob.__table__.insert().values(
                    job_id=plan.job_id, alias=plan.alias, source=plan.source, target=plan.target, plan=plan.to_dict(),
                    via=via, status="running", step="create", details={}, created_at=_now(), updated_at=_now(),
                )
            )

    def update(self, job_id: str, **values: Any) -> None:
        details = values.pop("details", None)
        with sql_errors(f"updating reindex job {job_id}", self.url), self.engine.begin() as conn:
            if details:
                cur = conn.execute(select(ReindexJob.details).where(ReindexJob.job_id == job_id)).scalar_one()
                values["details"] = {**(cur or {}), **details}
            conn.execute(update(ReindexJob).where(ReindexJob.job_id == job_id).values(updated_at=_now(), **values))

    def add_batch(self, job_id: str, r: FillBatchResult) -> None:
        """Record a finished batch and add its id range to the job's ``fill_coverage``, in one transaction (a second
        record of the same batch is ignored: batches are idempotent)."""
        row = dict(job_id=job_id, batch=r.batch, start=r.start, stop=r.stop, copied=r.copied, reencoded=r.reencoded,
                   unchanged=r.unchanged, failed=r.failed, seconds=r.seconds, errors=[list(e) for e in r.errors[:100]])
        try:
            with sql_errors(f"recording batch {r.batch} of reindex job {job_id}", self.url), self.engine.begin() as conn:
                if conn.execute(select(ReindexBatch.batch).where(ReindexBatch.job_id == job_id, ReindexBatch.batch == r.batch)).first():
                    return
                conn.execute(ReindexBatch.__table__.insert().values(**row))
                values: dict[str, Any] = {"updated_at": _now()}
                if r.last is not None:
                    details = conn.execute(
                        select(ReindexJob.details).where(ReindexJob.job_id == job_id).with_for_update()
                    ).scalar_one() or {}
                    cov = FillCoverage.from_dict(details.get("fill_coverage"))
                    cov.add(r.after, r.last, r.stop - r.start)
                    values["details"] = {**details, "fill_coverage": cov.to_dict()}
                conn.execute(update(ReindexJob).where(ReindexJob.job_id == job_id).values(**values))
        except Exception as e:  # a concurrent writer recorded it first
            if isinstance(e.__cause__, exc.IntegrityError):
                return
            raise

    def coverage(self, job_id: str) -> FillCoverage:
        """The product id ranges the job's finished batches covered."""
        with sql_errors(f"reading reindex job {job_id}", self.url), self.engine.connect() as conn:
            details = conn.execute(select(ReindexJob.details).where(ReindexJob.job_id == job_id)).scalar_one_or_none()
        return FillCoverage.from_dict((details or {}).get("fill_coverage"))

    def finished_batches(self, job_id: str) -> set[int]:
        with sql_errors(f"reading reindex job {job_id}", self.url), self.engine.connect() as conn:
            return {int(b) for b in conn.execute(select(ReindexBatch.batch).where(ReindexBatch.job_id == job_id)).scalars()}

    def batches(self, job_id: str) -> list[FillBatchResult]:
        with sql_errors(f"reading reindex job {job_id}", self.url), self.engine.connect() as conn:
            t = ReindexBatch.__table__
            rows = conn.execute(select(t).where(t.c.job_id == job_id).order_by(t.c.batch)).all()
        return [
            FillBatchResult(r.batch, r.start, r.stop, r.copied, r.reencoded, r.unchanged, r.failed, r.seconds,
                            tuple(tuple(e) for e in r.errors or ()))
            for r in rows
        ]

    def _info(self, conn, row) -> JobInfo:
        n = len(self.finished_batches(row.job_id))
        return JobInfo(row.job_id, row.alias, row.source, row.target, dict(row.plan), row.via, row.status, row.step,
                       row.total_docs, row.total_batches, n, dict(row.details or {}), row.error,
                       row.created_at.isoformat(), row.updated_at.isoformat())

    def get(self, job_id: str) -> JobInfo:
        with sql_errors(f"reading reindex job {job_id}", self.url), self.engine.connect() as conn:
            row = conn.execute(select(ReindexJob.__table__).where(ReindexJob.job_id == job_id)).first()
            if row is None:
                raise ReindexError(f"no reindex job {job_id!r} in {self._hs.url_text}")
            return self._info(conn, row)

    def jobs(self, alias: str, *, statuses: Sequence[str] | None = None, limit: int = 50) -> list[JobInfo]:
        """The alias's jobs, newest first."""
        q = select(ReindexJob.__table__).where(ReindexJob.alias == alias)
        if statuses:
            q = q.where(ReindexJob.status.in_(list(statuses)))
        q = q.order_by(ReindexJob.created_at.desc(), ReindexJob.job_id.desc()).limit(limit)
        with sql_errors(f"listing reindex jobs of {alias}", self.url), self.engine.connect() as conn:
            return [self._info(conn, r) for r in conn.execute(q).all()]

    def unfinished(self, alias: str) -> JobInfo | None:
        jobs = self.jobs(alias, statuses=UNFINISHED, limit=1)
        return jobs[0] if jobs else None

    def delete(self, job_id: str) -> None:
        with sql_errors(f"deleting reindex job {job_id}", self.url), self.engine.begin() as conn:
            conn.execute(delete(ReindexBatch).where(ReindexBatch.job_id == job_id))
            conn.execute(delete(ReindexJob).where(ReindexJob.job_id == job_id))

    def record(self, job_id: str) -> "SqlJobRecord":
        return SqlJobRecord(self, job_id)


@dataclass
class SqlJobRecord:
    """The :class:`indexing.reindex.JobRecord` of one job, on the SQL store."""

    store: ReindexJobStore
    job_id: str

    def finished_batches(self) -> set[int]:
        return self.store.finished_batches(self.job_id)

    def coverage(self) -> FillCoverage:
        return self.store.coverage(self.job_id)

    def batch_done(self, result: FillBatchResult) -> None:
        self.store.add_batch(self.job_id, result)

    def set_step(self, step: str, **details: Any) -> None:
        cols = {k: details.pop(k) for k in ("total_docs", "total_batches") if k in details}
        self.store.update(self.job_id, step=step, details=details, **cols)


# --------------------------------------------------------------------------- the summary
@dataclass(frozen=True)
class ReindexSummary:
    """What a job did (over all its runs: batches of earlier, interrupted runs are counted too)."""

    job_id: str
    alias: str
    source: str
    target: str
    via: str
    status: str
    docs: int
    copied: int
    reencoded: int
    unchanged: int
    failed: int
    batches: int
    batches_this_run: int
    previous: list[str]
    verify: dict[str, Any]
    seconds: float
    errors: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


# --------------------------------------------------------------------------- orchestration
def _noop(step: str) -> None:
    return None


def make_plan(
    engine: "SearchEngine",
    *,
    alias: str,
    mapping: str,
    text_model: str,
    text_backend: str,
    image_model: str,
    images_root: str | None,
    device: str = "auto",
    batch_size: int = 256,
    hnsw_engine: str | None = None,
    job_id: str | None = None,
) -> ReindexPlan:
    """A new job's plan: source = the alias's current generation, target = a new generation name."""
    source = current_generation(engine, alias)
    plan = ReindexPlan(
        job_id=job_id or uuid.uuid4().hex, alias=alias, source=source, target=generation_name(alias), mapping=mapping,
        text_model=text_model, text_backend=text_backend, image_model=image_model, images_root=images_root,
        device=device, batch_size=batch_size, hnsw_engine=hnsw_engine,
    )
    if plan.target == source:
        raise ReindexError(f"new generation name {plan.target} equals the source's; try again")
    # re-encoding images needs their files: refuse up front rather than dropping every image vector
    enc = plan_encoders(plan)
    for doc in engine.iter_documents(source, batch_size=50):
        if doc.get("image_model_id") and doc["image_model_id"] != enc.image_info.model_id and not images_root:
            raise ConfigError(
                f"the image model changes ({doc['image_model_id']} -> {enc.image_info.model_id}): pass --images-root, "
                "the folder the catalog's image paths are relative to"
            )
        break
    return plan


def start_job(
    engine: "SearchEngine",
    store: ReindexJobStore,
    plan: ReindexPlan,
    *,
    via: Literal["inline", "celery"] = "inline",
    settings: "Settings | None" = None,
    checkpoint: Checkpoint = _noop,
    progress: bool | None = None,
    encoders=None,
    timeout_s: float | None = None,
) -> ReindexSummary:
    """Record a new job and run it. Refuses while another job of the alias is unfinished (resume it first)."""
    if via not in ("inline", "celery"):
        raise ConfigError(f"unknown --via {via!r}; valid: inline, celery")
    other = store.unfinished(plan.alias)
    if other is not None:
        raise ReindexError(
            f"reindex job {other.job_id} of alias {plan.alias!r} is unfinished (status {other.status}, step {other.step}); "
            "finish it with `fusionrank reindex resume` or drop it with `fusionrank reindex abandon`"
        )
    store.create(plan, via)
    log.info("reindex job %s: %s -> %s (mapping %s, text %s/%s, image %s)", plan.job_id, plan.source, plan.target,
             plan.mapping, plan.text_model, plan.text_backend, plan.image_model)
    return run_job(engine, store, plan.job_id, via=via, settings=settings, checkpoint=checkpoint, progress=progress,
                   encoders=encoders, timeout_s=timeout_s)


def resume_job(engine: "SearchEngine", store: ReindexJobStore, alias: str, **kwargs: Any) -> ReindexSummary:
    """Run the remaining steps of the alias's unfinished job (ReindexError when there is none)."""
    job = store.unfinished(alias)
    if job is None:
        raise ReindexError(f"no unfinished reindex job for alias {alias!r}; nothing to resume")
    log.info("resuming reindex job %s at step %s (%d batches finished)", job.job_id, job.step, job.finished_batches)
    kwargs.setdefault("via", job.via)
    return run_job(engine, store, job.job_id, **kwargs)


def abandon_job(engine: "SearchEngine", store: ReindexJobStore, alias: str, *, delete_target: bool = True) -> JobInfo:
    """Give up the alias's unfinished job; its target generation is deleted unless the alias points at it."""
    job = store.unfinished(alias)
    if job is None:
        raise ReindexError(f"no unfinished reindex job for alias {alias!r}")
    if delete_target and engine.index_exists(job.target) and job.target not in engine.get_alias(alias):
        engine.delete_index(job.target)
    store.update(job.job_id, status="abandoned")
    return store.get(job.job_id)


def run_job(
    engine: "SearchEngine",
    store: ReindexJobStore,
    job_id: str,
    *,
    via: Literal["inline", "celery"] = "inline",
    settings: "Settings | None" = None,
    checkpoint: Checkpoint = _noop,
    progress: bool | None = None,
    encoders=None,
    timeout_s: float | None = None,
) -> ReindexSummary:
    """Run the steps of job ``job_id`` that are not finished; the record says where it stands."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    job = store.get(job_id)
    if job.status in ("done", "abandoned"):
        raise ReindexError(f"reindex job {job_id} is {job.status}; nothing to run")
    plan = ReindexPlan.from_dict(job.plan)
    rec = store.record(job_id)
    enc = encoders or plan_encoders(plan)
    this_run: list[FillBatchResult] = []
    store.update(job_id, status="running", error=None)
    try:
        create_target(engine, plan, enc)
        docs, n_batches = count_batches(engine, plan.source, plan.batch_size)
        if job.step == "create":
            rec.set_step("fill", total_docs=docs, total_batches=n_batches)
        checkpoint("created")
        if job.step in ("create", "fill"):
            done = rec.finished_batches()
            show = sys.stderr.isatty() if progress is None else progress
            bar = tqdm(total=n_batches, initial=len(done), unit="batch", desc=f"filling {plan.target}", disable=not show, file=sys.stderr)
            try:
                def on_batch(r: FillBatchResult) -> None:
                    this_run.append(r)
                    bar.update(1)

                if via == "celery":
                    _fill_celery(engine, plan, rec, settings, on_batch=on_batch, timeout_s=timeout_s)
                else:
                    fill(engine, plan, rec, encoders=enc, checkpoint=checkpoint, on_batch=on_batch)
            finally:
                bar.close()
            checkpoint("filled")
            rec.set_step("verify")
        report = verify(engine, plan, checkpoint=checkpoint)
        rec.set_step("swap", verify=report.to_dict())
        previous = swap(engine, plan, checkpoint=checkpoint)
        rec.set_step("done", previous=previous)
        store.update(job_id, status="done")
    except BaseException as e:
        try:
            store.update(job_id, status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        except Exception as e2:  # keep the original failure; the record stays 'running', which resume also takes
            log.error("could not record the failure of reindex job %s: %s", job_id, e2)
        raise
    return summarize(store, job_id, batches_this_run=len(this_run), seconds=time.perf_counter() - t0)


def summarize(store: ReindexJobStore, job_id: str, *, batches_this_run: int = 0, seconds: float = 0.0) -> ReindexSummary:
    job = store.get(job_id)
    bs = store.batches(job_id)
    return ReindexSummary(
        job_id=job_id, alias=job.alias, source=job.source, target=job.target, via=job.via, status=job.status,
        docs=job.total_docs or 0, copied=sum(b.copied for b in bs), reencoded=sum(b.reencoded for b in bs),
        unchanged=sum(b.unchanged for b in bs), failed=sum(b.failed for b in bs), batches=len(bs),
        batches_this_run=batches_this_run, previous=list(job.details.get("previous") or []),
        verify=dict(job.details.get("verify") or {}), seconds=seconds,
        errors=[list(e) for b in bs for e in b.errors][:100],
    )


def _fill_celery(engine: "SearchEngine", plan: ReindexPlan, rec, settings: "Settings | None", *, on_batch, timeout_s: float | None) -> None:
    """Send the unfinished batches (product ids, never vectors) to the ``embed`` queue; record each result."""
    from celery import group

    from workers.celery_app import create_app
    from workers.jobs import NoWorkerError, _safe
    from workers.settings import load_settings

    settings = settings or load_settings()
    app = create_app(settings)
    consumers = app.control.inspect(timeout=2.0).active_queues() or {}
    if not any(q.get("name") == "embed" for qs in consumers.values() for q in qs):
        raise NoWorkerError(
            f"no Celery worker consumes the 'embed' queue on {_safe(settings.broker_url)}; start one with: fusionrank worker --queues embed,index,admin"
        )
    cov, first = resume_point(rec)
    sigs, meta = [], []
    ranges: dict[int, tuple[str | None, str]] = {}
    for b in iter_source_batches(engine, plan.source, plan.batch_size, coverage=cov, first_batch=first):
        sigs.append(app.signature("fusionrank.reindex_fill_batch", args=(plan.to_dict(), b.batch, b.start, [str(d["product_id"]) for d in b.docs])))
        meta.append((b.batch, b.start, len(b.docs)))
        ranges[b.batch] = (b.after, b.last)
    if not sigs:
        engine.refresh(plan.target)
        return
    res = group(sigs, app=app).apply_async()

    def cb(task_id: str, value: Any) -> None:
        if isinstance(value, dict):
            r = FillBatchResult.from_dict(value)
            if r.batch in ranges:  # the id range this process planned the batch with (a worker knows only its ids)
                after, last = ranges[r.batch]
                r = replace(r, after=after, last=last)
            rec.batch_done(r)
            on_batch(r)

    res.join_native(timeout=timeout_s, propagate=False, callback=cb)
    failed = [meta[i][0] for i, r in enumerate(res.results) if not r.successful()]
    engine.refresh(plan.target)
    if failed:
        raise ReindexError(f"fill batches {failed[:20]} failed on the workers after their retries; fix the cause and run `fusionrank reindex resume`")


def fill_batch_by_ids(engine: "SearchEngine", plan: ReindexPlan, batch: int, start: int, ids: Sequence[str], *, encoders=None) -> FillBatchResult:
    """A worker's batch: read the source documents by id, then :func:`indexing.reindex.fill_batch` (``ids`` in
    product id order, as :func:`indexing.reindex.iter_source_batches` made them)."""
    got = engine.get(plan.source, list(ids))
    missing = [i for i in ids if i not in got]
    if missing:
        raise ReindexError(f"source {plan.source} lacks ids {missing[:10]} of batch {batch}; was it written to during the job?")
    return fill_batch(engine, plan, batch, start, [got[i] for i in ids], encoders=encoders)


# --------------------------------------------------------------------------- status, rollback, cleanup
def status(engine: "SearchEngine", store: ReindexJobStore | None, alias: str) -> dict[str, Any]:
    """Generations with counts, which one the alias points at, and the newest job's progress."""
    gens = generations(engine, alias)
    out: dict[str, Any] = {"alias": alias, "current": engine.get_alias(alias), "generations": [g.to_dict() for g in gens], "job": None}
    if store is not None:
        jobs = store.jobs(alias, limit=1)
        if jobs:
            j = jobs[0]
            out["job"] = {
                "job_id": j.job_id, "status": j.status, "step": j.step, "source": j.source, "target": j.target, "via": j.via,
                "batches_done": j.finished_batches, "batches_total": j.total_batches, "docs_total": j.total_docs,
                "error": j.error, "created_at": j.created_at, "updated_at": j.updated_at,
                "text_model": j.plan.get("text_model"), "text_backend": j.plan.get("text_backend"),
                "image_model": j.plan.get("image_model"), "mapping": j.plan.get("mapping"),
            }
    return out


def rollback_target(engine: "SearchEngine", store: ReindexJobStore, alias: str) -> tuple[str, str]:
    """(current, previous): the generation the alias points at and the one it was swapped from by a finished job."""
    current = current_generation(engine, alias)
    for j in store.jobs(alias, statuses=["done"], limit=500):
        if j.target == current:
            return current, j.source
    raise ReindexError(
        f"no finished reindex job swapped alias {alias!r} to {current!r}, so there is no recorded previous generation; "
        "name one with --to (see `fusionrank reindex status`)"
    )


def rollback_alias(engine: "SearchEngine", store: ReindexJobStore, alias: str, to: str | None = None) -> dict[str, Any]:
    from indexing.reindex import rollback

    if to is None:
        current, to = rollback_target(engine, store, alias)
    else:
        current = current_generation(engine, alias)
    prev = rollback(engine, alias, to, expect_current=current)
    return {"alias": alias, "from": prev, "to": to}


def cleanup_generations(engine: "SearchEngine", store: ReindexJobStore | None, alias: str, keep: int) -> list[str]:
    from indexing.reindex import cleanup

    protect = [j.target for j in store.jobs(alias, statuses=UNFINISHED)] if store is not None else []
    return cleanup(engine, alias, keep, protect=protect)

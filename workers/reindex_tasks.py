"""Celery tasks of the admin reindex jobs.

``fusionrank.reindex.*`` run on the ``admin`` queue; each calls one function of :mod:`workers.reindex_jobs`.
They are idempotent and resumable: ``start`` takes the job id from the caller, so a redelivered ``start``
(its worker died; ``acks_late``) resumes the recorded job instead of starting a second one, and the job
itself skips its finished batches. The fill batches of ``--via celery`` jobs run as
``fusionrank.reindex_fill_batch`` on the ``embed`` queue (product ids travel, never vectors).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from indexing.reindex import ReindexPlan
from workers.celery_app import RETRY, app


@lru_cache(maxsize=1)
def _settings():
    from workers.settings import load_settings

    return load_settings()


def _engine():
    from workers.tasks import _engine as engine

    return engine()


def _store():
    from workers.reindex_jobs import ReindexJobStore

    return ReindexJobStore(_settings().effective_sql_url)


@lru_cache(maxsize=4)
def _encoders(text_model: str, text_backend: str, image_model: str, device: str):
    from indexing.pipeline import Encoders

    return Encoders(text_model, text_backend, image_model, device)


@app.task(name="fusionrank.reindex_fill_batch", **RETRY)
def reindex_fill_batch_task(plan: dict[str, Any], batch: int, start: int, ids: list[str]) -> dict[str, Any]:
    """Copy / re-encode one batch of source documents (by product id) into the target generation."""
    from workers.reindex_jobs import fill_batch_by_ids

    p = ReindexPlan.from_dict(plan)
    engine = _engine()
    engine.refresh(p.target)
    enc = _encoders(p.text_model, p.text_backend, p.image_model, p.device)
    return fill_batch_by_ids(engine, p, batch, start, ids, encoders=enc).to_dict()


@app.task(name="fusionrank.reindex.start", **RETRY)
def reindex_start_task(job_id: str, alias: str, mapping: str, text_model: str, text_backend: str, image_model: str,
                       images_root: str | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Start (or, when ``job_id`` is recorded already, resume) a reindex job in this worker."""
    from workers.reindex_jobs import make_plan, run_job, start_job

    s = _settings()
    engine = _engine()
    with _store() as store:
        try:
            job = store.get(job_id)
        except Exception:
            job = None
        if job is not None:
            if job.status == "done":
                from workers.reindex_jobs import summarize

                return summarize(store, job_id).to_dict()
            return run_job(engine, store, job_id, via="inline", settings=s, progress=False).to_dict()
        plan = make_plan(engine, alias=alias, mapping=mapping, text_model=text_model, text_backend=text_backend,
                         image_model=image_model, images_root=images_root, device=s.device, batch_size=batch_size,
                         hnsw_engine=s.hnsw_engine, job_id=job_id,
                         image_allow_networks=s.image_url_allow_networks,
                         attribute_model=str(s.attribute_model_dir.resolve()) if s.attribute_model_dir else None,
                         attribute_threshold=s.attribute_completion_threshold)
        return start_job(engine, store, plan, via="inline", settings=s, progress=False).to_dict()


@app.task(name="fusionrank.reindex.resume", **RETRY)
def reindex_resume_task(alias: str) -> dict[str, Any]:
    from workers.reindex_jobs import resume_job

    with _store() as store:
        return resume_job(_engine(), store, alias, via="inline", settings=_settings(), progress=False).to_dict()


@app.task(name="fusionrank.reindex.rollback", **RETRY)
def reindex_rollback_task(alias: str, to: str | None = None) -> dict[str, Any]:
    from workers.reindex_jobs import rollback_alias

    with _store() as store:
        return rollback_alias(_engine(), store, alias, to)


@app.task(name="fusionrank.reindex.cleanup", **RETRY)
def reindex_cleanup_task(alias: str, keep: int) -> list[str]:
    from workers.reindex_jobs import cleanup_generations

    with _store() as store:
        return cleanup_generations(_engine(), store, alias, keep)


@app.task(name="fusionrank.reindex.status")
def reindex_status_task(alias: str) -> dict[str, Any]:
    from workers.reindex_jobs import status

    with _store() as store:
        return status(_engine(), store, alias)

"""Thin Celery tasks: each takes batch references (catalog path + row range, or ids), calls one
library function, and returns a JSON summary. Routing and retries come from workers.celery_app."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from indexing.pipeline import Encoders, IndexJob, index_batch
from workers.celery_app import RETRY, app


@lru_cache(maxsize=1)
def _settings():
    from workers.settings import load_settings

    return load_settings()


@lru_cache(maxsize=1)
def _engine():
    from workers.composition import build_engine

    return build_engine(_settings())


@lru_cache(maxsize=4)
def _encoders(text_model: str, text_backend: str, image_model: str, device: str) -> Encoders:
    return Encoders(text_model, text_backend, image_model, device)


@app.task(name="fusionrank.index_batch", **RETRY)
def index_batch_task(
    job: dict[str, Any], start: int, stop: int, duplicate_rows: list[int], generation: str | None = None
) -> dict[str, Any]:
    """Encode and write catalog rows [start, stop); idempotent (unchanged products are skipped).

    ``generation``: the index the job prepared behind ``job["index"]``; a worker whose engine (from its own
    settings) does not hold it refuses the batch (WorkerEngineMismatchError, not retried)."""
    j = IndexJob.from_dict(job)
    engine = _engine()
    if generation is not None:
        from workers.jobs import check_worker_engine

        check_worker_engine(engine, _settings(), j, generation)
    enc = _encoders(j.text_model, j.text_backend, j.image_model, j.device)
    engine.refresh(j.index)  # see what other processes committed before deciding what is unchanged
    return index_batch(engine, j, start, stop, duplicate_rows=duplicate_rows, encoders=enc).to_dict()


@app.task(name="fusionrank.refresh_index", **RETRY)
def refresh_index_task(index: str) -> int:
    """Make every committed write visible; returns the document count."""
    engine = _engine()
    engine.refresh(index)
    return engine.count(index)

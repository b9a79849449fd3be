"""Celery tasks of the model registry and the retraining loop (``fusionrank.model.*``, admin queue).

``fusionrank.model.retrain`` runs :func:`workers.retrain.retrain` (it trains only when enough new behaviour
arrived, unless forced; one run at a time; a redelivered run after a finished one skips). With
``retrain_check_interval_s`` > 0, ``celery beat`` sends it on that schedule (:data:`workers.celery_app`).
``fusionrank.model.promote`` / ``fusionrank.model.rollback`` move the registry's ``current`` link.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from workers.celery_app import RETRY, app


@lru_cache(maxsize=1)
def _settings():
    from workers.settings import load_settings

    return load_settings()


@app.task(name="fusionrank.model.retrain", **RETRY)
def retrain_task(force: bool = False, queries: str | None = None, qrels: str | None = None,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrain from the store's UBI log when enough new behaviour arrived; promote the candidate only when it beats
    the serving model by the margin on held-out behaviour (and on ``qrels``, when given)."""
    from workers.retrain import retrain

    return retrain(_settings(), force=force, queries=Path(queries) if queries else None, qrels=Path(qrels) if qrels else None,
                   options=options)


@app.task(name="fusionrank.model.promote")
def promote_task(version: str, reason: str = "by hand (task)") -> dict[str, Any]:
    from workers.retrain import registry_of

    return registry_of(_settings()).promote(version, reason=reason)


@app.task(name="fusionrank.model.rollback")
def rollback_task(reason: str = "by hand (task)") -> dict[str, Any]:
    from workers.retrain import registry_of

    return registry_of(_settings()).rollback(reason=reason)

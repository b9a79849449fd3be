"""The Celery app: queues, the routing/retry table, and reliability settings.

Queues: ``embed`` (batches that encode and write; the queue a GPU machine consumes), ``index``
(light engine work), ``admin`` (reindex jobs, the model registry and the retraining loop: ``fusionrank.model.*``). Tasks are acknowledged late and rejected back to the
queue when their worker dies, so a killed worker's batch is redelivered; the tasks are idempotent,
so redelivery is safe. Start a worker with ``fusionrank worker`` or
``celery -A workers.celery_app worker -Q embed,index,admin``; ``celery -A workers.celery_app beat`` sends the
retrain check (``fusionrank.model.retrain``) every ``retrain_check_interval_s`` seconds.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from indexing.errors import EngineUnavailableError
from workers.settings import Settings, load_settings

QUEUES = ("embed", "index", "admin")

#: The one routing table: task name -> queue. Retries live beside it.
ROUTES: dict[str, dict[str, str]] = {
    "fusionrank.index_batch": {"queue": "embed"},
    "fusionrank.refresh_index": {"queue": "index"},
    "fusionrank.reindex.*": {"queue": "admin"},
    "fusionrank.reindex_fill_batch": {"queue": "embed"},
    "fusionrank.model.*": {"queue": "admin"},
}

#: Transient errors only: retried with exponential backoff and jitter, a bounded number of times.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (EngineUnavailableError, ConnectionError, TimeoutError)
RETRY = {"autoretry_for": TRANSIENT_ERRORS, "retry_backoff": 2, "retry_backoff_max": 60, "retry_jitter": True, "max_retries": 5}


def create_app(settings: Settings) -> Celery:
    app = Celery("fusionrank", broker=settings.broker_url, backend=_result_backend(settings), include=["workers.tasks", "workers.reindex_tasks", "workers.model_tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue="index",
        task_routes=ROUTES,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        # Redis keeps an unacknowledged message invisible this long before another worker may take it;
        # after a worker is killed its batch comes back once this has passed.
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        worker_hijack_root_logger=False,
    )
    if settings.retrain_check_interval_s > 0:  # celery beat: the loop checks for new behaviour (it trains only when enough arrived)
        app.conf.beat_schedule = {"fusionrank-retrain-check": {"task": "fusionrank.model.retrain",
                                                               "schedule": float(settings.retrain_check_interval_s)}}
    return app


def _result_backend(settings: Settings) -> str:
    if settings.result_backend:
        return settings.result_backend
    if settings.broker_url.startswith(("amqp", "pyamqp")):
        return "rpc://"  # RabbitMQ: results travel back on a reply queue
    return settings.broker_url


app = create_app(load_settings())

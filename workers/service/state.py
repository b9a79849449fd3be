"""What the HTTP service serves: :class:`ServiceState` (``request.app.state.fusionrank``).

Built once per process: :meth:`ServiceState.from_settings` wires engine, model, encoders and history
through :func:`workers.composition.build_reranker`; :meth:`ServiceState.loading` makes an empty
state that :meth:`ServiceState.load` fills later (``fusionrank serve`` loads in the background so that
``/healthz`` answers at once and ``/readyz`` turns 200 only when the model is in memory).
Tests build one directly from parts (:meth:`ServiceState.from_reranker`).

:meth:`ServiceState.reload` swaps in a freshly loaded reranker (``POST /admin/reload``); requests in
flight finish on the old one. :meth:`ServiceState.check_model_link` follows a promotion: a state with
``watch_model`` (``fusionrank serve``) looks at where the model link (``<data_dir>/models/current``, see
:mod:`rerank.model.registry`) points at most once per ``watch_interval_s``, from the request path; when it moved, a
background thread loads the new target and swaps it in, and requests go on being served by the old model until
then (no request fails or waits for the load).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from indexing.errors import ConfigError
from workers.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


_CELERY: dict[str, Any] = {}  # broker URL -> the Celery app that queues on it (one per process: one connection pool)
_CELERY_LOCK = threading.Lock()


def _celery_for(settings: Any) -> Any:
    from workers.celery_app import create_app as create_celery  # the process edge: lazily

    with _CELERY_LOCK:
        app = _CELERY.get(settings.broker_url)
        if app is None:
            app = _CELERY[settings.broker_url] = create_celery(settings)
        return app


def _submit_reindex_celery(settings: Any, params: dict[str, Any]) -> dict[str, str]:
    """Queue a ``fusionrank.reindex.start`` task on the admin queue; ``{"task_id", "job_id"}``.

    The job reports through its job row in the SQL store, not a Celery result, so the task is sent with
    ``ignore_result``: no result-backend subscription per request (with Redis down, that subscription alone
    retried for 20 s before failing the request)."""
    job_id = uuid.uuid4().hex
    kwargs = {
        "job_id": job_id, "alias": settings.index_alias, "mapping": params.get("mapping") or settings.mapping,
        "text_model": params.get("text_model") or settings.text_model,
        "text_backend": params.get("text_backend") or settings.text_backend,
        "image_model": params.get("image_model") or settings.image_model,
        "images_root": params.get("images_root"), "batch_size": int(params.get("batch_size") or 256),
    }
    res = _celery_for(settings).send_task("fusionrank.reindex.start", kwargs=kwargs, ignore_result=True, retry=True,
                                          retry_policy={"max_retries": 1, "interval_start": 0.2})
    return {"task_id": res.id, "job_id": job_id}


#: model-endpoint threads beyond the reranker gate's size (:meth:`ServiceState.model_limiter`)
MODEL_THREAD_SLACK = 1


class FifoGate:
    """At most ``size`` holders at once, admitted strictly in arrival order (a context manager).

    ``threading.(Bounded)Semaphore`` lets a newcomer take a permit that was just released before the waiter it woke
    gets to run; that waiter then waits again at the *back* of the queue. With requests arriving all the time at the
    gate (one reranker call per process), a few requests lost the race again and again: ``bench serve`` at
    concurrency 8 had p99 3-4x its p50 (~200 ms -> 650-820 ms). Here :meth:`release` hands the permit to the oldest
    waiter directly, so a request waits for the calls ahead of it and no others."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"gate size must be >= 1, got {size}")
        self.size = size
        self._free = size
        self._lock = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self) -> None:
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return
            me = threading.Lock()
            me.acquire()
            self._waiters.append(me)
        me.acquire()  # released by release(), which passed its permit to us

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()
            elif self._free >= self.size:
                raise ValueError("FifoGate released more times than acquired")
            else:
                self._free += 1

    def __enter__(self) -> "FifoGate":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def waiting(self) -> int:
        """Calls queued at the gate now."""
        return len(self._waiters)


@dataclass
class ServiceState:
    """Shared state of one app. ``reranker``/``engine``/... are ``None`` until :attr:`ready`."""

    settings: Any  # workers.settings.Settings
    engine: Any = None
    index: str | None = None
    reranker: Any = None  # rerank.reranker.Reranker
    history_store: Any = None  # rerank.history.HistoryStore | None
    profiles: Any = None  # rerank.history.ProfileService | None
    images_root: Path | None = None
    image_encoder: Any = None
    ready: bool = False
    auth_enabled: bool = True
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    error: str | None = None  # why loading failed
    #: ``(settings, params) -> {"task_id", "job_id"}``; queues a reindex (default: Celery admin queue)
    submit_reindex: Callable[[Any, dict[str, Any]], dict[str, str]] = _submit_reindex_celery
    #: ``(settings) -> Reranker``; how :meth:`reload` (and :meth:`load`) build the reranker
    loader: Callable[[Any], Any] | None = None
    #: called with the exception when the background load at start-up fails (``fusionrank serve`` stops the server)
    on_load_error: Callable[[BaseException], None] | None = None
    #: most reranker calls running at once in this process (the ``serve_max_concurrent`` setting); default: 1 for a CPU
    #: model (Python holds the GIL for most of a call: two at once only stretch both past the budget; scale with
    #: ``--workers``), 32 for a micro-batched (CUDA) model, whose batches fill from concurrent calls
    max_concurrent: int | None = None
    #: after a (re)load, collect once and :func:`gc.freeze` what is alive (see :meth:`_freeze_heap`); set by
    #: ``fusionrank serve`` (``ServiceState.loading(..., freeze_gc=True)``), not for states built in tests
    freeze_gc: bool = False
    #: follow the model link (:meth:`check_model_link`): a promoted model is loaded in the background and swapped in
    watch_model: bool = False
    watch_interval_s: float = 1.0
    #: the model directory the served reranker was loaded from (the link's target, resolved at load time)
    model_path: str | None = None
    #: writes what /search and /rerank served into the store's UBI tables (rerank.history.ubi_recorder); made at the first
    #: install when there is a history store and ``settings.ubi_record`` is on
    ubi_recorder: Any = None
    _next_check: float = field(default=0.0, repr=False)
    _reloading: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _failed_target: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    gate: FifoGate = field(init=False, repr=False)
    gate_size: int = field(init=False, default=1)
    _model_limiter: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        self.gate_size = self.max_concurrent or 1
        self.gate = FifoGate(self.gate_size)

    def model_limiter(self) -> Any:
        """The thread slots of the model endpoints (:func:`workers.service.app._in_model_thread`): an anyio
        ``CapacityLimiter`` of :attr:`gate_size` + :data:`MODEL_THREAD_SLACK` tokens (the next call already sits on a
        thread when the running one leaves the gate). Made on first use, in the event loop; a reload that changes
        the gate's size gets a new one (calls in flight give their slot back to the old one)."""
        lim = self._model_limiter
        want = self.gate_size + MODEL_THREAD_SLACK
        if lim is None or lim.total_tokens != want:
            import anyio

            lim = self._model_limiter = anyio.CapacityLimiter(want)
        return lim

    # ------------------------------------------------------------------ construction
    @classmethod
    def loading(cls, settings: Any, *, auth: bool = True, images_root: Path | None = None, loader: Callable[[Any], Any] | None = None,
                freeze_gc: bool = False) -> "ServiceState":
        """An empty, not-ready state; :meth:`load` fills it."""
        return cls(settings=settings, auth_enabled=auth, images_root=images_root, loader=loader, freeze_gc=freeze_gc,
                   max_concurrent=getattr(settings, "serve_max_concurrent", None))

    @classmethod
    def from_settings(cls, settings: Any = None, *, auth: bool = True, images_root: Path | None = None) -> "ServiceState":
        """Load everything now (``build_reranker``); raises what loading raises."""
        if settings is None:
            from workers.settings import load_settings

            settings = load_settings()
        st = cls.loading(settings, auth=auth, images_root=images_root)
        st.load()
        return st

    @classmethod
    def from_reranker(cls, settings: Any, reranker: Any, *, auth: bool = True, images_root: Path | None = None) -> "ServiceState":
        """A ready state around an already built reranker (tests, benchmarks)."""
        st = cls(settings=settings, auth_enabled=auth, images_root=images_root, loader=lambda s: reranker,
                 max_concurrent=getattr(settings, "serve_max_concurrent", None))
        st._install(reranker)
        return st

    # ------------------------------------------------------------------ (re)loading
    def _link_target(self) -> str | None:
        """The resolved model directory of the settings (``current``'s target now), or None without settings."""
        d = getattr(self.settings, "effective_model_dir", None) if self.settings is not None else None
        return os.path.realpath(d) if d is not None else None

    def _build(self, target: str | None = None) -> Any:
        """A reranker over ``target`` (a resolved model directory; default: where the link points now). The settings
        handed to the loader name the resolved directory, so a promotion during the load cannot mix two models."""
        target = target or self._link_target()
        settings = self.settings
        if target is not None and hasattr(settings, "model_copy"):
            settings = settings.model_copy(update={"model_dir": Path(target)})
        if self.loader is not None:
            r = self.loader(settings)
        else:
            from workers.composition import build_reranker

            r = build_reranker(settings)
        self.model_path = target
        return r

    def check_model_link(self) -> None:
        """Called on the request path (cheap: one ``realpath`` at most every ``watch_interval_s``): when the model link
        points somewhere else than the loaded model, load the new target on a background thread and swap it in.
        A target that failed to load is not retried until the link moves again (the old model keeps serving; the
        failure is logged and counted in ``/metrics`` as ``fusionrank_model_reload_failures_total``)."""
        if not self.watch_model or not self.ready:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.watch_interval_s
        try:
            target = self._link_target()
        except OSError:
            return
        if target is None or target == self.model_path or target == self._failed_target:
            return
        if not self._reloading.acquire(blocking=False):
            return  # a load is running already
        threading.Thread(target=self._follow, args=(target,), name="fusionrank-model-follow", daemon=True).start()

    def _follow(self, target: str) -> None:
        try:
            old = self.model_version
            t = time.perf_counter()
            reranker = self._build(target)
            self._install(reranker)
            self._freeze_heap()
            self._failed_target = None
            self.metrics.count_reload(ok=True)
            log.info("model link moved: %s -> %s (%s), loaded in %.1f s", old, self.model_version, target, time.perf_counter() - t)
        except Exception as e:
            self._failed_target = target
            self.metrics.count_reload(ok=False)
            log.error("model link moved to %s, but it failed to load (still serving %s): %s: %s", target, self.model_version,
                      type(e).__name__, e)
        finally:
            self._reloading.release()

    def _install(self, reranker: Any) -> None:
        profiles = reranker.history
        n = self.max_concurrent or (32 if getattr(reranker, "batcher", None) is not None else 1)
        with self._lock:
            if n != self.gate_size:  # calls in flight release the gate they took
                self.gate, self.gate_size = FifoGate(n), n
            self.reranker = reranker
            self.engine, self.index = reranker.engine, reranker.index
            self.profiles = profiles
            self.history_store = getattr(profiles, "store", None) if profiles is not None else None
            self.image_encoder = reranker.image_encoder
            if self.images_root is None and self.settings is not None:
                self.images_root = getattr(self.settings, "fashion_dir", None)
            self.error = None
            self.ready = True
            if self.history_store is not None and getattr(self.settings, "ubi_record", True):
                if self.ubi_recorder is None:
                    from rerank.history.ubi_recorder import UbiRecorder

                    self.ubi_recorder = UbiRecorder(self.history_store)
                    self.metrics.ubi_stats = self.ubi_recorder.stats
                else:
                    self.ubi_recorder.store = self.history_store  # a reload's new store
        self.metrics.set_model(self.model_version, getattr(reranker, "model_runtime", None))

    def _freeze_heap(self) -> None:
        """Collect once, then move every object alive now (model, encoders, engine, libraries: ~600 000 tracked
        objects) into the GC's permanent generation.

        Python's cyclic GC walks all tracked objects in a full (generation 2) collection: ~460 ms in a serving
        process here, and under load (requests waiting at the gate survive into the old generation) one came every
        few hundred requests, stalling the call in progress and everything queued behind it (``bench serve``
        c=8: p99 ~800 ms for a p50 of ~180 ms; one rerank of 434 ms of which 17 ms were its stages). Frozen objects
        are still freed by reference counting; only cycles among them wait for :meth:`reload`, which unfreezes and
        collects first. A full collection after the freeze takes ~0.1 ms."""
        if not self.freeze_gc:
            return
        t = time.perf_counter()
        gc.unfreeze()  # a reload: the previous model's objects become collectable again
        gc.collect()
        gc.freeze()
        log.info("gc: %d objects frozen after loading (%.0f ms)", gc.get_freeze_count(), (time.perf_counter() - t) * 1000)

    def load(self) -> None:
        """Build the reranker (once, at start-up) and mark the state ready; records and re-raises a failure."""
        try:
            reranker = self._build()
            self._freeze_heap()
            self._install(reranker)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            raise
        log.info("service ready: model %s, index %r", self.model_version, self.index)

    def reload(self) -> str | None:
        """Load the model again from settings and swap it in; returns the new model version."""
        old = self.model_version
        with self._reloading:
            self._install(self._build())
        self._freeze_heap()  # after the swap: the old reranker is collected (unless a call in flight still holds it: then at the next reload)
        log.info("model reloaded: %s -> %s", old, self.model_version)
        return self.model_version

    @property
    def model_version(self) -> str | None:
        r = self.reranker
        return None if r is None or r.model is None else r.model.version

    @property
    def explore(self) -> Any:
        """The :class:`rerank.explore.ExploreConfig` of the settings (none: exploration off)."""
        from rerank.explore import ExploreConfig

        return self.settings.explore_config() if self.settings is not None else ExploreConfig()

    def record_served(self, query_id: str, query: str, hit_ids: list[str], *, user_id: str | None, client_id: str | None) -> None:
        """Queue what a /search or /rerank answer served for the UBI tables; never raises (fail-open, counted)."""
        rec = self.ubi_recorder
        if rec is None:
            return
        try:
            rec.record(query_id, query, hit_ids, user_id=user_id, client_id=client_id)
        except Exception as e:  # pragma: no cover - record() only queues
            log.warning("UBI recording of %s failed: %s", query_id, e)

    def check_auth_config(self) -> None:
        """Refuse to serve with auth enabled but no API key configured."""
        key = getattr(self.settings, "api_key", None)
        if self.auth_enabled and (key is None or not key.get_secret_value()):
            raise ConfigError(
                "no API key configured: set FUSIONRANK_API_KEY (and FUSIONRANK_ADMIN_API_KEY for /admin), "
                "or start with `fusionrank serve --no-auth` for local development only"
            )


__all__ = ["FifoGate", "ServiceState"]

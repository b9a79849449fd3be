"""``fusionrank drill``: reliability drills on the HTTP service against real local services.

What it starts (all private to the drill and removed at the end, see :mod:`workers.drill.services`):
a PostgreSQL cluster (the history store), a Redis server (the Celery broker that ``/admin/reindex`` queues
on), a synthetic world (:func:`workers.bench.serve.build_synthetic_world`: a generated catalog indexed in a
LocalEngine with the real MiniLM encoder, an **untrained** FusionRanker artifact, simulated shoppers' events),
and the service itself (:func:`workers.service.app.create_app` on a real uvicorn server on loopback, in a thread
of this process, API and admin keys on).

A steady loopback load runs through every drill: ``clients`` threads in a closed loop, each sending a mix of
``POST /search`` (with a shopper), ``POST /rerank`` (an OpenSearch response of 100 hits without vectors, so the
service fetches them) and ``POST /events`` (one new event with a unique id). Each request is counted in the
drill that was running when it was sent. The drills, in order:

``baseline``           nothing broken.
``redis_down``         the broker stopped (SIGTERM) and started again; ``/admin/reindex`` is probed throughout.
``postgres_down``      the history store stopped (fast shutdown) and started again; ``/events`` is probed.
``engine_down``        the LocalEngine's folder moved away (files gone: as root, permissions would not stop a
                       read) and moved back; ``/search`` is probed.
``opensearch_refused`` the service switched to an OpenSearch engine at a loopback port nothing listens on, then
                       back.
``model_raises``       the model's scoring call made to raise (injected), then restored.
``hostile_input``      malformed, oversized and wrong requests, each answered 4xx; an unknown shopper (cold start).
``access``             every route of the app without a key, with a wrong key, and (admin routes) with the user key:
                       401/403 everywhere but health, readiness and the page's static files.
``load``               ``load_seconds`` of the mixed load alone; RSS sampled each second.

Expected refusals are the documented answers to a dependency that is down: 503 from ``/admin/reindex`` while
the broker is down, from ``/events`` while PostgreSQL is down (refused, never accepted and dropped), from
``/search`` while the engine is down (no first stage to fall back to). Every other 5xx is unexpected. A rerank
that fails open answers 200 with ``fusionrank.degraded`` set; those counts are read from ``/metrics``.

Secrets: the API and admin keys and the OpenSearch password of the ``opensearch_refused`` drill (in its URL) are
watched for in every log record (a handler on the root logger), every response body and ``/metrics``; the report
gives the counts (``secrets_seen``), which must be 0.

``lost`` counts what was accepted and is not there afterwards: events answered 200 that are not in the database
at the end, and reindex tasks answered 202 that are not in the broker's queue after its restart (no worker runs
during the drill, so accepted tasks wait there).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from indexing.errors import FusionRankError

log = logging.getLogger(__name__)

DRILLS = ("baseline", "redis_down", "postgres_down", "engine_down", "opensearch_refused", "model_raises", "hostile_input", "access", "load")
#: what answers without a key
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/static/{file}"})
#: (drill, endpoint, status): the documented answers to a dependency that is down
EXPECTED_REFUSALS = {
    ("redis_down", "/admin/reindex", 503), ("postgres_down", "/events", 503),
    ("engine_down", "/search", 503), ("opensearch_refused", "/search", 503),
}
#: the load mix: (endpoint, weight)
MIX = (("/search", 4), ("/rerank", 4), ("/events", 2))
EVENT_PREFIX = "drill-"
_METRIC = re.compile(r'^fusionrank_degraded_total\{reason="([^"]+)"\} ([0-9.eE+-]+)$', re.M)


@dataclass
class Rec:
    drill: str
    endpoint: str
    status: int  # 0: no HTTP answer (connection error, timeout)
    degraded: str | None = None
    detail: str | None = None  # the error message of a 5xx or transport failure
    t0: float = 0.0  # monotonic send and answer times: a request in flight while a fault was on may meet it
    t1: float = 0.0


class SecretWatch(logging.Handler):
    """Counts log records whose text (message, arguments, traceback) contains one of ``secrets``."""

    def __init__(self, secrets_: Sequence[str]):
        super().__init__(logging.DEBUG)
        self.secrets = [x for x in secrets_ if x]
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += logging.Formatter().formatException(record.exc_info)
        except Exception:
            text = str(record.msg)
        if any(x in text for x in self.secrets):
            self.hits += 1


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def degraded_counts(metrics_text: str) -> Counter:
    """``fusionrank_degraded_total`` by reason, from the Prometheus text of ``/metrics``."""
    return Counter({m.group(1): int(float(m.group(2))) for m in _METRIC.finditer(metrics_text)})


class Traffic:
    """The recorder every request goes through (load threads and probes alike)."""

    def __init__(self, base_url: str, api_key: str, admin_key: str):
        self.base_url, self.api_key, self.admin_key = base_url, api_key, admin_key
        self.drill = "setup"
        self.recs: list[Rec] = []
        self.accepted_events: dict[str, str] = {}  # event id -> drill it was accepted in
        self.accepted_tasks: dict[str, str] = {}  # reindex task id -> drill
        self.faults: list[tuple[str, float, float]] = []  # (drill, from, to): when a dependency was down
        self.secrets: list[str] = [api_key, admin_key]  # no response may carry one (an error echoing a header, say)
        self.secrets_in_responses = 0
        self._lock = threading.Lock()

    @contextmanager
    def fault(self, drill: str) -> Iterator[None]:
        """Marks the time a dependency is down; :meth:`expected` judges requests in flight meanwhile."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.faults.append((drill, t0, time.monotonic()))

    def expected(self, r: Rec) -> bool:
        """A documented refusal: the answer a dependency that was down while ``r`` was in flight gives."""
        return any((name, r.endpoint, r.status) in EXPECTED_REFUSALS and r.t0 <= b and r.t1 >= a for name, a, b in self.faults)

    def client(self):
        import httpx

        return httpx.Client(base_url=self.base_url, timeout=30.0, headers={"X-API-Key": self.api_key})

    def send(self, client: Any, endpoint: str, *, json_body: Any = None, content: bytes | None = None,
             headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, Any]:
        drill = self.drill
        t0 = time.monotonic()
        try:
            r = client.request(method, endpoint, json=json_body, content=content, headers=headers)
            status = r.status_code
            leaked = any(x in r.text for x in self.secrets)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        except Exception as e:  # a transport failure is recorded, not raised: the drill goes on
            log.warning("%s during %s: %s: %s", endpoint, drill, type(e).__name__, e)
            status, body, leaked = 0, {"detail": f"{type(e).__name__}: {e}"}, False
        degraded = body.get("fusionrank", {}).get("degraded") if status == 200 and isinstance(body, dict) and endpoint in ("/search", "/rerank") else None
        detail = str(body.get("detail") if isinstance(body, dict) else body)[:300] if status == 0 or status >= 500 else None
        with self._lock:
            self.recs.append(Rec(drill, endpoint, status, degraded, detail, t0, time.monotonic()))
            self.secrets_in_responses += leaked
            if endpoint == "/events" and status == 200 and isinstance(json_body, dict):
                n = len(json_body["events"])
                if body.get("stored", 0) + body.get("duplicates", 0) == n:
                    for e in json_body["events"]:
                        self.accepted_events[e["event_id"]] = drill
            if endpoint == "/admin/reindex" and status == 202:
                self.accepted_tasks[body["task_id"]] = drill
        return status, body


class Load:
    """``clients`` threads sending the mixed load until stopped."""

    def __init__(self, traffic: Traffic, rerank_bodies: Sequence[dict[str, Any]], users: Sequence[str], product_ids: Sequence[str],
                 clients: int, seed: int = 0):
        self.t, self.bodies, self.users, self.products = traffic, list(rerank_bodies), list(users), list(product_ids)
        self.clients, self.seed = clients, seed
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def body(self, endpoint: str, rnd: random.Random) -> dict[str, Any]:
        b = rnd.choice(self.bodies)
        if endpoint == "/search":
            return {"query": b["query"], "user_id": rnd.choice(self.users), "size": 10}
        if endpoint == "/rerank":
            return {"query": b["query"], "response": b["response"], "user_id": rnd.choice(self.users)}
        return {"events": [{"event_id": f"{EVENT_PREFIX}{uuid.uuid4().hex}", "user_id": rnd.choice(self.users),
                            "product_id": rnd.choice(self.products), "type": rnd.choice(("view", "click", "add_to_cart", "purchase"))}]}

    def _run(self, k: int) -> None:
        rnd = random.Random(self.seed * 1000 + k)
        endpoints = [e for e, w in MIX for _ in range(w)]
        with self.t.client() as c:
            while not self._stop.is_set():
                ep = rnd.choice(endpoints)
                self.t.send(c, ep, json_body=self.body(ep, rnd))

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, args=(k,), name=f"drill-load-{k}", daemon=True) for k in range(self.clients)]
        for th in self._threads:
            th.start()

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout=60)


class _Server:
    """uvicorn serving ``app`` on loopback in a daemon thread."""

    def __init__(self, app: Any, port: int):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="drill-uvicorn", daemon=True)

    def start(self) -> None:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 60:
                raise FusionRankError("the drill's uvicorn server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _wait_until(check: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> float | None:
    """Seconds until ``check()`` held, or None after ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if check():
            return round(time.monotonic() - t0, 2)
        time.sleep(every_s)
    return None


@dataclass
class Drill:
    name: str
    notes: str = ""
    recovered: bool | None = None
    recovery_s: float | None = None
    lost: int = 0
    degraded: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class DrillRun:
    """One run of all drills; :meth:`run` returns the JSON-ready report."""

    def __init__(self, *, hold_s: float = 5.0, load_s: float = 600.0, clients: int = 4, size: int = 300, seed: int = 0,
                 progress: Callable[[str], None] | None = None):
        self.hold_s, self.load_s, self.clients, self.size, self.seed = hold_s, load_s, clients, size, seed
        self.say = progress or (lambda msg: log.info("%s", msg))
        self.drills: list[Drill] = []
        self.api_key, self.admin_key, self.os_password = (secrets.token_urlsafe(24) for _ in range(3))
        self.watch = SecretWatch([self.api_key, self.admin_key, self.os_password])
        self.secrets_in_metrics = 0

    # ------------------------------------------------------------------ set-up
    def run(self) -> dict[str, Any]:
        from workers.drill.services import PrivatePostgres, PrivateRedis

        tmp = Path(tempfile.mkdtemp(prefix="fusionrank-drill-"))
        pg = redis = server = load = None
        t_start = time.monotonic()
        logging.getLogger().addHandler(self.watch)
        try:
            self.say("starting a private PostgreSQL and Redis")
            pg = PrivatePostgres().init()
            pg.start()
            redis = PrivateRedis()
            redis.start()
            self.pg, self.redis = pg, redis
            server, traffic, load = self._serve(tmp, pg.url, redis.url)
            self.traffic, self.load = traffic, load
            load.start()
            for name in DRILLS:
                self.say(f"drill {name}")
                traffic.drill = name
                before = self._degraded()
                d = getattr(self, f"_drill_{name}")()
                d.degraded = {k: v for k, v in (self._degraded() - before).items() if v}
                self.drills.append(d)
            traffic.drill = "teardown"
            load.stop()
            load = None
            self._count_lost()
            return self._report(time.monotonic() - t_start)
        finally:
            logging.getLogger().removeHandler(self.watch)
            if load is not None:
                load.stop()
            if server is not None:
                server.stop()
            for svc in (redis, pg):
                if svc is not None:
                    svc.close()
            shutil.rmtree(tmp, ignore_errors=True)

    def _serve(self, tmp: Path, sql_url: str, broker_url: str) -> tuple[_Server, Traffic, Load]:
        from workers.composition import build_reranker
        from workers.service.app import create_app
        from workers.bench.serve import N_USERS, build_synthetic_world, make_requests, world_settings
        from workers.drill.services import free_port
        from workers.service.state import ServiceState

        self.say(f"building a synthetic world of {self.size} products (real MiniLM vectors, untrained model)")
        env = build_synthetic_world(tmp / "data", size=self.size, seed=self.seed, sql_url=sql_url)
        # a budget far above this machine's latency under load: a degraded answer then means a broken dependency
        settings = world_settings(env, api_key=self.api_key, admin_api_key=self.admin_key, broker_url=broker_url, rerank_budget_ms=5000.0)
        self.settings = settings
        reranker = build_reranker(settings)
        self.reranker = reranker
        state = ServiceState.from_reranker(settings, reranker, images_root=tmp / "data" / "catalog")
        self.state = state
        users = [f"bench-u{u}" for u in range(N_USERS)] + [f"drill-new-{k}" for k in range(5)]
        bodies = make_requests(reranker.engine, reranker.index, 50, 100, users=users, seed=self.seed)
        pids = [d["product_id"] for d in reranker.engine.iter_documents(reranker.index, batch_size=500)]
        port = free_port()
        self.app = create_app(state)
        server = _Server(self.app, port)
        server.start()
        traffic = Traffic(f"http://127.0.0.1:{port}", self.api_key, self.admin_key)
        traffic.secrets.append(self.os_password)
        return server, traffic, Load(traffic, bodies, users, pids, self.clients, self.seed)

    # ------------------------------------------------------------------ helpers
    def _degraded(self) -> Counter:
        with self.traffic.client() as c:
            r = c.get("/metrics")
            r.raise_for_status()
            self.secrets_in_metrics += sum(x in r.text for x in self.watch.secrets)
            return degraded_counts(r.text)

    def _probe(self, endpoint: str, body: Any = None, *, admin: bool = False) -> tuple[int, Any]:
        headers = {"X-API-Key": self.traffic.admin_key} if admin else None
        with self.traffic.client() as c:
            return self.traffic.send(c, endpoint, json_body=body, headers=headers)

    def _search_body(self) -> dict[str, Any]:
        return self.load.body("/search", random.Random())

    def _hold(self, probe: Callable[[], Any] | None = None, every_s: float = 1.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.hold_s:
            if probe is not None:
                probe()
            time.sleep(every_s)

    # ------------------------------------------------------------------ the drills
    def _drill_baseline(self) -> Drill:
        status, _ = self._probe("/admin/reindex", {}, admin=True)  # queued before the broker goes down: must survive it
        self._hold()
        return Drill("baseline", notes=f"no fault; one reindex queued (HTTP {status}) to check it survives the broker restart")

    def _drill_redis_down(self) -> Drill:
        with self.traffic.fault("redis_down"):
            self.redis.stop()
            self._hold(lambda: self._probe("/admin/reindex", {}, admin=True), every_s=0.5)
            self.redis.start()
        rec = _wait_until(lambda: self._probe("/admin/reindex", {}, admin=True)[0] == 202, 60)
        return Drill("redis_down", recovered=rec is not None, recovery_s=rec,
                     notes="broker stopped (SIGTERM) under load; /admin/reindex answered 503 while down; searches never touch it; "
                           "restarted on the same port, AOF kept the queued tasks")

    def _drill_postgres_down(self) -> Drill:
        ev = lambda: self._probe("/events", self.load.body("/events", random.Random()))  # noqa: E731
        with self.traffic.fault("postgres_down"):
            self.pg.stop()
            self._hold(ev, every_s=0.5)
            self.pg.start()
        rec = _wait_until(lambda: ev()[0] == 200, 60)
        return Drill("postgres_down", recovered=rec is not None, recovery_s=rec,
                     notes="history store stopped (fast shutdown) under load: reranks failed open (history_error), "
                           "/events refused with 503 (nothing accepted and dropped); recovered without a restart")

    def _drill_engine_down(self) -> Drill:
        root = Path(self.settings.data_dir) / "engine"
        away = root.with_name("engine.away")
        with self.traffic.fault("engine_down"):
            os.replace(root, away)
            try:
                self._hold(lambda: self._probe("/search", self._search_body()))
            finally:
                os.replace(away, root)
        rec = _wait_until(lambda: self._clean("/search", self._search_body()), 60)
        return Drill("engine_down", recovered=rec is not None, recovery_s=rec,
                     notes="LocalEngine folder moved away under load: /search 503 (no first stage), /rerank failed open "
                           "(engine_error: vectors could not be fetched); moved back, recovered without a restart")

    def _clean(self, endpoint: str, body: Any) -> bool:
        status, out = self._probe(endpoint, body)
        return status == 200 and out["fusionrank"]["degraded"] is None

    def _drill_opensearch_refused(self) -> Drill:
        from indexing.engines.opensearch import OpenSearchEngine
        from rerank.reranker import Reranker
        from workers.drill.services import free_port

        r = self.reranker
        url = f"http://fusionrank:{self.os_password}@127.0.0.1:{free_port()}"  # its password must show up nowhere
        dead = OpenSearchEngine(url, timeout_s=2.0)
        with self.traffic.fault("opensearch_refused"):
            self.state._install(Reranker(dead, r.index, r.model, text_encoder=r.text_encoder, image_encoder=r.image_encoder,
                                         history=r.history, budget_ms=r.budget_ms, stands_in_for=r.stands_in_for))
            try:
                self._hold(lambda: self._probe("/search", self._search_body()))
            finally:
                self.state._install(r)
        rec = _wait_until(lambda: self._clean("/search", self._search_body()), 60)
        return Drill("opensearch_refused", recovered=rec is not None, recovery_s=rec,
                     notes="engine switched to OpenSearch at a port that refuses connections: /search 503, /rerank failed open "
                           "(engine_error); switched back")

    def _drill_model_raises(self) -> Drill:
        scorer = self.reranker.scorer  # what runs the forward pass: the torch ranker or its ONNX export

        def boom(*a: Any, **k: Any) -> Any:
            raise RuntimeError("injected model failure (drill)")

        scorer.score = boom  # shadows the method on this instance only
        try:
            self._hold(lambda: self._probe("/rerank", self.load.body("/rerank", random.Random())))
        finally:
            del scorer.score
        rec = _wait_until(lambda: self._clean("/rerank", self.load.body("/rerank", random.Random())), 60)
        return Drill("model_raises", recovered=rec is not None, recovery_s=rec,
                     notes="the model's scoring call raised (injected): /search and /rerank answered 200 in first-stage order "
                           "(model_error)")

    def _drill_hostile_input(self) -> Drill:
        import httpx

        t = self.traffic
        limit = int(self.settings.max_request_bytes)
        bodies: list[tuple[str, str, dict[str, Any], set[int]]] = [
            ("malformed JSON", "/search", {"content": b'{"query": "shoes",', "headers": {"content-type": "application/json"}}, {422}),
            ("wrong type", "/search", {"json_body": {"query": 5}}, {422}),
            ("empty query", "/search", {"json_body": {"query": "  "}}, {422}),
            ("image not an image", "/search", {"json_body": {"query": "", "image": "aGVsbG8gd29ybGQ="}}, {422}),
            ("bad base64", "/search", {"json_body": {"query": "x", "image": "%%%"}}, {422}),
            ("too many documents", "/v1/rerank", {"json_body": {"query": "x", "documents": ["d"] * (int(self.settings.max_candidates) + 1)}}, {422}),
            ("body too large", "/rerank", {"content": b"{" + b" " * (limit + 1) + b"}", "headers": {"content-type": "application/json"}}, {413}),
            ("query too long", "/search", {"json_body": {"query": "shoe " * 1000}}, {422}),
            ("NUL in query", "/search", {"json_body": {"query": "shoes\x00"}}, {422}),
            ("bad event type", "/events", {"json_body": {"events": [{"user_id": "u", "product_id": "p", "type": "hack"}]}}, {200}),
            ("no key", "/search", {"json_body": {"query": "shoes"}, "headers": {"X-API-Key": ""}}, {401}),
            ("user key on admin", "/admin/reload", {"json_body": None}, {401, 403}),
            ("unknown shopper (cold start)", "/search", {"json_body": {"query": "shoes", "user_id": f"nobody-{uuid.uuid4().hex}"}}, {200}),
        ]
        wrong = []
        with httpx.Client(base_url=t.base_url, timeout=30.0, headers={"X-API-Key": t.api_key}) as c:
            for _ in range(max(1, int(self.hold_s // 2))):
                for what, ep, kw, ok in bodies:
                    status, out = t.send(c, ep, **kw)
                    if status not in ok:
                        wrong.append(f"{what}: HTTP {status}")
                    elif what == "bad event type" and not (isinstance(out, dict) and out.get("rejected") == 1):
                        wrong.append(f"{what}: not rejected ({out})")
        return Drill("hostile_input", extra={"cases": len(bodies), "wrong_answers": sorted(set(wrong))},
                     notes="each hostile request got its 4xx naming the problem (bad events rejected one by one with 200); "
                           "an unknown shopper is a cold start (200)")

    def _drill_access(self) -> Drill:
        import httpx

        t = self.traffic
        wrong: list[str] = []
        routes = 0
        who = [("no key", {}, {401}), ("wrong key", {"X-API-Key": "not-" + secrets.token_urlsafe(8)}, {401}),
               ("wrong bearer", {"Authorization": "Bearer not-" + secrets.token_urlsafe(8)}, {401})]
        with httpx.Client(base_url=t.base_url, timeout=30.0) as c:  # no default key
            for route, ops in self.app.openapi()["paths"].items():  # every documented route
                if route in PUBLIC_PATHS:
                    continue
                routes += 1
                path = re.sub(r"\{[^}]+\}", "x", route)
                cases = who + ([("user key on an admin route", {"X-API-Key": t.api_key}, {401, 403})] if path.startswith("/admin") else [])
                for method in sorted(m.upper() for m in ops):
                    for what, headers, ok in cases:
                        status, _ = t.send(c, path, method=method, headers=headers, json_body={} if method == "POST" else None)
                        if status not in ok:
                            wrong.append(f"{method} {route} with {what}: HTTP {status}")
            for path in ("/healthz", "/readyz", "/", "/static/app.js"):
                status, _ = t.send(c, path, method="GET")
                if status != 200:
                    wrong.append(f"GET {path} (public): HTTP {status}")
        return Drill("access", extra={"routes": routes, "wrong_answers": wrong},
                     notes="every route but health, readiness and the page without a key, with a wrong key and a wrong bearer "
                           "token: 401; admin routes with the user key: 401")

    def _drill_load(self) -> Drill:
        warm = max(1.0, 0.2 * self.load_s)
        t0 = time.monotonic()
        n0 = len(self.traffic.recs)
        samples: list[tuple[float, int]] = []
        while (el := time.monotonic() - t0) < self.load_s:
            samples.append((el, rss_bytes()))
            time.sleep(min(1.0, max(0.0, self.load_s - el)))
        samples.append((time.monotonic() - t0, rss_bytes()))
        wall = time.monotonic() - t0
        after_warm = [r for e, r in samples if e >= warm] or [samples[-1][1]]
        base, end, peak = after_warm[0], samples[-1][1], max(after_warm)
        growth = 100.0 * (end - base) / base if base else 0.0
        n = len(self.traffic.recs) - n0
        return Drill("load", extra={"seconds": round(wall, 1), "clients": self.clients, "rps": round(n / wall, 1),
                                    "rss_mb_after_warmup": round(base / 2**20, 1), "rss_mb_end": round(end / 2**20, 1),
                                    "rss_mb_peak": round(peak / 2**20, 1), "rss_growth_pct": round(growth, 2)},
                     notes=f"closed loop of {self.clients} clients (the service's capacity: it is saturated), mixed /search, "
                           f"/rerank, /events; RSS of the process (server and load) after {warm:.0f} s of warm-up vs the end")

    # ------------------------------------------------------------------ accounting
    def _count_lost(self) -> None:
        """Accepted events missing from the database and accepted reindex tasks missing from the broker."""
        from sqlalchemy import text

        from rerank.history import HistoryStore

        with HistoryStore(self.settings.effective_sql_url) as store:
            with store.engine.connect() as conn:
                stored = {r[0] for r in conn.execute(text("SELECT event_id FROM events WHERE event_id LIKE :p"), {"p": f"{EVENT_PREFIX}%"})}
        queued = set(_queued_task_ids(self.redis.client()))
        by = {d.name: d for d in self.drills}
        for eid, drill in self.traffic.accepted_events.items():
            if eid not in stored and drill in by:
                by[drill].lost += 1
        for tid, drill in self.traffic.accepted_tasks.items():
            if tid not in queued and drill in by:
                by[drill].lost += 1
        self.events_accepted, self.events_stored = len(self.traffic.accepted_events), len(stored)
        self.tasks_accepted = len(self.traffic.accepted_tasks)
        self.tasks_queued = len(queued & set(self.traffic.accepted_tasks))

    def _report(self, seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in self.drills:
            recs = [r for r in self.traffic.recs if r.drill == d.name]
            expected = [r for r in recs if self.traffic.expected(r)]
            by_status = Counter(f"{r.endpoint} {r.status}" for r in recs)
            row = {
                "requests": len(recs),
                "failed": sum(1 for r in recs if not 200 <= r.status < 300),
                "expected_refusals": len(expected),
                "unexpected_5xx": sum(1 for r in recs if r.status >= 500 and not self.traffic.expected(r)),
                "transport_errors": sum(1 for r in recs if r.status == 0),
                "lost": d.lost,
                "degraded": d.degraded,
                "answers": dict(sorted(by_status.items())),
                "unexpected": sorted({f"{r.endpoint} {r.status}: {r.detail}" for r in recs if r.status == 0 or (
                    r.status >= 500 and not self.traffic.expected(r))})[:5],
                "notes": d.notes,
            }
            if d.recovered is not None:
                row["recovered"], row["recovery_s"] = d.recovered, d.recovery_s
            row.update(d.extra)
            out[d.name] = row
        return {
            "drills": out,
            "events": {"accepted": self.events_accepted, "stored": self.events_stored},
            "secrets_seen": {"logs": self.watch.hits, "responses": self.traffic.secrets_in_responses, "metrics": self.secrets_in_metrics},
            "reindex_tasks": {"accepted": self.tasks_accepted, "queued": self.tasks_queued},
            "seconds": round(seconds, 1), "hold_s": self.hold_s, "products": self.size,
            "model": "untrained FusionRanker (synthetic world)", "users": "simulated shoppers",
        }


def _queued_task_ids(client: Any) -> Iterator[str]:
    """Celery task ids of the messages waiting in the broker's queues (kombu's Redis lists)."""
    for key in client.scan_iter(count=1000):
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            tid = (msg.get("headers") or {}).get("id") if isinstance(msg, dict) else None
            if tid:
                yield tid


def run_drills(**kwargs: Any) -> dict[str, Any]:
    """All drills (see the module docstring); keyword arguments as :class:`DrillRun`."""
    return DrillRun(**kwargs).run()


__all__ = ["DRILLS", "EXPECTED_REFUSALS", "DrillRun", "degraded_counts", "rss_bytes", "run_drills"]

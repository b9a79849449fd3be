"""The FastAPI app: ``create_app(state=None, *, settings=None)``.

Endpoints (the contract: ``/openapi.json``): ``GET /healthz``, ``GET /readyz``, ``GET /metrics``,
``POST /v1/rerank`` (Cohere rerank wire format, what OpenSearch ML Commons' Cohere connector sends),
``POST /rerank`` (an OpenSearch response in, the same shape reordered), ``POST /search`` (hybrid
retrieval + rerank), ``POST /events`` (user events; the next rerank sees them), ``POST /admin/reload``
and ``POST /admin/reindex`` (admin key). The search page's router (:mod:`workers.service.page`) is
included when that module exists.

The model endpoints (``/v1/rerank``, ``/rerank``, ``/search``) run their work on threads, so the CPU-bound rerank
never blocks the event loop, but on a pool of their own (:func:`_in_model_thread`: as many threads as the reranker
gate admits calls, plus one), not FastAPI's default pool of 40 threads; their dependencies (key check, readiness)
are ``async def``, run on the loop without a thread-pool hop. Responses are rendered by :func:`dumps` (orjson when installed). Errors are ``{"detail": "<message>"}``: 401 (key), 403 (admin
disabled), 413 (body over ``max_request_bytes``, checked from Content-Length and while reading chunked
bodies), 422 (malformed body, too many candidates, not an image...), 503 (still loading, history store
or engine down). Bad input never gives a 5xx.
"""

from __future__ import annotations

import base64
import contextlib
import binascii
import json
import logging
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, Mapping

import anyio.to_thread
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.routing import Match

from indexing import fields as F
from indexing.errors import ConfigError, EngineError, FusionRankError, HistoryError
from rerank.explore import explore_order, explores
from workers.service import schemas as S
from workers.service.auth import require_admin_key, require_key
from workers.service.metrics import CONTENT_TYPE
from workers.service.state import ServiceState

try:  # optional speed-up (a dependency in pyproject.toml); the stdlib path gives the same JSON values
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

log = logging.getLogger(__name__)

COHERE_API_VERSION = {"version": "1"}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


# ----------------------------------------------------------------------------- JSON rendering
def _plain(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _finite(o: Any) -> Any:
    """Non-finite floats (which JSON cannot carry) become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _dumps_stdlib(content: Any) -> bytes:
    try:
        s = json.dumps(content, default=_plain, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        s = json.dumps(_finite(json.loads(json.dumps(content, default=_plain))), allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return s.encode("utf-8")


def dumps(content: Any) -> bytes:
    """Compact UTF-8 JSON: numpy scalars and arrays as their Python values (``.item()``, ``.tolist()``), sets and
    tuples as arrays, non-string keys as strings, NaN/Infinity as null (never a 500 for them).

    orjson when installed (a /rerank response of 100 hits with explanations, ~50 KB: ~0.2 ms instead of ~2.6 ms),
    else the stdlib; what orjson refuses (an integer over 64 bits, a lone surrogate, an unknown type) goes to the
    stdlib path, which gives the same answer as before or raises the same error. orjson runs without its numpy option,
    so numpy values take the same ``.item()``/``.tolist()`` route as with the stdlib (a float32 keeps its digits)."""
    if orjson is not None:
        try:
            return orjson.dumps(content, default=_plain, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # orjson.JSONEncodeError
            pass
    return _dumps_stdlib(content)


class FastJSON(JSONResponse):
    """:func:`dumps`: numpy values converted, NaN/Infinity turned into null, orjson when installed."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


def _error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=dict(headers or {}))


# ----------------------------------------------------------------------------- the edge: limits + metrics
class EdgeMiddleware:
    """Pure ASGI: body-size limit (Content-Length and the real stream), per-endpoint metrics, and (with ``serve
    --workers N``) ``Connection: close`` on the responses of a worker holding more than its share of the connections
    (:class:`workers.service.balance.ConnectionBalancer`)."""

    def __init__(self, app: Any, fastapi_app: FastAPI, balancer: Any = None):
        self.app, self.fastapi_app, self.balancer = app, fastapi_app, balancer

    def _endpoint(self, scope: dict) -> str:
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        for r in self.fastapi_app.router.routes:
            try:
                m, _ = r.matches(scope)
            except Exception:
                continue
            if m == Match.FULL and getattr(r, "path", None):
                return r.path
        return "other"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st: ServiceState = self.fastapi_app.state.fusionrank
        t0 = time.perf_counter()
        status = {"code": 500}

        balancer = self.balancer

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if balancer is not None and balancer.should_close(scope.get("client")):
                    # one connection more than its share (workers.service.balance): the client reconnects
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
                    st.metrics.rebalanced.inc()
            await send(message)

        try:
            if scope.get("method") in _BODY_METHODS:
                limit = int(st.settings.max_request_bytes)
                early = await self._read_limited(scope, receive, limit)
                if isinstance(early, Response):
                    await early(scope, receive, send_wrapper)
                    return
                receive = early
            await self.app(scope, receive, send_wrapper)
        finally:
            st.metrics.observe(self._endpoint(scope), status["code"], time.perf_counter() - t0)

    async def _read_limited(self, scope: dict, receive: Any, limit: int) -> Any:
        too_big = f"request body too large: the limit is {limit} bytes (max_request_bytes, FUSIONRANK_MAX_REQUEST_BYTES)"
        cl = None
        for k, v in scope.get("headers") or ():
            if k == b"content-length":
                cl = v
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                return _error(400, "invalid Content-Length header")
            if n > limit:
                return _error(413, too_big)
        chunks: list[bytes] = []
        total = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return _error(400, "client disconnected before sending the whole body")
            body = msg.get("body", b"")
            total += len(body)
            if total > limit:
                return _error(413, too_big)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        data = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return replay


# ----------------------------------------------------------------------------- helpers
def _state(request: Request) -> ServiceState:
    return request.app.state.fusionrank


# The dependencies of the hot endpoints (this one and the key checks of workers.service.auth) are ``async def``: a
# plain ``def`` dependency costs a hop to the thread pool and back (and a GIL hand-over when a rerank holds it) for a
# few microseconds of work.
async def require_ready(request: Request) -> ServiceState:
    st = _state(request)
    if not st.ready:
        why = f" (loading failed: {st.error})" if st.error else ""
        raise HTTPException(503, f"the service is not ready: the model is not loaded{why}; poll /readyz")
    st.check_model_link()  # a promoted model: loaded in the background, this request is served by the current one
    return st


def decode_query_image(b64: str | None) -> Any:
    """base64 (or a ``data:image/...;base64,`` URL) -> RGB PIL image; HTTP 422 naming the problem."""
    if b64 is None:
        return None
    from indexing.images import ImageError, decode_image

    s = b64.strip()
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or ";base64" not in head:
            raise HTTPException(422, "image: a data URL must be base64 encoded (data:image/...;base64,...)")
    try:
        data = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPException(422, f"image: not valid base64 ({e})") from None
    try:
        return decode_image(data, source="image")
    except ImageError as e:
        raise HTTPException(422, str(e)) from None


def _check_candidates(st: ServiceState, n: int, what: str) -> None:
    limit = int(st.settings.max_candidates)
    if n > limit:
        raise HTTPException(422, f"too many {what}: {n} given, the limit is {limit} (max_candidates, FUSIONRANK_MAX_CANDIDATES)")


def _call(fn, *args, **kwargs):
    """Run a reranker call (at most ``state.max_concurrent`` at once, admitted in arrival order: CPU-bound torch work
    queues here instead of thrashing the cores; the queueing shows in the HTTP latency, not in the rerank budget);
    argument errors become 422, service failures 503."""
    gate = kwargs.pop("_gate")
    try:
        with gate:
            return fn(*args, **kwargs)
    except (ConfigError, TypeError) as e:
        raise HTTPException(422, str(e)) from None
    except HistoryError as e:
        raise HTTPException(503, f"history store unavailable: {e}") from None
    except EngineError as e:
        raise HTTPException(503, f"search engine error: {e}") from None


async def _in_model_thread(st: ServiceState, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` (a model endpoint's work: image decoding, the gated reranker call, the JSON rendering) on a worker
    thread that holds one of :meth:`ServiceState.model_limiter`'s slots; waiting calls queue on the event loop, in
    arrival order, instead of each parking a thread at the gate.

    Why not FastAPI's default pool (40 threads): under load every waiting request held a thread blocked at the
    gate (~16 per worker process at ``bench serve`` concurrency 32), and those processes served fewer requests per
    second: 138 against 158 on average over four alternating rounds of 1,200 requests (``serve --workers 2``; the
    docs/benchmarks.md has the runs); concurrency 8 was unchanged."""
    return await anyio.to_thread.run_sync(fn, *args, limiter=st.model_limiter())


def _ubi_ext(obj: Any) -> dict[str, Any]:
    """``obj["ext"]["ubi"]`` when it is a mapping (an OpenSearch request's or response's UBI block), else ``{}``; only
    string ``query_id`` / ``client_id`` values of at most 100 characters are taken."""
    ext = obj.get("ext") if isinstance(obj, Mapping) else None
    ubi = ext.get("ubi") if isinstance(ext, Mapping) else None
    if not isinstance(ubi, Mapping):
        return {}
    return {k: ubi[k] for k in ("query_id", "client_id") if isinstance(ubi.get(k), str) and 0 < len(ubi[k]) <= 100}


def _explored(hits: list[Any], query_id: str, cfg: Any, keep: int | None) -> tuple[list[Any], dict[str, Any] | None]:
    """An exploring answer's hits (:mod:`rerank.explore`: drawn from the model's ranks below ``cfg.from_position``), cut
    to ``keep`` (None: all), and what the answer says of it: ``{"from_position", "depth", "drawn"}`` (``drawn``: the
    positions showing a product from another model rank); None when nothing could move."""
    order = explore_order(len(hits), query_id, cfg)
    if order is None:
        return hits[:keep], None
    served = order[:keep]
    return [hits[i] for i in served], {"from_position": cfg.from_position, "depth": cfg.depth,
                                       "drawn": sum(1 for pos, i in enumerate(served) if pos != i)}


def _mixed_events(st: ServiceState, events: list[Any], ubi_rows: set[int], now: datetime) -> dict[str, Any]:
    """``POST /events`` with UBI 1.3 events among them: those go through the UBI import (the UBI log; history events
    with a user_id also into the user's history), the others as before; one summary, errors by row."""
    from rerank.history.ubi_ingest import import_ubi

    plain_rows = [i for i in range(len(events)) if i not in ubi_rows]
    out = {"stored": 0, "duplicates": 0, "rejected": 0, "errors": []}
    if plain_rows:
        evs = [{**e, "ts": now} if isinstance(e, dict) and e.get("ts") is None and e.get("timestamp") is None else e
               for e in (events[i] for i in plain_rows)]
        d = _call(st.profiles.record_events, evs, _gate=contextlib.nullcontext()).to_dict(max_errors=100)
        out.update(stored=d["stored"], duplicates=d["duplicates"], rejected=d["rejected"],
                   errors=[{"row": plain_rows[e["row"]], "reason": e["reason"]} for e in d["errors"] if 0 <= e["row"] < len(plain_rows)])
    recs = [("events", i, {**events[i], "timestamp": events[i].get("timestamp") or now.isoformat()}) for i in sorted(ubi_rows)]
    u = _call(import_ubi, st.history_store, recs, on_stored=st.profiles.invalidate_many, now=now, _gate=contextlib.nullcontext())
    out["stored"] += u.events_stored
    out["duplicates"] += u.events_duplicate
    out["rejected"] += u.rejected
    out["errors"] = sorted(out["errors"] + [{"row": line, "reason": reason} for _s, line, reason in u.errors], key=lambda e: e["row"])[:100]
    return out


def _filters(m: S.FiltersModel | None):
    if m is None:
        return None
    from indexing.engines.base import Filters, Range

    return Filters(terms=dict(m.terms), ranges={k: Range(**r.model_dump()) for k, r in m.ranges.items()}, include_completed=m.include_completed)


def _public_source(src: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (src or {}).items() if k not in F.VECTOR_FIELDS}


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def wire_score(x: float) -> float:
    """``x`` to 9 significant digits, so that its JSON text is at most 18 characters.

    ML Commons (2.19) parses a connector's response with json-smart, which turns a decimal literal longer than 18
    characters into a ``BigDecimal``; ``connector.post_process.cohere.rerank`` then casts ``relevance_score`` to
    ``Double`` and the search fails (``ClassCastException: BigDecimal cannot be cast to Double``). Python writes
    a float's shortest round-trip form, e.g. ``0.000676683925427717`` or ``0.30000000000000004`` (20 characters);
    9 digits are more than the float32 score OpenSearch keeps per hit."""
    return float(f"{x:.9g}")


# ----------------------------------------------------------------------------- Cohere
def cohere_rerank(st: ServiceState, body: S.CohereRerankRequest) -> dict[str, Any]:
    """The Cohere rerank call over the served model (see the endpoint's description)."""
    docs = body.documents
    n = len(docs)
    _check_candidates(st, n, "documents")
    if body.product_ids is not None and len(body.product_ids) != n:
        raise HTTPException(422, f"product_ids has {len(body.product_ids)} entries for {n} documents; give one per document (null for none)")
    if not body.query.strip():
        raise HTTPException(422, "query is empty")
    texts = [d if isinstance(d, str) else d.text for d in docs]
    ids: list[str | None] = [None if isinstance(d, str) else d.id for d in docs]
    if body.product_ids is not None:
        ids = [i if i is not None else p for i, p in zip(ids, body.product_ids)]
    r = st.reranker
    degraded = None
    sources: list[dict[str, Any]] = [{F.TITLE: t} for t in texts]
    if r.model is not None and n:
        spec = r.model.feature_spec
        want = sorted({i for i in ids if i})
        found: Mapping[str, Mapping[str, Any]] = {}
        if want:
            try:
                found = r.engine.get(r.index, want, fields=[F.TEXT_VEC, F.IMAGE_VEC, *spec.cat_fields])
            except EngineError as e:
                log.warning("/v1/rerank: fetching vectors of %d products failed (%s); encoding their texts", len(want), e)
        need = []
        for k, pid in enumerate(ids):
            d = found.get(pid) if pid else None
            if d is not None and d.get(F.TEXT_VEC) is not None:
                sources[k] = {**d, F.TITLE: texts[k]}
            else:
                need.append(k)
        if need:
            try:
                vecs = np.asarray(r.text_encoder.encode([texts[k] for k in need]), dtype=np.float32)
                for j, k in enumerate(need):
                    sources[k][F.TEXT_VEC] = vecs[j]
            except Exception as e:  # fail open, like the reranker itself
                log.warning("/v1/rerank: encoding %d documents failed (%s: %s); first-stage order", len(need), type(e).__name__, e)
                degraded = "encoder_error"
    hits = [{"_id": str(k), "_score": None, "_source": sources[k]} for k in range(n)]
    if degraded is None and n:
        # diversity 0: Cohere results are read in relevance_score order (the search-pipeline path diversifies nothing yet)
        ranked = _call(r.rerank, body.query, hits, user_id=body.user_id, diversity=0.0, _gate=st.gate)
        degraded = ranked.degraded
        order = [(int(h.id), h.score) for h in ranked.hits]
    else:
        order = [(k, 0.0) for k in range(n)]
    scored = r.model is not None and degraded is None
    results = []
    for rank, (k, score) in enumerate(order, 1):
        rel = _sigmoid(score) if scored else 1.0 - (rank - 1) / max(n, 1)
        item: dict[str, Any] = {"index": k, "relevance_score": wire_score(rel)}
        if body.return_documents:
            item["document"] = {"text": texts[k]}
        results.append(item)
    if body.top_n is not None:
        results = results[: body.top_n]
    st.metrics.count_degraded(degraded)
    return {
        "id": uuid.uuid4().hex, "results": results, "meta": {"api_version": COHERE_API_VERSION},
        "fusionrank": {"degraded": degraded, "reranker": r.name, "model_version": st.model_version, "serving": getattr(r, "serving", None)},
    }


# ----------------------------------------------------------------------------- the app
def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {401: "missing or invalid API key", 403: "admin endpoints disabled", 413: "request body too large",
            422: "invalid request", 503: "not ready, or a backing service failed", 400: "malformed request"}
    return {c: {"model": S.ErrorResponse, "description": text[c]} for c in codes}


_STD = _responses(400, 401, 413, 422, 503)


def create_app(state: ServiceState | None = None, *, settings: Any = None, balancer: Any = None) -> FastAPI:
    """The service app. ``state=None``: a loading state from ``settings`` (default: the environment), filled in
    the background at start-up (``/readyz`` is 503 until then). Refuses (ConfigError) an auth-enabled state
    without an API key."""
    if state is None:
        if settings is None:
            from workers.settings import load_settings

            settings = load_settings()
        state = ServiceState.loading(settings, freeze_gc=True)
    state.check_auth_config()
    if not state.auth_enabled:
        log.warning("API-key auth is DISABLED (--no-auth): local development only")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not state.ready and state.error is None:
            def load() -> None:
                try:
                    state.load()
                except Exception as e:  # reported by /readyz and the log; serve stops on it
                    log.error("loading the model failed: %s: %s", type(e).__name__, e)
                    if state.on_load_error is not None:
                        state.on_load_error(e)

            threading.Thread(target=load, name="fusionrank-load", daemon=True).start()
        yield
        if state.ubi_recorder is not None:  # write what was served before the process goes
            state.ubi_recorder.flush(timeout=5.0)

    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("fusionrank")
    except PackageNotFoundError:
        ver = "0"
    app = FastAPI(
        title="fusionrank", version=ver, lifespan=lifespan,
        description="Multimodal, personalized reranking for OpenSearch product search. "
                    "Send the API key as `X-API-Key: <key>` or `Authorization: Bearer <key>`.",
    )
    app.state.fusionrank = state
    app.add_middleware(EdgeMiddleware, fastapi_app=app, balancer=balancer)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:20]:
            if err.get("type") == "json_invalid":
                parts.append(f"request body is not valid JSON: {(err.get('ctx') or {}).get('error', err.get('msg'))}")
                continue
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg')}")
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(FusionRankError)
    async def _fr(request: Request, exc: FusionRankError) -> JSONResponse:
        if isinstance(exc, ConfigError):
            return _error(422, str(exc))
        log.warning("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return _error(503, f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ probes
    @app.get("/healthz", response_model=S.HealthResponse, tags=["probes"])
    def healthz() -> dict[str, str]:
        """Liveness (no auth)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=S.ReadyResponse, responses={503: {"model": S.ReadyResponse, "description": "still loading, or loading failed"}}, tags=["probes"])
    def readyz(request: Request):
        """Readiness (no auth): 200 once the model is loaded."""
        st = _state(request)
        if st.ready:
            return {"status": "ready", "model_version": st.model_version}
        if st.error:
            return JSONResponse({"status": "failed", "detail": st.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics", dependencies=[Depends(require_key)], response_class=Response, tags=["probes"],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}, **_responses(401)})
    def metrics(request: Request) -> Response:
        """Prometheus metrics: requests and latency per endpoint, degraded (fail-open) calls per reason, model version."""
        return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ rerank
    @app.post("/v1/rerank", response_model=S.CohereRerankResponse, responses=_STD, dependencies=[Depends(require_key)], tags=["rerank"])
    async def v1_rerank(body: S.CohereRerankRequest, st: ServiceState = Depends(require_ready)):
        """Cohere rerank wire format (OpenSearch ML Commons' `connector.pre_process.cohere.rerank` /
        `connector.post_process.cohere.rerank`). `results` are sorted by `relevance_score` (sigmoid of the model
        score; when the call failed open, `1 - (rank-1)/n` of the given order). Documents with a product id
        (`documents[i].id` or `product_ids[i]`) use their indexed vectors; others are encoded from their text."""
        return await _in_model_thread(st, lambda: FastJSON(cohere_rerank(st, body)))

    @app.post("/rerank", response_model=S.RerankResponse, responses=_STD, dependencies=[Depends(require_key)], tags=["rerank"])
    async def rerank(body: S.RerankRequest, st: ServiceState = Depends(require_ready)):
        """An OpenSearch search response (`response`) or a list of hits (`hits`) in, the same response reordered
        (a list comes back as `{"hits": {"hits": [...]}}`), with `_explanation` per hit and a `fusionrank` block."""
        return await _in_model_thread(st, _rerank, st, body)

    def _rerank(st: ServiceState, body: S.RerankRequest) -> Response:
        if (body.response is None) == (body.hits is None):
            raise HTTPException(422, "give exactly one of 'response' (an OpenSearch search response) or 'hits' (a list of hits)")
        payload = body.response if body.response is not None else {"hits": {"hits": body.hits}}
        inner = payload.get("hits")
        n = len(inner["hits"]) if isinstance(inner, Mapping) and isinstance(inner.get("hits"), list) else 0
        _check_candidates(st, n, "hits")
        image = decode_query_image(body.image)
        ubi_in = _ubi_ext(payload)
        qid = body.query_id or ubi_in.get("query_id") or uuid.uuid4().hex
        cfg = st.explore
        exploring = explores(qid, cfg)
        top_k = None if exploring and body.top_k is not None and body.top_k < cfg.depth else body.top_k
        out = _call(st.reranker.rerank, body.query, payload, user_id=body.user_id, top_k=top_k, query_image=image,
                    diversity=body.diversity, _gate=st.gate)
        st.metrics.count_degraded(out["fusionrank"].get("degraded"))
        if exploring:
            hits, explored = _explored(out["hits"]["hits"], qid, cfg, body.top_k)
            out["hits"] = {**out["hits"], "hits": hits}
            if explored is not None:
                out["fusionrank"]["explore"] = explored
        out["fusionrank"]["query_id"] = qid
        ext = out.get("ext") if isinstance(out.get("ext"), Mapping) else {}
        out["ext"] = {**ext, "ubi": {**_ubi_ext(out), "query_id": qid}}  # new dicts: the caller's response is not changed
        st.record_served(qid, body.query, [h.get("_id") for h in out["hits"]["hits"] if isinstance(h, Mapping)], user_id=body.user_id,
                         client_id=body.client_id or ubi_in.get("client_id"))
        return FastJSON(out)

    @app.post("/search", response_model=S.SearchResponse, responses=_STD, dependencies=[Depends(require_key)], tags=["rerank"])
    async def search(body: S.SearchRequest, st: ServiceState = Depends(require_ready)):
        """Hybrid retrieval (BM25 + kNN text + kNN image) over the index, then the rerank; the top `size`."""
        return await _in_model_thread(st, _search, st, body)

    def _search(st: ServiceState, body: S.SearchRequest) -> Response:
        image = decode_query_image(body.image)
        if not body.query.strip() and image is None:
            raise HTTPException(422, "empty query: give a query text or a query image")
        ubi_in = _ubi_ext(body.model_dump(include={"ext"}))
        qid = body.query_id or ubi_in.get("query_id") or uuid.uuid4().hex
        cfg = st.explore
        exploring = explores(qid, cfg)
        res = _call(st.reranker.search, body.query, user_id=body.user_id, size=max(body.size, cfg.depth) if exploring else body.size,
                    filters=_filters(body.filters), query_image=image, diversity=body.diversity, _gate=st.gate)
        st.metrics.count_degraded(res.degraded)
        served = list(zip(res.hits, res.items))
        explored = None
        if exploring:  # the page first, so that only the hits it shows are rendered
            served, explored = _explored(served, qid, cfg, body.size)
        hits = [
            {"id": h.id, "score": h.score, "rank": h.rank, "previous_rank": h.previous_rank, "previous_score": h.previous_score,
             "source": _public_source(item.source), "explanation": h.explanation}
            for h, item in served
        ]
        st.record_served(qid, body.query, [h["id"] for h in hits], user_id=body.user_id, client_id=body.client_id or ubi_in.get("client_id"))
        return FastJSON({"query_id": qid, "hits": hits, "fusionrank": {"degraded": res.degraded, "reranker": st.reranker.name,
                                                                       "model_version": res.model_version, "timings_ms": dict(res.timings),
                                                                       "diversity": res.diversity, "serving": res.serving, "query_id": qid,
                                                                       **({"explore": explored} if explored is not None else {})}})

    # ------------------------------------------------------------------ events
    @app.post("/events", response_model=S.EventsResponse, responses=_STD, dependencies=[Depends(require_key)], tags=["history"])
    def events(body: S.EventsRequest, st: ServiceState = Depends(require_ready)):
        """Store user events (idempotent by `event_id`, derived from user, product, type and `ts` when absent; `ts`
        defaults to the time of arrival); bad events are rejected one by one (`errors[].row` is their position).
        The users' cached profiles are invalidated: the next rerank sees the events."""
        if st.profiles is None:
            raise HTTPException(503, "no history store is configured for this service")
        now = datetime.now(timezone.utc)
        ubi_rows = [i for i, e in enumerate(body.events) if isinstance(e, dict) and "action_name" in e]
        if not ubi_rows:
            evs = [{**e, "ts": now} if isinstance(e, dict) and e.get("ts") is None and e.get("timestamp") is None else e for e in body.events]
            summary = _call(st.profiles.record_events, evs, _gate=contextlib.nullcontext())
            return FastJSON(summary.to_dict(max_errors=100))
        return FastJSON(_mixed_events(st, body.events, set(ubi_rows), now))

    # ------------------------------------------------------------------ admin
    @app.post("/admin/reload", response_model=S.ReloadResponse, responses=_responses(401, 403, 503), dependencies=[Depends(require_admin_key)], tags=["admin"])
    def admin_reload(request: Request):
        """Load the model again from the settings (e.g. after `fusionrank train --out` replaced it) and swap it in."""
        st = _state(request)
        try:
            ver = st.reload()
        except Exception as e:
            log.error("reload failed: %s: %s", type(e).__name__, e)
            raise HTTPException(503, f"reload failed, still serving model {st.model_version}: {type(e).__name__}: {e}") from None
        return {"status": "reloaded", "model_version": ver}

    @app.post("/admin/reindex", status_code=202, response_model=S.ReindexAccepted, responses=_responses(401, 403, 413, 422, 503),
              dependencies=[Depends(require_admin_key)], tags=["admin"])
    def admin_reindex(request: Request, body: S.ReindexRequest | None = None):
        """Queue a reindex job of the alias (a new generation, filled, verified, then swapped) on the admin queue."""
        st = _state(request)
        params = (body or S.ReindexRequest()).model_dump()
        try:
            queued = st.submit_reindex(st.settings, params)
        except Exception as e:
            log.error("queueing the reindex failed: %s: %s", type(e).__name__, e)
            raise HTTPException(503, f"could not queue the reindex job (broker unreachable?): {type(e).__name__}") from None
        return {"status": "queued", **queued}

    try:
        from workers.service.page import router as page_router
    except ModuleNotFoundError as e:
        if e.name != "workers.service.page":
            raise
    else:
        app.include_router(page_router)
    return app


__all__ = ["EdgeMiddleware", "FastJSON", "cohere_rerank", "create_app", "decode_query_image", "dumps", "require_ready"]

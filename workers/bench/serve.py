"""``fusionrank bench serve``: loopback load on a real uvicorn server.

The server runs in a **subprocess**, started the way it is deployed: ``fusionrank serve --workers N`` (``server_workers``
processes; uvloop and httptools when installed; ``OMP_NUM_THREADS=1``; access log off), so that the load generator
does not share its GIL; it loads its model the production way (``build_reranker``). Each request is
``POST /rerank`` with an OpenSearch-shaped response of ``candidates`` hits (``_source`` without vectors: the reranker
fetches them by id, as it would behind a real OpenSearch) and a user id with history. Levels run one after another
with a thread pool of ``c`` workers in a closed loop.

The load generator runs on the same cores as the server, so it is kept lean: each worker thread has its own
keep-alive ``http.client`` connection, the bodies are serialized to bytes once before the levels (the same bytes
``httpx``'s ``json=`` sent), and responses are parsed with orjson when installed. Until 2026-11-26 it was one shared
``httpx.Client`` with ``json=`` per request and ``Response.json()``: ~4-5 ms of client CPU per request against
~1.5-2 ms now, CPU the server lost at high concurrency (2 cores). The server does the same work per request as
before; a request is timed from before its bytes are sent to after its whole response is read. The server was
started with ``uvicorn --factory workers.commands.serve:app_factory --workers N`` until then: with N > 1 its
connections kept Nagle's algorithm on (see :func:`workers.commands.serve.tcp_nodelay`), +40 ms per request.

``http_overhead_ms`` = HTTP p50 at concurrency 1 minus the p50 of the in-process ``Reranker.rerank`` on the
same requests (measured in this process before the server starts).

With ``synthetic=True`` a small world is built in a temporary data dir first: a generated catalog (text only:
no photos, to keep it quick), indexed inline with the configured text encoder, an **untrained** FusionRanker
artifact of the default size, and a SQLite history store with simulated events. Otherwise the configured
settings are served (``fusionrank demo`` installs a model).
"""

from __future__ import annotations

import gc
import http.client
import json
import logging
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from indexing.errors import ConfigError, FusionRankError
from indexing.machine import machine_info
from workers.bench.rerank import closed_loop

try:  # parses the ~50 KB responses in ~0.1 ms (the stdlib: ~0.5 ms), CPU the server under load would otherwise lose
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

log = logging.getLogger(__name__)

N_USERS = 20


def stop_process(proc: "subprocess.Popen | None", timeout: float = 20.0) -> None:
    """Stop a server subprocess a benchmark started: terminate, wait ``timeout`` s, then kill (None: nothing)."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(q / 100.0 * (len(s) - 1)))))
    return s[k]


def build_synthetic_world(data_dir: Path, *, size: int = 300, seed: int = 0, text_backend: str | None = None,
                          sql_url: str | None = None) -> dict[str, str]:
    """Write a servable world under ``data_dir``; returns the FUSIONRANK_* environment that serves it.

    ``sql_url``: the history store (migrated here; default: a SQLite file in ``data_dir``)."""
    from indexing.encoders import text_encoder_info
    from indexing.engines import create_engine
    from indexing.pipeline import IndexJob
    from indexing.synthetic import make_synthetic_catalog
    from rerank.model.artifact import EncoderRef, save_artifact
    from rerank.history import HistoryStore, upgrade
    from rerank.model.ranker import RankerConfig, build_ranker
    from rerank.model.inputs import FeatureSpec
    from workers.jobs import run_index_job
    from workers.settings import load_settings

    text_backend = text_backend or load_settings().text_backend  # FUSIONRANK_TEXT_BACKEND=onnx-int8 benchmarks the int8 encoder
    env = {"FUSIONRANK_DATA_DIR": str(data_dir), "FUSIONRANK_ENGINE": "local", "FUSIONRANK_TEXT_BACKEND": text_backend,
           "FUSIONRANK_DEVICE": "cpu", "FUSIONRANK_SQL_URL": sql_url or f"sqlite:///{data_dir / 'history.sqlite3'}",
           "FUSIONRANK_MODEL_DIR": str(data_dir / "models" / "current"), "FUSIONRANK_INDEX_ALIAS": "products"}
    settings = world_settings(env)
    catalog = make_synthetic_catalog(data_dir / "catalog", n=size, seed=seed, without_image_fraction=1.0)
    engine = create_engine("local", path=data_dir / "engine")
    try:
        job = IndexJob(catalog=str(catalog), index=settings.index_alias, images_root=str(catalog.parent),
                       text_model=settings.text_model, text_backend=text_backend, image_model=settings.image_model, device="cpu")
        summary = run_index_job(engine, settings, job, via="inline", progress=False)
        if not engine.count(settings.index_alias):
            raise FusionRankError(f"synthetic index is empty: {summary}")
        ids = [d["product_id"] for d in engine.iter_documents(settings.index_alias, batch_size=500)]
    finally:
        engine.close()
    text = text_encoder_info(settings.text_model, backend=text_backend)
    spec = FeatureSpec()
    cfg = RankerConfig(text_dim=text.dim, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields),
                       hash_buckets=spec.hash_buckets, history_k=spec.history_k)
    save_artifact(settings.effective_model_dir, build_ranker(cfg, device="cpu", seed=seed), feature_spec=spec,
                  text_encoder=EncoderRef(text.model_id, text.dim), image_encoder=None,
                  extra={"note": "untrained (bench serve --synthetic)"})
    upgrade(settings.effective_sql_url)
    rnd = random.Random(seed)
    now = datetime.now(timezone.utc)
    with HistoryStore(settings.effective_sql_url) as store:
        store.insert_events([
            {"event_id": f"bench-{u}-{k}", "user_id": f"bench-u{u}", "product_id": rnd.choice(ids),
             "type": rnd.choice(("view", "click", "add_to_cart", "purchase")), "ts": now - timedelta(hours=k + 1)}
            for u in range(N_USERS) for k in range(30)
        ])
    return env


def world_settings(env: dict[str, str], **overrides: Any) -> Any:
    """The settings that serve a world from the ``FUSIONRANK_*`` variables :func:`build_synthetic_world` returned."""
    from workers.settings import load_settings

    keys = ("data_dir", "engine", "text_backend", "device", "sql_url", "model_dir", "index_alias")
    given = {k[len("FUSIONRANK_"):].lower(): v for k, v in env.items() if k.startswith("FUSIONRANK_")}
    return load_settings(**{k: given[k] for k in keys if k in given}, **overrides)


def make_requests(engine: Any, index: str, n: int, candidates: int, *, users: Sequence[str | None], seed: int = 0) -> list[dict[str, Any]]:
    """``n`` /rerank bodies: queries made from product titles; BM25 hits padded with other products to ``candidates``."""
    rnd = random.Random(seed)
    docs = []
    for d in engine.iter_documents(index, batch_size=1000):
        docs.append((d["product_id"], d.get("title") or ""))
        if len(docs) >= max(candidates, 2000):
            break
    if len(docs) < candidates:
        raise ConfigError(f"the index {index!r} holds {len(docs)} products; {candidates} candidates per request need at least as many")
    out = []
    for _ in range(n):
        words = [w for w in rnd.choice(docs)[1].split() if len(w) > 2] or ["shirt"]
        q = " ".join(rnd.sample(words, min(len(words), rnd.randint(1, 3))))
        hits = engine.bm25_search(index, q, size=candidates, source=["product_id", "title"])
        seen = {h.id for h in hits}
        rows = [{"_index": index, "_id": h.id, "_score": float(h.score), "_source": dict(h.source or {})} for h in hits]
        low = min((r["_score"] for r in rows), default=1.0)
        for pid, title in rnd.sample(docs, len(docs)):
            if len(rows) >= candidates:
                break
            if pid not in seen:
                rows.append({"_index": index, "_id": pid, "_score": low * 0.5, "_source": {"product_id": pid, "title": title}})
                seen.add(pid)
        resp = {"took": 5, "timed_out": False,
                "hits": {"total": {"value": len(rows), "relation": "eq"}, "max_score": rows[0]["_score"], "hits": rows}}
        out.append({"query": q, "response": resp, "user_id": rnd.choice(users)})
    return out


def _in_process(reranker: Any, bodies: Sequence[dict[str, Any]]) -> tuple[float, int, dict[str, float]]:
    """p50 (ms), degraded count, and the median time of each stage (ms) of ``Reranker.rerank`` on ``bodies``."""
    from workers.bench.rerank import time_rerank_calls

    warm = list(bodies[:3])
    calls = [(b["query"], b["response"], b["user_id"]) for b in [*warm, *bodies]]
    lat, degraded, stages = time_rerank_calls(reranker, calls, warmup=len(warm))
    return statistics.median(lat), degraded, {k: round(statistics.median(v), 2) for k, v in stages.items()}


def _server_stack() -> str:
    """What uvicorn's ``auto`` loop and HTTP parser pick here (the server subprocess uses the same environment)."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} + {http}"


def _start_server(env: dict[str, str], port: int, log_path: Path, workers: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "workers.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
           "--no-access-log", "--log-level", "warning"]
    with open(log_path, "wb") as logf:
        return subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parents[2]))


def _wait_ready(client: Any, proc: subprocess.Popen, log_path: Path, timeout_s: float = 600.0, workers: int = 1) -> None:
    """Until ``/readyz`` answered 200 ``10 * workers`` times in a row (each worker process loads its own model and
    the kernel spreads connections over them; one 200 only says that one worker is ready)."""
    import httpx

    t0 = time.monotonic()
    streak = 0
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise FusionRankError(f"the server exited with {proc.returncode}: {log_path.read_text(errors='replace')[-2000:]}")
        try:
            with httpx.Client(base_url=client.base_url, timeout=10.0) as c:  # a new connection: it may land on another worker
                r = c.get("/readyz")
            streak = streak + 1 if r.status_code == 200 else 0
            if streak >= 10 * workers:
                return
            if r.status_code == 200:
                continue
            if r.json().get("status") == "failed":
                raise FusionRankError(f"the server could not load its model: {r.json().get('detail')}")
        except Exception as e:
            if isinstance(e, FusionRankError):
                raise
        time.sleep(0.2)
    raise FusionRankError(f"the server was not ready after {timeout_s:.0f} s")


def encode_bodies(bodies: Sequence[dict[str, Any]]) -> list[bytes]:
    """The request bodies as the bytes httpx's ``json=`` sent (compact, UTF-8, no NaN), serialized once before the load."""
    return [json.dumps(b, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8") for b in bodies]


def _loads(data: bytes) -> Any:
    return orjson.loads(data) if orjson is not None else json.loads(data)


def _level(base_url: str, bodies: Sequence[bytes], c: int, headers: dict[str, str]) -> dict[str, Any]:
    """``c`` threads in a closed loop (:func:`closed_loop`), each on its own keep-alive ``http.client`` connection (the
    load generator shares the server's cores: httpx cost ~4-5 ms of CPU per request here, http.client with
    pre-encoded bodies about a third of that). A request is timed from before its bytes are sent to after the whole
    response body is read; the response is parsed (orjson when installed) for ``fusionrank.degraded``."""
    u = urlsplit(base_url)
    hdrs = {**headers, "Content-Type": "application/json", "Connection": "keep-alive"}
    local = threading.local()
    opened: list[http.client.HTTPConnection] = []
    lock = threading.Lock()

    def connection() -> http.client.HTTPConnection:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60.0)
            with lock:
                opened.append(conn)
        return conn

    def one(body: bytes) -> tuple[float, int, bool]:
        t = time.perf_counter()
        for attempt in (0, 1):  # a keep-alive connection the server closed in between: reconnect once (timed)
            conn = connection()
            try:
                conn.request("POST", "/rerank", body=body, headers=hdrs)
                r = conn.getresponse()
                data = r.read()
                break
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                conn.close()
                if attempt:
                    raise
        ms = (time.perf_counter() - t) * 1000.0
        if r.will_close:
            conn.close()
        deg = r.status == 200 and _loads(data)["fusionrank"]["degraded"] is not None
        return ms, r.status, deg

    try:
        res, wall = closed_loop(c, one, bodies, warm_up=bodies[: max(2 * c, 4)])  # warm-up: connections and threads
    finally:
        for conn in opened:
            conn.close()
    lat = [r[0] for r in res]
    return {"rps": round(len(res) / wall, 1), "p50_ms": round(_pct(lat, 50), 2), "p99_ms": round(_pct(lat, 99), 2),
            "requests": len(res), "errors": sum(r[1] != 200 for r in res), "degraded": sum(r[2] for r in res)}


def _ubi_metrics(client: Any, headers: dict[str, str]) -> dict[str, float]:
    """The server's ``fusionrank_ubi_searches{outcome}`` values (what its UBI recording did)."""
    import re

    text = client.get("/metrics", headers=headers).text
    return {m[1]: float(m[2]) for m in re.finditer(r'fusionrank_ubi_searches\{outcome="(\w+)"\} ([0-9.e+]+)', text)}


def _ubi_record_rounds(env: dict[str, str], tmp: Path, payloads: Sequence[bytes], levels: Sequence[int], headers: dict[str, str],
                       server_workers: int, rounds: int = 2) -> dict[str, Any]:
    """The same levels against servers with the UBI recording off and on, alternating (off, on, off, on...): p50/p99 per
    level and state, the median of the rounds, and what the recording servers wrote."""
    import httpx

    from workers.drill.services import free_port

    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    written: list[dict[str, float]] = []
    for r in range(rounds):
        for state in ("off", "on"):
            e = {**env, "FUSIONRANK_UBI_RECORD": "true" if state == "on" else "false"}
            port = free_port()
            proc = _start_server(e, port, tmp / f"server-ubi-{state}-{r}.log", server_workers)
            try:
                base_url = f"http://127.0.0.1:{port}"
                with httpx.Client(base_url=base_url, timeout=60.0) as client:
                    _wait_ready(client, proc, tmp / f"server-ubi-{state}-{r}.log", workers=server_workers)
                    runs[state].append({str(c): _level(base_url, payloads, c, headers) for c in levels})
                    if state == "on":
                        time.sleep(1.0)  # the writer thread drains its queue
                        written.append(_ubi_metrics(client, headers))
            finally:
                stop_process(proc)
    out: dict[str, Any] = {"rounds": rounds, "order": "off, on, alternating", "levels": {}}
    for c in levels:
        k = str(c)
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        off50, on50 = med([x[k]["p50_ms"] for x in runs["off"]]), med([x[k]["p50_ms"] for x in runs["on"]])
        off99, on99 = med([x[k]["p99_ms"] for x in runs["off"]]), med([x[k]["p99_ms"] for x in runs["on"]])
        out["levels"][k] = {"off_p50_ms": off50, "on_p50_ms": on50, "p50_diff_ms": round(on50 - off50, 2),
                            "off_p99_ms": off99, "on_p99_ms": on99, "p99_diff_ms": round(on99 - off99, 2),
                            "off_rps": med([x[k]["rps"] for x in runs["off"]]), "on_rps": med([x[k]["rps"] for x in runs["on"]]),
                            "errors": sum(x[k].get("errors", 0) for st in runs.values() for x in st)}
    out["recorded_by_round"] = written
    return out


def run_serve_bench(*, synthetic: bool = False, synthetic_size: int = 300, requests: int = 300, candidates: int = 100,
                    levels: Sequence[int] = (1, 8, 32), seed: int = 0, settings: Any = None, server_workers: int = 1,
                    compare_ubi_record: bool = False) -> dict[str, Any]:
    """``compare_ubi_record``: instead of one server, servers with the UBI recording off and on, alternating (two rounds);
    the result's ``ubi_record`` block has both and their differences."""
    import httpx

    from indexing.encoders import limit_threads, threads_from_env
    from workers.composition import build_reranker
    from workers.drill.services import free_port
    from workers.settings import load_settings

    tmp = Path(tempfile.mkdtemp(prefix="fusionrank-bench-serve-"))
    proc = None
    try:
        env = dict(os.environ)
        # the in-process baseline runs with the server's thread settings (numpy's BLAS pool included), so that
        # http_overhead_ms compares like with like
        threads = threads_from_env()
        env["OMP_NUM_THREADS"] = str(threads)
        server_interval_ms = load_settings().serve_switch_interval_ms  # what the server will set (a bad value stops the bench here)
        limit_threads(threads)
        if synthetic:
            t = time.perf_counter()
            env.update(build_synthetic_world(tmp / "data", size=synthetic_size, seed=seed))
            log.info("synthetic world built in %.1f s", time.perf_counter() - t)
            settings = world_settings(env)
            users: list[str | None] = [f"bench-u{u}" for u in range(N_USERS)]
        else:
            settings = settings or load_settings()
            users = [None]
        key = secrets.token_urlsafe(24)
        env["FUSIONRANK_API_KEY"] = key  # only the child gets it; never printed
        env["FUSIONRANK_SERVE_NO_AUTH"] = "0"

        reranker = build_reranker(settings)
        bodies = make_requests(reranker.engine, reranker.index, requests, candidates, users=users, seed=seed)
        # ... and with the server's thread switch interval (the load generator keeps the interpreter's own)
        client_interval = sys.getswitchinterval()
        sys.setswitchinterval(server_interval_ms / 1000.0)
        try:
            inproc_p50, inproc_degraded, stages = _in_process(reranker, bodies)
        finally:
            sys.setswitchinterval(client_interval)
        version = reranker.model.version if reranker.model is not None else None
        runtime = reranker.model_runtime  # the server's workers load the same model with the same settings
        query_backend = getattr(reranker.text_encoder, "backend", None)
        if hasattr(reranker.engine, "close"):
            reranker.engine.close()
        del reranker

        # the load generator's own heap (torch, the encoders, the engine it built the bodies with: ~600 000 objects)
        # out of its cyclic GC, as the server does with its own: a full collection took ~300 ms here, and one during a
        # level stalled every client thread at once, adding that much to each request in flight (c=32 p99 ~500 ms)
        gc.collect()
        gc.freeze()
        headers = {"X-API-Key": key}
        payloads = encode_bodies(bodies)
        if compare_ubi_record:
            return {"ubi_record": _ubi_record_rounds(env, tmp, payloads, levels, headers, server_workers),
                    "candidates": candidates, "requests_per_level": requests, "synthetic": synthetic, "endpoint": "/rerank",
                    "model_version": version, "cpu_count": os.cpu_count(), "machine": machine_info(), "server_workers": server_workers,
                    "model_runtime": runtime, "in_process_p50_ms": round(inproc_p50, 2)}
        port = free_port()
        log_path = tmp / "server.log"
        proc = _start_server(env, port, log_path, server_workers)
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base_url, timeout=60.0) as client:
            _wait_ready(client, proc, log_path, workers=server_workers)
        out_levels = {str(c): _level(base_url, payloads, c, headers) for c in levels}
        first = out_levels[str(levels[0])] if levels else None
        return {
            "levels": out_levels,
            "http_overhead_ms": round(first["p50_ms"] - inproc_p50, 2) if first and levels[0] == 1 else None,
            "in_process_p50_ms": round(inproc_p50, 2),
            "in_process_degraded": inproc_degraded,
            "in_process_stages_ms": stages,
            "candidates": candidates, "requests_per_level": requests, "synthetic": synthetic,
            "model_version": version, "budget_ms": settings.rerank_budget_ms, "cpu_count": os.cpu_count(), "machine": machine_info(),
            "server": f"fusionrank serve (uvicorn, {_server_stack()}), {server_workers} worker process(es), subprocess, "
                      f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, thread switch interval {server_interval_ms:g} ms, access log off",
            "server_workers": server_workers,
            "text_backend": settings.text_backend,
            "query_text_backend": query_backend,
            "model_runtime": runtime,
        }
    finally:
        stop_process(proc)
        gc.unfreeze()  # a caller that goes on (a test process) gets its collector back as it was
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["build_synthetic_world", "make_requests", "run_serve_bench", "world_settings"]

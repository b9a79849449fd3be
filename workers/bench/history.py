"""Benchmark of the user-history store: bulk import throughput and profile latency (cold and warm).

``run_history_bench(sql_url, users=10_000, events=500_000)`` writes a synthetic events CSV (users
pick products with a Zipf-like popularity over the last 180 days; view/click/add_to_cart/purchase at
60/25/10/5 %), imports it through :func:`~rerank.history.ingest.import_events_file` into a fresh
database, then times ``ProfileService.get_profile`` for ``samples`` random users twice:

- cold: not in the profile cache, so built from SQL (last K events query + grouping + vector join);
  the connection pool and the database's own page cache are warm (a few untimed reads first);
- warm: answered by the cache.

Vectors come from a synthetic in-memory :class:`~rerank.history.profiles.InMemoryVectorSource`
(384-d text, 1280-d image, 20 % of products without an image), so the numbers measure the SQL and
cache path, not a search engine. SQLite runs in a temporary file; PostgreSQL in a fresh schema that is
dropped afterwards.

It also imports a synthetic UBI log twice (``ubi_import_events_per_s``, and ``ubi_import_events_per_cpu_s``: the
process's CPU time, which a busy shared CPU does not inflate) and, with ``retrain_log``, times one forced turn of the
retraining loop on a real log (:func:`time_retrain`: ``retrain_s``).
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from indexing.errors import ConfigError
from indexing.machine import machine_info
from rerank.history.ingest import import_events_file
from rerank.history.profiles import InMemoryVectorSource, ProfileConfig, ProfileService
from rerank.history.ubi_ingest import import_ubi_path
from rerank.history.store import HistoryStore, make_engine, normalize_url, sql_errors, upgrade, with_search_path

log = logging.getLogger(__name__)

EVENT_MIX = {"view": 0.60, "click": 0.25, "add_to_cart": 0.10, "purchase": 0.05}
TEXT_DIM, IMAGE_DIM = 384, 1280
TARGET_WARM_P99_MS, TARGET_COLD_P99_MS = 1.0, 10.0
TARGET_UBI_EVENTS_PER_S = 20_000


def write_synthetic_events(path: Path, *, users: int, events: int, products: int, now: float, seed: int = 0) -> None:
    """A CSV in the format of ``fashion/bench/dev/events.csv`` (``user_id,product_id,event,timestamp``)."""
    rng = np.random.default_rng(seed)
    types = np.array(list(EVENT_MIX))
    probs = np.array(list(EVENT_MIX.values()))
    popularity = 1.0 / np.arange(1, products + 1) ** 0.8
    popularity /= popularity.sum()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "product_id", "event", "timestamp"])
        chunk = 100_000
        for start in range(0, events, chunk):
            n = min(chunk, events - start)
            u = rng.integers(0, users, n)
            p = rng.choice(products, size=n, p=popularity)
            t = rng.choice(len(types), size=n, p=probs)
            ts = (now - rng.uniform(0, 180 * 86_400, n)).astype(np.int64)
            w.writerows(zip((f"u{i:06d}" for i in u), (f"p{j}" for j in p), types[t], ts))


def write_synthetic_ubi(d: Path, *, searches: int, products: int, users: int, now: float, seed: int = 0) -> int:
    """A UBI 1.3 log like ``fashion/bench/dev/ubi`` (20 products shown, impressions of the first 10, clicks with a
    position bias, some carts and purchases) in ``d``; returns the number of events written."""
    import gzip
    import json
    from datetime import datetime, timezone

    rng = np.random.default_rng(seed + 3)
    d.mkdir(parents=True, exist_ok=True)
    n_events = 0
    exam = 1.0 / np.arange(1, 21) ** 0.9
    with gzip.open(d / "ubi_queries.jsonl.gz", "wt") as fq, gzip.open(d / "ubi_events.jsonl.gz", "wt") as fe:
        for i in range(searches):
            qid = f"sq{seed}-{i:08d}"
            user = f"u{int(rng.integers(0, users)):06d}"
            ts = datetime.fromtimestamp(now - float(rng.uniform(0, 90 * 86_400)), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            hits = [f"p{j}" for j in rng.choice(products, size=20, replace=False)]
            fq.write(json.dumps({"query_id": qid, "user_query": f"query {int(rng.integers(0, 300))}", "client_id": "c-" + user, "user_id": user,
                                 "application": "bench", "timestamp": ts, "query_response_hit_ids": hits}) + "\n")
            base = {"query_id": qid, "client_id": "c-" + user, "user_id": user, "application": "bench", "message_type": "INTERACTION", "timestamp": ts}
            clicked = rng.random(20) < exam * 0.3
            for r, pid in enumerate(hits):
                acts = (["impression"] if r < 10 else []) + (["click"] if clicked[r] else [])
                if clicked[r] and rng.random() < 0.2:
                    acts.append("add_to_cart")
                for a in acts:
                    fe.write(json.dumps({"action_name": a, **base, "event_attributes": {"object": {"object_id": pid, "object_id_field": "product_id"},
                                                                                          "position": {"ordinal": r + 1}}}) + "\n")
                    n_events += 1
    return n_events


def time_retrain(settings: Any, log_path: Path, *, minutes: float, workdir: Path) -> dict[str, Any]:
    """One turn of the retraining loop (:func:`workers.retrain.retrain`, forced) on the UBI log at ``log_path``, imported
    into a fresh SQLite store with an empty model registry under ``workdir`` (the settings' own store and registry are
    not touched; the data dir's index cache is used), training budget ``minutes``. Returns its duration and outcome."""
    from workers.retrain import retrain

    url = f"sqlite:///{workdir / 'retrain-history.sqlite3'}"
    upgrade(url)
    t0 = time.perf_counter()
    with HistoryStore(url) as store:
        imported = import_ubi_path(store, log_path)
    import_s = time.perf_counter() - t0
    s = settings.model_copy(update={"sql_url": url, "model_dir": workdir / "models" / "current", "retrain_max_minutes": float(minutes)})
    t0 = time.perf_counter()
    out = retrain(s, force=True)
    retrain_s = time.perf_counter() - t0
    train = out.get("train") or {}
    return {"retrain_log": str(log_path), "retrain_log_events": imported.events_stored, "retrain_import_s": round(import_s, 3),
            "retrain_s": round(retrain_s, 1), "retrain_budget_minutes": float(minutes), "retrain_train_s": train.get("seconds"),
            "retrain_status": out.get("status"), "retrain_reason": out.get("reason"),
            "retrain_candidate_serving": train.get("serving")}  # its verdict: "model" or "safe_choice"


def synthetic_vectors(products: int, seed: int = 0) -> InMemoryVectorSource:
    rng = np.random.default_rng(seed + 1)
    text = rng.standard_normal((products, TEXT_DIM), dtype=np.float32)
    image = rng.standard_normal((products, IMAGE_DIM), dtype=np.float32)
    has_image = rng.random(products) >= 0.2
    vecs = {f"p{j}": (text[j], image[j] if has_image[j] else None) for j in range(products)}
    return InMemoryVectorSource(vecs, text_dim=TEXT_DIM, image_dim=IMAGE_DIM)


def _percentiles_ms(ns: list[int]) -> tuple[float, float]:
    a = np.asarray(ns, dtype=np.float64) / 1e6
    return round(float(np.percentile(a, 50)), 4), round(float(np.percentile(a, 99)), 4)


def run_history_bench(
    sql_url: str | None = None,
    *,
    users: int = 10_000,
    events: int = 500_000,
    products: int = 12_000,
    samples: int = 2_000,
    k: int = 50,
    batch_size: int = 20_000,
    seed: int = 0,
    ubi_searches: int = 15_000,
    retrain_log: Path | None = None,
    retrain_minutes: float = 1.0,
    settings: Any | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return one JSON-ready dict (see the module doc). With ``retrain_log`` (and the process's
    ``settings``), one forced turn of the retraining loop on that log is timed as well (:func:`time_retrain`)."""
    if min(users, events, products, samples) < 1:
        raise ConfigError("users, events, products and samples must all be >= 1")
    if retrain_log is not None:
        if settings is None:
            raise ConfigError("timing the retrain task needs the settings (its catalog, models and data dir)")
        if not Path(retrain_log).exists():
            raise ConfigError(f"--retrain-log not found: {retrain_log}")
    with tempfile.TemporaryDirectory(prefix="fusionrank-bench-history-") as tmp:
        tmpdir = Path(tmp)
        schema = None
        if sql_url is None:
            url: str = f"sqlite:///{tmpdir / 'history.sqlite3'}"
        else:
            u = normalize_url(sql_url)
            if u.get_backend_name() == "postgresql":
                schema = f"fr_bench_{uuid.uuid4().hex[:12]}"
                _run_ddl(make_engine(u), f"CREATE SCHEMA {schema}")
                url = with_search_path(u, schema)
            else:
                url = u.render_as_string(hide_password=False)
        try:
            out = _bench(url, tmpdir, users=users, events=events, products=products, samples=samples, k=k,
                         batch_size=batch_size, seed=seed, ubi_searches=ubi_searches)
            if retrain_log is not None:
                out.update(time_retrain(settings, Path(retrain_log), minutes=retrain_minutes, workdir=tmpdir))
            return out
        finally:
            if schema is not None:
                _run_ddl(make_engine(normalize_url(sql_url)), f"DROP SCHEMA {schema} CASCADE")


def _run_ddl(engine: Any, sql: str) -> None:
    from sqlalchemy import text

    try:
        with sql_errors(sql.split(" ")[0].lower() + " schema", engine.url), engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def _bench(
    url: str, tmpdir: Path, *, users: int, events: int, products: int, samples: int, k: int, batch_size: int, seed: int, ubi_searches: int = 15_000
) -> dict[str, Any]:
    now = time.time()
    csv_path = tmpdir / "events.csv"
    write_synthetic_events(csv_path, users=users, events=events, products=products, now=now, seed=seed)
    upgrade(url)
    vectors = synthetic_vectors(products, seed)
    with HistoryStore(url) as store:
        t0 = time.perf_counter()
        summary = import_events_file(store, csv_path, batch_size=batch_size, progress=False)
        import_s = time.perf_counter() - t0
        log.info("imported %d events in %.1f s", summary.stored, import_s)

        # a UBI log of about the dev log's size (15,000 searches, ~185,000 events), imported twice (the second stores nothing)
        ubi_dir = tmpdir / "ubi"
        ubi_events = write_synthetic_ubi(ubi_dir, searches=ubi_searches, products=products, users=users, now=now, seed=seed)
        t0, c0 = time.perf_counter(), time.process_time()
        ubi_summary = import_ubi_path(store, ubi_dir, batch_size=batch_size)
        ubi_s, ubi_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        ubi_again = import_ubi_path(store, ubi_dir, batch_size=batch_size)
        ubi_again_s = time.perf_counter() - t0

        service = ProfileService(store, vectors, config=ProfileConfig(k=k), cache_size=max(samples, 1), ttl_s=3600)
        rng = np.random.default_rng(seed + 2)
        ids = [f"u{i:06d}" for i in rng.choice(users, size=min(samples, users), replace=False)]
        warmup = [f"u{i:06d}" for i in rng.integers(0, users, 20)]
        for uid in warmup:  # connections, statement cache; not timed
            service.get_profile(uid)
        service.clear()
        cold, warm, sizes = [], [], []
        for uid in ids:
            t = time.perf_counter_ns()
            p = service.get_profile(uid)
            cold.append(time.perf_counter_ns() - t)
            sizes.append(len(p))
        for _ in range(max(1, samples // len(ids))):
            for uid in ids:
                t = time.perf_counter_ns()
                service.get_profile(uid)
                warm.append(time.perf_counter_ns() - t)
        info = service.cache_info()
    c50, c99 = _percentiles_ms(cold)
    w50, w99 = _percentiles_ms(warm)
    return {
        "machine": machine_info(),
        "database": "postgresql" if url.startswith("postgresql") else "sqlite",
        "users": users,
        "events": events,
        "products": products,
        "stored": summary.stored,
        "duplicates": summary.duplicates,
        "rejected": summary.rejected,
        "import_s": round(import_s, 3),
        "import_events_per_s": round(events / import_s, 1),
        "ubi_searches": ubi_searches,
        "ubi_events": ubi_events,
        "ubi_events_stored": ubi_summary.events_stored,
        "ubi_history_events_stored": ubi_summary.history_events_stored,
        "ubi_import_s": round(ubi_s, 3),
        "ubi_import_events_per_s": round(ubi_events / ubi_s, 1),
        # this process's CPU seconds (SQLite runs in it; PostgreSQL's server work is not counted): what a busy shared CPU
        # does not inflate the way it inflates the wall time above
        "ubi_import_cpu_s": round(ubi_cpu_s, 3),
        "ubi_import_events_per_cpu_s": round(ubi_events / max(ubi_cpu_s, 1e-9), 1),
        "ubi_reimport_events_stored": ubi_again.events_stored,
        "ubi_reimport_s": round(ubi_again_s, 3),
        "k": k,
        "profile_samples": len(cold),
        "profile_items_mean": round(float(np.mean(sizes)), 2),
        "profile_ms_p50_cold": c50,
        "profile_ms_p99_cold": c99,
        "profile_ms_p50_warm": w50,
        "profile_ms_p99_warm": w99,
        "cache_hits": info.hits,
        "vectors": f"synthetic in-memory (text {TEXT_DIM}-d, image {IMAGE_DIM}-d, 20% without image)",
        "targets_met": {
            "warm_p99_le_1ms": w99 <= TARGET_WARM_P99_MS,
            "cold_p99_le_10ms": c99 <= TARGET_COLD_P99_MS,
            "ubi_import_ge_20000_events_per_s": ubi_events / ubi_s >= TARGET_UBI_EVENTS_PER_S,
        },
    }

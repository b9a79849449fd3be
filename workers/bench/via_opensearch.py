"""``fusionrank bench serve --via-opensearch``: the same searches through an OpenSearch node with the fusionrank
search pipeline (the plugin's ``fusionrank_rerank`` processor calling the service) and without it.

What runs: a synthetic world as ``bench serve --synthetic`` builds it (:func:`workers.bench.serve.build_synthetic_world`:
a generated text-only catalog, an untrained model of the default size, simulated shoppers with histories), served
by ``fusionrank serve`` in a subprocess; the dev node of :mod:`workers.devnode` (started in a temporary folder,
fusionrank's plugin loaded) or the cluster at ``opensearch_url`` (the plugin must be installed there and the service
reachable from it at ``127.0.0.1``); the world's products copied to an index there. Each request is one BM25
search (the engine's own ``multi_match``) of ``candidates`` hits for a query made from a product title and a
shopper; ``pipeline`` searches send ``ext.fusionrank.user_id`` with ``?search_pipeline=``, ``plain`` ones the
same body without either. Each level is one closed loop of ``c`` threads (one keep-alive connection each) over the
plain and pipeline searches interleaved (plain 1, pipeline 1, plain 2, ...), so that both kinds meet the same load
on a shared machine; a warm-up of 40 searches of each kind runs first (the node's JIT). ``pipeline_degraded`` counts answers whose ``ext.fusionrank.reranked`` is false (failed
open: the service was slower than ``budget_ms`` or failed), a pipeline search that is then about as fast as a
plain one.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from indexing import fields as F
from indexing.errors import FusionRankError

log = logging.getLogger(__name__)


def _level(base_url: str, items: Sequence[tuple[str, str, bytes]], c: int, headers: dict[str, str], warm_up: Sequence[tuple[str, str, bytes]]) -> dict[str, Any]:
    """``items``: (kind, path, body); per kind p50, p99 and how many pipeline answers failed open."""
    from workers.bench.rerank import closed_loop
    from workers.bench.serve import _pct

    u = urlsplit(base_url)
    hdrs = {**headers, "Content-Type": "application/json", "Connection": "keep-alive"}
    local = threading.local()
    opened: list[http.client.HTTPConnection] = []
    lock = threading.Lock()

    def one(item: tuple[str, str, bytes]) -> tuple[str, float, bool]:
        kind, path, body = item
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60.0)
            with lock:
                opened.append(conn)
        t = time.perf_counter()
        conn.request("POST", path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        ms = (time.perf_counter() - t) * 1000.0
        if r.status != 200:
            raise FusionRankError(f"POST {path} answered HTTP {r.status}: {data[:300]!r}")
        ext = json.loads(data).get("ext", {}).get("fusionrank")
        if (ext is None) != (kind == "plain"):
            raise FusionRankError(f"a {kind} search came back {'with' if ext else 'without'} ext.fusionrank")
        return kind, ms, ext is not None and not ext.get("reranked")

    try:
        res, _ = closed_loop(c, one, items, warm_up=warm_up)
    finally:
        for conn in opened:
            conn.close()
    out: dict[str, Any] = {}
    for kind in ("plain", "pipeline"):
        lat = [r[1] for r in res if r[0] == kind]
        out[f"{kind}_p50_ms"], out[f"{kind}_p99_ms"] = round(_pct(lat, 50), 2), round(_pct(lat, 99), 2)
    out["pipeline_degraded"] = sum(r[2] for r in res)
    out["added_p50_ms"] = round(out["pipeline_p50_ms"] - out["plain_p50_ms"], 2)
    return out


def run_via_opensearch_bench(*, synthetic_size: int = 300, requests: int = 200, candidates: int = 100, levels: Sequence[int] = (1, 8),
                             seed: int = 0, budget_ms: int = 50, opensearch_url: str | None = None) -> dict[str, Any]:
    from indexing.engines import create_engine
    from indexing.engines.opensearch import OpenSearchEngine
    from indexing.machine import machine_info
    from mappings import load_mapping
    from rerank.retrieval import opensearch_pipeline as P
    from workers.bench.serve import N_USERS, _start_server, _wait_ready, build_synthetic_world, stop_process, world_settings
    from workers.drill.services import free_port
    from workers import devnode

    tmp = Path(tempfile.mkdtemp(prefix="fusionrank-bench-via-opensearch-"))
    proc = node = None
    try:
        env = dict(os.environ)
        env.update(build_synthetic_world(tmp / "data", size=synthetic_size, seed=seed))
        settings = world_settings(env)
        key = secrets.token_urlsafe(24)
        env["FUSIONRANK_API_KEY"] = key  # only the server and the pipeline get it; never printed
        env["FUSIONRANK_SERVE_NO_AUTH"] = "0"
        if opensearch_url is None:
            node = devnode.start(tmp / "node")
            opensearch_url = node.url
        eng = OpenSearchEngine(opensearch_url, timeout_s=60.0)
        local = create_engine("local", path=settings.data_dir / "engine")
        docs = list(local.iter_documents(settings.index_alias))
        dims = load_mapping("products-v1", text_dim=len(docs[0][F.TEXT_VEC]), image_dim=8, hnsw_engine="lucene")
        local.close()
        index = f"fusionrank-bench-{uuid.uuid4().hex[:8]}"
        eng.create_index(index, dims)
        lines: list[dict[str, Any]] = []
        for d in docs:
            lines += [{"index": {"_index": index, "_id": d[F.ID]}}, d]
        if eng.client.bulk(body=lines, params={"refresh": "true"})["errors"]:
            raise FusionRankError("copying the synthetic products to the node failed")

        port = free_port()
        proc = _start_server(env, port, tmp / "server.log")
        import httpx

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
            _wait_ready(client, proc, tmp / "server.log")
        pipeline = f"fusionrank-bench-{uuid.uuid4().hex[:8]}"
        eng.client.transport.perform_request("PUT", f"/_search/pipeline/{pipeline}",
                                             body=P.fusionrank_pipeline_body(f"http://127.0.0.1:{port}", key, first_stage="none", budget_ms=budget_ms))

        rnd = random.Random(seed)
        users = [f"bench-u{u}" for u in range(N_USERS)]
        plain, piped = [], []
        for _ in range(requests):
            words = [w for w in str(rnd.choice(docs).get(F.TITLE) or "").split() if len(w) > 2] or ["shirt"]
            q = " ".join(rnd.sample(words, min(len(words), rnd.randint(1, 3))))
            body = eng.bm25_body(q, size=candidates, source=[F.ID, F.TITLE])
            plain.append(json.dumps(body).encode())
            piped.append(json.dumps({**body, "ext": {"fusionrank": {"user_id": rnd.choice(users)}}}).encode())
        items = []
        for a, b in zip(plain, piped):
            items += [("plain", f"/{index}/_search", a), ("pipeline", f"/{index}/_search?search_pipeline={pipeline}", b)]
        warm_up = (items * (1 + 80 // len(items)))[:80]
        out = {str(c): _level(opensearch_url, items, c, {}, warm_up) for c in levels}
        eng.client.transport.perform_request("DELETE", f"/_search/pipeline/{pipeline}")
        eng.delete_index(index)
        eng.close()
        return {"levels": out, "requests_per_level": requests, "candidates": candidates, "budget_ms": budget_ms,
                "synthetic_size": synthetic_size, "node": "dev node (workers/devnode.py, 1 GB heap)" if node else opensearch_url,
                "server": "fusionrank serve, 1 worker process, subprocess", "cpu_count": os.cpu_count(), "machine": machine_info()}
    finally:
        stop_process(proc)
        if node is not None:
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["run_via_opensearch_bench"]

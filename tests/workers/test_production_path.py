"""The production steps of docs/operations.md (section "Production stack"), minus the docker lines, end to end against the
session's real OpenSearch node (marked ``opensearch`` and ``slow``).

Each step is the real CLI (the venv's ``fusionrank`` console script) in a subprocess, from a node with no
``products`` alias, with the settings the compose file gives the api (``FUSIONRANK_ENGINE=opensearch``, the
node's URL, a PostgreSQL history store of its own, API keys):

1. ``fusionrank db upgrade``
2. ``fusionrank demo`` (a small synthetic catalog and a short training run): copies its index into OpenSearch and
   points the ``products`` alias at it, installs the trained model
3. ``fusionrank serve`` in the background (the compose ``api``), until ``/readyz`` says ready
4. ``fusionrank opensearch setup-pipeline --service-url http://127.0.0.1:<port>`` (``--no-fail-open``: a service
   failure fails the search instead of hiding behind the first-stage order)
5. a hybrid search through the pipeline: the hits come back in the service's own order, and the service counted
   exactly one ``/v1/rerank`` call, not degraded.

The PostgreSQL database is created for the test and dropped afterwards; the pipeline, model, connector and index
the steps created on the node are removed (the node itself is the session's).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from indexing import fields as F
from workers.devnode import free_port

pytestmark = [pytest.mark.opensearch, pytest.mark.slow]

FUSIONRANK = Path(sys.executable).parent / "fusionrank"  # the console script (pyproject: fusionrank = workers.cli:main)
SYNTHETIC_SIZE = 80
QUERY = "black casual shoes for men"
API_KEY = "prod-path-" + uuid.uuid4().hex
ADMIN_KEY = "prod-path-admin-" + uuid.uuid4().hex
ALIAS = "products"  # the settings' default: what the README's steps use
PIPELINE = "fusionrank-rerank"  # setup-pipeline's default


@pytest.fixture
def pg_database(postgres_url) -> Iterator[str]:
    """A fresh PostgreSQL database on the local server (``postgresql://`` URL, as an operator writes it); dropped afterwards."""
    from sqlalchemy import create_engine, make_url, text

    name = f"fr_prod_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        url = make_url(postgres_url).set(drivername="postgresql", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def prod_env(opensearch_node, pg_database, tmp_path) -> dict[str, str]:
    if opensearch_node.external:
        pytest.skip("runs the production steps from an empty node: the session's own node only")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_") or k == "FUSIONRANK_SHARED_DATA"}
    env.update({
        "FUSIONRANK_ENGINE": "opensearch",
        "FUSIONRANK_OPENSEARCH_URL": opensearch_node.url,
        "FUSIONRANK_HNSW_ENGINE": opensearch_node.hnsw_engine,  # lucene: the node's k-NN has no faiss libraries
        "FUSIONRANK_SQL_URL": pg_database,
        "FUSIONRANK_DATA_DIR": str(tmp_path / "data"),
        "FUSIONRANK_API_KEY": API_KEY,
        "FUSIONRANK_ADMIN_API_KEY": ADMIN_KEY,
        "FUSIONRANK_DEVICE": "cpu",
        # the subject is the wiring: a rerank on this shared 2-core machine must not fail open on the 50 ms budget
        "FUSIONRANK_RERANK_BUDGET_MS": "20000",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    })
    return env


def _cli(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run([str(FUSIONRANK), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"fusionrank {' '.join(args)} exited {res.returncode}\nstdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}"
    return res


def _last_json(res: subprocess.CompletedProcess) -> dict:
    return json.loads(res.stdout.strip().splitlines()[-1])


def _metric(text: str, name: str, labels: dict[str, str]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def _degraded_total(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == "fusionrank_degraded_total")


def _document_text(source: dict, fields) -> str:
    """What neural-search's rerank processor sends per hit: the ``document_fields`` values concatenated with no
    separator (a list's items joined by a space; a missing field is the empty string)."""
    out = []
    for f in fields:
        v = source.get(f)
        if v is None:
            continue
        out.append(" ".join(map(str, v)) if isinstance(v, list) else str(v))
    return "".join(out)


def _cleanup_node(eng, setup: dict | None, extra_pipelines: list[str]) -> None:
    t = eng.client.transport
    steps = [("DELETE", f"/_search/pipeline/{p}") for p in extra_pipelines]
    if setup:
        steps += [("DELETE", f"/_search/pipeline/{setup.get('pipeline')}"), ("POST", f"/_plugins/_ml/models/{setup.get('model_id')}/_undeploy"),
                  ("DELETE", f"/_plugins/_ml/models/{setup.get('model_id')}"), ("DELETE", f"/_plugins/_ml/connectors/{setup.get('connector_id')}")]
    for method, path in steps:
        if "None" in path:
            continue
        try:
            t.perform_request(method, path)
        except Exception:  # best effort: the node goes away with the session
            pass
    try:
        for index in eng.get_alias(ALIAS):
            eng.delete_index(index)
    except Exception:
        pass


def test_the_readme_production_steps_serve_reranked_search_from_an_empty_node(prod_env, opensearch_node, tmp_path):
    from indexing.catalog import Product, read_catalog
    from indexing.encoders import get_text_encoder
    from rerank.retrieval import opensearch_pipeline as P

    env = prod_env
    eng = opensearch_node.engine()
    t = eng.client.transport
    assert eng.get_alias(ALIAS) == [], f"the node already has a {ALIAS!r} alias: this test starts from an empty node"
    serve = None
    setup: dict | None = None
    first_stage_pipeline = f"fusionrank-first-stage-{uuid.uuid4().hex[:8]}"
    serve_log = tmp_path / "serve.log"
    t0 = time.monotonic()
    try:
        # 1. schema
        _cli(env, "db", "upgrade", timeout=120)

        # 2. the demo: index, train, install for serving (the index goes into OpenSearch behind the alias)
        demo = _last_json(_cli(env, "demo", "--synthetic", "--synthetic-size", str(SYNTHETIC_SIZE), "--systems", "bm25,fusion",
                               "--train-minutes", "0.2", "--json", timeout=300))
        serving = demo["steps"]["serving"]
        assert serving["installed"] is True, serving
        index = serving["index"]
        assert index.startswith("fusionrank-eval-") and eng.get_alias(ALIAS) == [index], (serving, eng.get_alias(ALIAS))

        # the plain search through the alias (no pipeline) works, and holds every good row of the synthetic catalog
        catalog = Path(demo["steps"]["data"]["catalog"])
        good = sum(isinstance(p, Product) for p in read_catalog(catalog, images_root=catalog.parent))
        assert good == SYNTHETIC_SIZE
        assert t.perform_request("GET", f"/{ALIAS}/_count")["count"] == good == demo["steps"]["index"]["count"]
        plain = t.perform_request("POST", f"/{ALIAS}/_search", body={"query": {"match": {F.TITLE: "black shoes"}}, "size": 5})
        assert plain["hits"]["hits"] and all(h["_index"] == index for h in plain["hits"]["hits"])

        # 3. the api
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with serve_log.open("w") as log_file:
            serve = subprocess.Popen([str(FUSIONRANK), "serve", "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
                                     env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        ready = None
        while time.monotonic() < deadline:
            assert serve.poll() is None, f"fusionrank serve exited {serve.returncode}:\n{serve_log.read_text()[-4000:]}"
            try:
                r = httpx.get(f"{base}/readyz", timeout=5)
                if r.status_code == 200:
                    ready = r.json()
                    break
                assert r.json().get("status") != "failed", f"serve failed to load: {r.json()}\n{serve_log.read_text()[-4000:]}"
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert ready is not None, f"/readyz not ready within 180 s:\n{serve_log.read_text()[-4000:]}"
        assert ready["model_version"].replace(":", "-") == serving["model_version"], (ready, serving)
        auth = {"Authorization": f"Bearer {API_KEY}"}

        # 4. the search pipeline (the node reaches the service on 127.0.0.1)
        setup = _last_json(_cli(env, "opensearch", "setup-pipeline", "--processor", "ml-rerank", "--service-url", base, "--no-fail-open", "--json", timeout=180))
        assert setup["pipeline"] == PIPELINE and setup["deploy_state"] == "COMPLETED", setup
        pipeline_def = t.perform_request("GET", f"/_search/pipeline/{PIPELINE}")[PIPELINE]
        rerank_procs = [p["rerank"] for p in pipeline_def["response_processors"] if "rerank" in p]
        assert len(rerank_procs) == 1 and rerank_procs[0].get("ignore_failure") is False, pipeline_def
        doc_fields = rerank_procs[0]["context"]["document_fields"]

        # 5. the search through the pipeline
        vec = get_text_encoder("minilm", device="cpu").encode([QUERY])[0]
        body = P.rerank_search_body(QUERY, text_vector=vec, size=20, document_fields=doc_fields)
        before = httpx.get(f"{base}/metrics", headers=auth, timeout=10)
        assert before.status_code == 200, before.text
        resp = t.perform_request("POST", f"/{ALIAS}/_search", params={"search_pipeline": PIPELINE}, body=body)
        after = httpx.get(f"{base}/metrics", headers=auth, timeout=10).text
        hits = resp["hits"]["hits"]
        assert hits and all(h["_index"] == index for h in hits), resp
        v1 = {"endpoint": "/v1/rerank", "status": "200"}
        assert _metric(after, "fusionrank_requests_total", v1) == _metric(before.text, "fusionrank_requests_total", v1) + 1, \
            "the cluster called the service's /v1/rerank exactly once"
        assert _degraded_total(after) == _degraded_total(before.text), "the pipeline's rerank call failed open"

        # the order is the service's own: the first stage alone (the same pipeline less its rerank processor) gives
        # the documents the processor sent, in the order it sent them; ask the service directly with them
        first_stage = {k: v for k, v in pipeline_def.items() if k != "response_processors"}
        t.perform_request("PUT", f"/_search/pipeline/{first_stage_pipeline}", body=first_stage)
        fs = t.perform_request("POST", f"/{ALIAS}/_search", params={"search_pipeline": first_stage_pipeline},
                               body={k: v for k, v in body.items() if k != "ext"})["hits"]["hits"]
        assert sorted(h["_id"] for h in fs) == sorted(h["_id"] for h in hits)
        texts = [_document_text(h["_source"], doc_fields) for h in fs]
        assert all(texts)
        direct = httpx.post(f"{base}/v1/rerank", headers=auth, json={"query": QUERY, "documents": texts, "top_n": len(texts)}, timeout=60)
        assert direct.status_code == 200, direct.text
        d = direct.json()
        assert d["fusionrank"]["degraded"] is None, d["fusionrank"]
        ranked = sorted(d["results"], key=lambda r: -r["relevance_score"])
        want = [fs[r["index"]]["_id"] for r in ranked]
        direct_score = {fs[r["index"]]["_id"]: r["relevance_score"] for r in ranked}
        got = [h["_id"] for h in hits]
        # OpenSearch keeps each hit's score as a float32: the order is the service's up to scores equal in float32
        f32 = [float(np.float32(direct_score[i])) for i in got]
        assert f32 == sorted(f32, reverse=True), list(zip(got, want, f32))
        if len(set(f32)) == len(f32):
            assert got == want
        assert all(math.isclose(h["_score"], direct_score[h["_id"]], rel_tol=1e-6) for h in hits), [(h["_score"], direct_score[h["_id"]]) for h in hits]
        assert want != [h["_id"] for h in fs], "the service left the first-stage order as it was: nothing shows the rerank"
        assert time.monotonic() - t0 < 240, f"the production path took {time.monotonic() - t0:.0f} s"
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait(timeout=10)
        _cleanup_node(eng, setup, [first_stage_pipeline])
        eng.close()

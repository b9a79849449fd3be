"""The bulk indexing job through real Celery workers on the real Redis broker, including a worker
killed with SIGKILL in the middle of a job, and the same job into the real OpenSearch node (``opensearch``)."""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from indexing import fields as F
from indexing.pipeline import IndexJob
from workers.composition import build_engine
from workers.jobs import run_index_job
from workers.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = 96
BATCH = 8
REDIS_DB = 11  # a database of its own on the shared Redis, flushed by this module


class Worker:
    """A real `fusionrank worker` process in its own process group (so SIGKILL takes its children too)."""

    def __init__(self, env: dict[str, str], name: str, queues: str = "embed,index"):
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "-Q", queues, "-c", "1", "-n", f"{name}@%h"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if " ready." in line:
                return
        self.kill()
        raise RuntimeError(f"worker {name} did not become ready")

    def _pump(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.put(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture()
def celery_env(tmp_path, redis_url, monkeypatch):
    import redis

    url = f"{redis_url}/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    monkeypatch.setenv("FUSIONRANK_BROKER_URL", url)
    monkeypatch.setenv("FUSIONRANK_DATA_DIR", str(tmp_path / "celery-data"))
    monkeypatch.setenv("FUSIONRANK_BROKER_VISIBILITY_TIMEOUT_S", "4")
    monkeypatch.setenv("FUSIONRANK_DEVICE", "cpu")
    env = {k: v for k, v in os.environ.items()}
    yield env
    redis.Redis.from_url(url).flushdb()


def _job(shared_data: Path) -> IndexJob:
    return IndexJob(
        catalog=str(shared_data / "fashion" / "bench" / "catalog.csv"),
        index="products",
        images_root=str(shared_data / "fashion"),
        batch_size=BATCH,
        device="cpu",
    )


def _hashes(engine) -> dict[str, str]:
    engine.refresh("products")
    return {d[F.ID]: d[F.CONTENT_HASH] for d in engine.iter_documents("products")}


def test_celery_job_survives_a_killed_worker(celery_env, shared_data, tmp_path, monkeypatch):
    settings = load_settings()
    job = _job(shared_data)
    engine = build_engine(settings)
    done: list[int] = []
    workers = [Worker(celery_env, "first")]
    killed = threading.Event()

    def on_batch(r):
        done.append(r.start)
        if len(done) == 3 and not killed.is_set():
            workers[0].kill()  # SIGKILL mid-job: the batch in flight was never acknowledged
            killed.set()
            workers.append(Worker(celery_env, "second"))

    try:
        summary = run_index_job(engine, settings, job, via="celery", limit=ROWS, progress=False, timeout_s=300, on_batch=on_batch)
    finally:
        for w in workers:
            w.kill()
    assert killed.is_set() and len(workers) == 2
    assert summary.failed == 0, summary.errors[:5]
    assert summary.indexed + summary.unchanged == ROWS  # every batch accounted for once in the summary
    assert summary.batches == ROWS // BATCH
    celery_hashes = _hashes(engine)
    assert len(celery_hashes) == ROWS == engine.count("products")  # no loss, no duplicates

    # a clean inline run of the same slice into another data dir gives the same documents
    monkeypatch.setenv("FUSIONRANK_DATA_DIR", str(tmp_path / "inline-data"))
    clean_settings = load_settings()
    clean_engine = build_engine(clean_settings)
    clean = run_index_job(clean_engine, clean_settings, job, via="inline", limit=ROWS, progress=False)
    assert clean.indexed == ROWS and clean.failed == 0
    assert _hashes(clean_engine) == celery_hashes

    # the stored vectors are what a direct encoder call gives
    from indexing.catalog import read_catalog
    from indexing.documents import product_text
    from indexing.encoders import get_text_encoder

    products = [p for p in read_catalog(job.catalog, stop=5) if hasattr(p, "fields")]
    docs = engine.get("products", [p.id for p in products], fields=[F.TEXT_VEC])
    direct = get_text_encoder("minilm", device="cpu").encode([product_text(p) for p in products])
    stored = np.array([docs[p.id][F.TEXT_VEC] for p in products], dtype=np.float32)
    cos = np.sum(direct * stored, axis=1)
    assert np.all(cos > 0.999), cos


def test_a_batch_the_broker_lost_is_sent_again(celery_env, shared_data):
    """Kombu's Redis transport pops a message before recording it as unacknowledged: a worker killed in
    between loses it for good. Here the batches are queued with no worker running, one message is removed
    from the broker (that same state), then a worker starts: the job notices that no worker holds the
    missing batch and sends it again."""
    import redis

    from workers.jobs import _run_celery, prepare
    from indexing.pipeline import summarize

    settings = load_settings()
    job = _job(shared_data)
    engine = build_engine(settings)
    rows, batches, dups, _, index = prepare(engine, settings, job, limit=48)
    client = redis.Redis.from_url(settings.broker_url)
    out: dict = {}
    t = threading.Thread(
        target=lambda: out.update(results=_run_celery(settings, job, batches, dups, on_batch=lambda r: None, timeout_s=240,
                                                       stall_s=3, require_worker=False, generation=index)),
        daemon=True,
    )
    t.start()
    deadline = time.monotonic() + 30
    while client.llen("embed") < len(batches) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.llen("embed") == len(batches), "every batch is queued before a worker runs"
    assert client.rpop("embed") is not None  # lost: neither queued nor unacknowledged
    worker = Worker(celery_env, "late")
    try:
        t.join(timeout=240)
    finally:
        worker.kill()
    assert not t.is_alive(), "the job finished"
    summary = summarize(index, "celery", rows, out["results"], 1.0)
    assert summary.failed == 0 and summary.indexed + summary.unchanged == 48 == rows
    engine.refresh("products")
    assert engine.count("products") == 48


def test_celery_job_without_a_worker_says_how_to_start_one(celery_env, shared_data):
    from workers.jobs import NoWorkerError

    settings = load_settings()
    with pytest.raises(NoWorkerError, match="fusionrank worker"):
        run_index_job(build_engine(settings), settings, _job(shared_data), via="celery", limit=8, progress=False)


# --- the same Celery job into the real OpenSearch node -------------------------------------------------------

NODE_PLAIN = 30  # the bench catalog's first rows: products without a photo
NODE_PHOTOS = 170  # the first rows that have a photo, with their real JPEGs
NODE_BATCH = 32
MALFORMED_AT = 45  # data row of the written catalog that has the wrong column count
CORRUPT_AT = 100  # data row whose photo is a truncated copy of a real JPEG


def _node_catalog(shared_data: Path, tmp_path: Path) -> tuple[Path, Path, list[dict[str, str]], str]:
    """A slice of the real fashion bench catalog: ``NODE_PLAIN`` products without a photo and ``NODE_PHOTOS``
    with one (the photos copied into an images root of this test), plus a malformed row and a product whose
    photo is truncated. Returns (catalog, images root, the good rows in catalog order, the corrupt photo's product id)."""
    import csv
    import shutil

    fashion = shared_data / "fashion"
    with open(fashion / "bench" / "catalog.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or ())
        rows = list(reader)
    plain = [r for r in rows if not r["image"]][:NODE_PLAIN]
    photos = [r for r in rows if r["image"]][: NODE_PHOTOS + 1]
    good, corrupt = plain + photos[:NODE_PHOTOS], photos[NODE_PHOTOS]
    root = tmp_path / "fashion-slice"
    (root / "images").mkdir(parents=True)
    for r in photos[:NODE_PHOTOS]:
        shutil.copyfile(fashion / r["image"], root / r["image"])
    data = (fashion / corrupt["image"]).read_bytes()
    (root / corrupt["image"]).write_bytes(data[: len(data) // 2])  # a JPEG cut in the middle of its scan data

    lines: list[list[str]] = [[r[c] for c in header] for r in good]
    lines.insert(MALFORMED_AT, ["99999999", "A row with too few fields", "Men"])
    lines.insert(CORRUPT_AT, [corrupt[c] for c in header])
    catalog = tmp_path / "fashion-slice.csv"
    with open(catalog, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(lines)
    return catalog, root, good, corrupt["product_id"]


@pytest.fixture()
def node_env(celery_env, opensearch_node, monkeypatch):
    """``celery_env`` pointed at the OpenSearch node (FUSIONRANK_ENGINE / _OPENSEARCH_URL / _HNSW_ENGINE), with an
    alias of this test's own; the indices behind it are deleted afterwards."""
    import uuid

    alias = f"celery-fashion-{uuid.uuid4().hex[:8]}"
    extra = {
        "FUSIONRANK_ENGINE": "opensearch",
        "FUSIONRANK_OPENSEARCH_URL": opensearch_node.url,
        "FUSIONRANK_HNSW_ENGINE": opensearch_node.hnsw_engine,  # lucene on the session's node
        "FUSIONRANK_INDEX_ALIAS": alias,
        "FUSIONRANK_OPENSEARCH_TIMEOUT_S": "60",
    }
    if opensearch_node.external:
        extra["FUSIONRANK_OPENSEARCH_VERIFY_CERTS"] = os.environ.get("OPENSEARCH_VERIFY_CERTS", "true")
        if os.environ.get("OPENSEARCH_CA_CERTS"):
            extra["FUSIONRANK_OPENSEARCH_CA_CERTS"] = os.environ["OPENSEARCH_CA_CERTS"]
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
        celery_env[k] = v
    yield celery_env, alias
    eng = opensearch_node.engine()
    try:
        for index in eng.list_indices(alias):
            eng.delete_index(index)
    finally:
        eng.close()


def _unique(rows: list[dict[str, str]], key) -> list[dict[str, str]]:
    seen: dict[str, int] = {}
    for r in rows:
        seen[key(r)] = seen.get(key(r), 0) + 1
    return [r for r in rows if seen[key(r)] == 1]


@pytest.mark.opensearch
def test_celery_job_indexes_the_fashion_catalog_into_the_opensearch_node(node_env, opensearch_node, shared_data, tmp_path):
    from indexing.catalog import read_catalog
    from indexing.documents import product_text
    from indexing.encoders import get_image_encoder, get_text_encoder
    from indexing.images import decode_image
    from indexing.pipeline import BatchResult

    env, alias = node_env
    catalog, images_root, good, corrupt_id = _node_catalog(shared_data, tmp_path)
    settings = load_settings()
    assert (settings.engine, settings.opensearch_url, settings.index_alias) == ("opensearch", opensearch_node.url, alias)
    job = IndexJob(catalog=str(catalog), index=alias, images_root=str(images_root), batch_size=NODE_BATCH, device="cpu")
    rows = len(good) + 2
    engine = build_engine(settings)
    first_batches: list[BatchResult] = []
    worker = Worker(env, "node")
    try:
        summary = run_index_job(engine, settings, job, via="celery", progress=False, timeout_s=240, on_batch=first_batches.append)
        t0 = time.monotonic()
        again = run_index_job(engine, settings, job, via="celery", progress=False, timeout_s=120)
        rerun_s = time.monotonic() - t0
    finally:
        worker.kill()

    # the job summary: every good row written, the two bad ones counted with their reasons, the batch went on
    assert summary.rows == rows and summary.batches == -(-rows // NODE_BATCH)
    assert (summary.indexed, summary.unchanged, summary.failed) == (len(good), 0, 2), summary.errors
    assert summary.reasons == {"wrong column count": 1, "image": 1}
    errors = {e.row: e for e in summary.errors}
    assert set(errors) == {MALFORMED_AT, CORRUPT_AT}
    assert errors[MALFORMED_AT].reason.startswith("wrong column count: expected 11 fields, got 3")
    assert errors[CORRUPT_AT].id == corrupt_id
    assert "truncated" in errors[CORRUPT_AT].reason
    for bad in (MALFORMED_AT, CORRUPT_AT):
        (batch,) = [b for b in first_batches if b.start <= bad < b.stop]
        assert batch.indexed == (batch.stop - batch.start) - 1 and len(batch.errors) == 1  # the rest of the batch went on

    # what the node holds: the good rows, once each, in a lucene-HNSW generation behind the alias
    node = opensearch_node.engine()
    try:
        (index,) = node.get_alias(alias)
        assert summary.index == index
        assert node.count(alias) == len(good)
        props = node.get_mapping(index)["mappings"]["properties"]
        assert {f: (props[f]["dimension"], props[f]["method"]["engine"]) for f in (F.TEXT_VEC, F.IMAGE_VEC)} == {
            F.TEXT_VEC: (384, opensearch_node.hnsw_engine), F.IMAGE_VEC: (1280, opensearch_node.hnsw_engine)}
        ids = [r["product_id"] for r in good]
        docs = node.get(alias, ids, fields=[F.TEXT_VEC, F.IMAGE_VEC, F.IMAGE_COLOUR, F.HAS_IMAGE])
        assert sorted(docs) == sorted(ids)
        with_photo = {r["product_id"] for r in good if r["image"]}
        assert all(len(d[F.TEXT_VEC]) == 384 for d in docs.values())
        assert all(len(docs[i][F.IMAGE_VEC]) == 1280 and docs[i][F.HAS_IMAGE] for i in with_photo)
        assert all(len(docs[i][F.IMAGE_COLOUR]) == props[F.IMAGE_COLOUR]["dimension"] for i in with_photo)  # products-v3
        assert not any(F.IMAGE_VEC in d or d[F.HAS_IMAGE] for i, d in docs.items() if i not in with_photo)

        # BM25 through OpenSearchEngine: a product's own title finds it first
        by_title = _unique(good, lambda r: r["title"].casefold())
        for r in (by_title[0], by_title[len(by_title) // 2], by_title[-1]):
            hits = node.bm25_search(alias, r["title"], size=5)
            assert hits and hits[0].id == r["product_id"], (r["title"], [h.id for h in hits])

        # kNN through OpenSearchEngine: a product's own text (encoded here) and own photo find it first
        products = {p.id: p for p in read_catalog(str(catalog), images_root=images_root) if hasattr(p, "fields")}
        assert len(products) == len(good) + 1  # the corrupt photo is a valid row; only its image fails
        texts = {pid: product_text(products[pid]) for pid in ids}
        by_text = [r["product_id"] for r in _unique(good, lambda r: texts[r["product_id"]])]
        picks = [by_text[0], by_text[-1]]  # one without a photo, one with
        assert picks[0] not in with_photo and picks[1] in with_photo
        qv = get_text_encoder("minilm", device="cpu").encode([texts[p] for p in picks])
        for pid, v in zip(picks, qv):
            stored = np.asarray(docs[pid][F.TEXT_VEC], dtype=np.float32)
            assert float(stored @ v) > 0.999  # the worker stored what a direct encoder call gives
            hits = node.knn_search(alias, F.TEXT_VEC, v, k=10)
            assert hits[0].id == pid, (pid, [h.id for h in hits])
        photo = picks[1]
        iv = get_image_encoder("efficientnet_lite0", device="cpu").encode(
            [decode_image((images_root / products[photo].image).read_bytes())])[0]
        assert float(np.asarray(docs[photo][F.IMAGE_VEC], dtype=np.float32) @ iv) > 0.999
        hits = node.knn_search(alias, F.IMAGE_VEC, iv, k=10)
        assert hits[0].id == photo and len(hits) == 10 and {h.id for h in hits} <= with_photo

        # a re-run is idempotent: every good row found unchanged, nothing rewritten, the bad rows fail again
        assert (again.indexed, again.unchanged, again.failed) == (0, len(good), 2), again.errors
        assert again.reasons == summary.reasons and again.index == index
        assert node.count(alias) == len(good)
        versions = {d["_id"]: d["_version"] for d in node.client.mget(index=alias, body={"ids": ids}, params={"_source": "false"})["docs"]}
        assert set(versions.values()) == {1}, {k: v for k, v in versions.items() if v != 1}
        assert rerun_s < summary.seconds
    finally:
        node.close()
        engine.close()


@pytest.mark.opensearch
def test_a_worker_configured_for_another_engine_refuses_the_job(node_env, shared_data, tmp_path):
    """`fusionrank index --engine opensearch --via celery` with a worker started without FUSIONRANK_ENGINE: the job
    prepares its generation on the node, the worker's engine is its local one. Its local engine even has the alias
    (the worker machine once indexed locally), so before the job named its generation the worker wrote all the
    products there and the job reported them indexed while the node held none."""
    from indexing.lifecycle import ensure_alias
    from indexing.pipeline import Encoders
    from workers.jobs import WorkerEngineMismatchError

    env, alias = node_env
    worker_env = {k: v for k, v in env.items() if k not in ("FUSIONRANK_ENGINE", "FUSIONRANK_OPENSEARCH_URL")}
    worker_env["FUSIONRANK_DATA_DIR"] = str(tmp_path / "worker-data")
    settings = load_settings()
    job = dataclasses.replace(_job(shared_data), index=alias)
    enc = Encoders.for_job(job)
    local = build_engine(load_settings(engine="local", data_dir=tmp_path / "worker-data"))
    ensure_alias(local, alias, settings.mapping, text_dim=enc.text_info.dim, image_dim=enc.image_info.dim)
    engine = build_engine(settings)
    worker = Worker(worker_env, "elsewhere")
    try:
        with pytest.raises(WorkerEngineMismatchError, match=r"local engine under .*worker-data.* has no index") as e:
            run_index_job(engine, settings, job, via="celery", limit=16, progress=False, timeout_s=120)
    finally:
        worker.kill()
    assert "FUSIONRANK_OPENSEARCH_URL" in str(e.value)
    assert engine.count(alias) == 0
    local.refresh(alias)
    assert local.count(alias) == 0  # nothing written where the job does not look
    engine.close()

"""The bulk indexing job through real Celery workers on the real Redis broker, including a worker
killed with SIGKILL in the middle of a job."""

from __future__ import annotations

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

    def __init__(self, env: dict[str, str], name: str):
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "-Q", "embed,index", "-c", "1", "-n", f"{name}@%h"],
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
                                                       stall_s=3, require_worker=False)),
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

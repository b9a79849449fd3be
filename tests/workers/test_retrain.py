"""The retraining loop through a real Celery worker on the real Redis broker: a simulated UBI log (clicks follow the
hidden grades with a position bias) is imported into the store; the retrain task trains a candidate, promotes it
over a worse serving model, skips when no new behaviour arrived, refuses a candidate trained on poisoned behaviour,
and `fusionrank model rollback` goes back. Real training (a small fusion ranker), real click models, real registry."""

from __future__ import annotations

import gzip
import json
import os
import random
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.workers.test_celery_indexing import Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REDIS_DB = 12
HOLDOUT = 0.3
MARGIN = 0.02
OPTIONS = {"epochs": 10, "min_epochs": 4, "patience": 4, "d_model": 32, "hidden": 64, "max_minutes": 3.0, "use_image": False,
           "use_colour": False, "threads": 1}


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        q, _, d, g = line.split()
        out.setdefault(q, {})[d] = int(g)
    return out


def _write_log(out: Path, queries: dict[str, str], qrels: dict[str, dict[str, int]], others: list[str], *, searches: int, seed: int,
               poisoned: bool = False, only: set[str] | None = None) -> int:
    """UBI queries/events JSONL.gz: each search shows 10 products (the query's judged ones and some others, shuffled); a
    shopper examines position r with probability 1/r^0.6 and clicks an examined product with 0.75 (grade 2), 0.3 (grade
    1), 0.03 (others). ``poisoned``: clicks go to the others only (a crowd of bots: one client per search, so the
    per-client cap does not see them). Returns the number of events."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc) - timedelta(days=2)
    out.mkdir(parents=True, exist_ok=True)
    n_events = 0
    with gzip.open(out / "ubi_queries.jsonl.gz", "wt") as fq, gzip.open(out / "ubi_events.jsonl.gz", "wt") as fe:
        for qid, text in sorted(queries.items()):
            if only is not None and text not in only:
                continue
            judged = qrels.get(qid, {})
            for s in range(searches):
                shown = list(judged) + rng.sample(others, 10 - min(len(judged), 8))
                shown = shown[:10]
                rng.shuffle(shown)
                sid = str(uuid.UUID(int=rng.getrandbits(128)))
                client = f"{'bot' if poisoned else 'c'}-{seed}-{qid}-{s}"
                ts = now + timedelta(seconds=rng.randrange(86_400))
                fq.write(json.dumps({"query_id": sid, "user_query": text, "client_id": client, "application": "test-shop",
                                     "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"), "query_response_hit_ids": shown,
                                     "object_id_field": "product_id"}) + "\n")
                for r, pid in enumerate(shown, 1):
                    g = judged.get(pid)
                    if poisoned:
                        p = 0.0 if g else 0.5
                    else:
                        p = (1 / r ** 0.6) * {2: 0.75, 1: 0.3, 0: 0.03, None: 0.03}[g]
                    if rng.random() < p:
                        fe.write(json.dumps({"action_name": "click", "query_id": sid, "client_id": client, "application": "test-shop",
                                             "message_type": "INTERACTION", "timestamp": (ts + timedelta(seconds=5 + r)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                             "event_attributes": {"object": {"object_id": pid, "object_id_field": "product_id"},
                                                                  "position": {"ordinal": r}}}) + "\n")
                        n_events += 1
    return n_events


def _write_spam(out: Path, text: str, product: str, others: list[str], *, searches: int = 2000) -> None:
    """One client searching ``text`` again and again and clicking ``product`` (shown first) every time."""
    rng = random.Random(9)
    ts = datetime.now(timezone.utc) - timedelta(days=1)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "ubi_queries.jsonl.gz", "wt") as fq, gzip.open(out / "ubi_events.jsonl.gz", "wt") as fe:
        for s in range(searches):
            sid = f"spam-{s}"
            t = (ts + timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%SZ")
            fq.write(json.dumps({"query_id": sid, "user_query": text, "client_id": "spammer", "timestamp": t,
                                 "query_response_hit_ids": [product, *rng.sample(others, 9)]}) + "\n")
            fe.write(json.dumps({"action_name": "click", "query_id": sid, "client_id": "spammer", "timestamp": t,
                                 "event_attributes": {"object": {"object_id": product}, "position": {"ordinal": 1}}}) + "\n")


def _import(sql_url: str, folder: Path) -> dict:
    from rerank.history import HistoryStore
    from rerank.history.ubi_ingest import import_ubi_path

    with HistoryStore(sql_url) as store:
        return import_ubi_path(store, folder).to_dict()


@pytest.fixture(scope="module")
def world(shared_data, tmp_path_factory):
    from tests.rerank.evaldata import build_fashion_slice

    d = tmp_path_factory.mktemp("retrain")
    sl = build_fashion_slice(shared_data, d / "slice", n_queries=48, judged_per_query=8, others=60)
    rows = [line.split("\t") for line in sl.queries.read_text().splitlines()[1:]]
    queries = {r[0]: r[1] for r in rows}
    qrels = _read_qrels(sl.qrels)
    import csv

    with open(sl.catalog, newline="") as f:
        ids = [r["product_id"] for r in csv.DictReader(f)]
    judged = {p for v in qrels.values() for p in v}
    others = [p for p in ids if p not in judged]
    return d, sl, queries, qrels, others


@pytest.fixture()
def env(world, tmp_path, redis_url, monkeypatch):
    import redis

    from rerank.history.store import upgrade

    d, sl, *_ = world
    url = f"{redis_url}/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    sql = f"sqlite:///{tmp_path / 'history.sqlite3'}"
    upgrade(sql)
    for k, v in {"BROKER_URL": url, "DATA_DIR": str(tmp_path / "data"), "SQL_URL": sql, "DEVICE": "cpu", "RETRAIN_CATALOG": str(sl.catalog),
                 "RETRAIN_MIN_NEW_EVENTS": "500", "RETRAIN_MARGIN": str(MARGIN), "RETRAIN_HOLDOUT": str(HOLDOUT),
                 "RETRAIN_CHECK_INTERVAL_S": "0", "QUERY_TEXT_BACKEND": "torch"}.items():
        monkeypatch.setenv(f"FUSIONRANK_{k}", v)
    yield {k: v for k, v in os.environ.items()}, sql, tmp_path
    redis.Redis.from_url(url).flushdb()


def _top10(settings, model_dir: Path, text: str) -> list[str]:
    """What the model serves for ``text`` over the retrain task's evaluation index (the catalog's cached index)."""
    from indexing.encoders import get_text_encoder
    from rerank.evaluation.harness import cached_index
    from workers.jobs import run_index_job
    from workers.retrain import _reranker

    cat, root = settings.retrain_inputs()
    idx = cached_index(cat, root, data_dir=settings.data_dir, indexer=lambda e, j: run_index_job(e, settings, j, progress=False),
                       text_model=settings.text_model, text_backend=settings.text_backend, image_model=settings.image_model,
                       device="cpu", mapping=settings.mapping)
    r = _reranker(idx, model_dir, get_text_encoder(settings.text_model, device="cpu"), settings)
    try:
        return r.search(text, size=10).ids
    finally:
        r.close()


def _bad_model(world, tmp_path, settings) -> Path:
    """A serving model trained on wrong judgments (every query's 'relevant' products are random other products), made to
    serve its own order: training's verdict would have it serve the first stage instead (rerank.safe), as an artifact
    trained before that verdict existed does."""
    from rerank.training.ranker import DatasetSpec, train_ranker
    from workers.jobs import run_index_job
    from workers.retrain import train_config

    d, sl, queries, qrels, others = world
    rng = random.Random(5)
    wrong = tmp_path / "wrong-qrels.tsv"
    wrong.write_text("".join(f"{q} 0 {p} 2\n" for q in sorted(qrels) for p in rng.sample(others, 6)))
    ds = DatasetSpec(sl.catalog, sl.queries, wrong, gain="identity", images_root=sl.catalog.parent, name="wrong", mode="retrieve")
    res = train_ranker([ds], out=tmp_path / "bad-model", data_dir=settings.data_dir, config=train_config(settings, OPTIONS),
                       indexer=lambda engine, job: run_index_job(engine, settings, job, progress=False))
    cfg_file = Path(res.artifact) / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["serving"] = {"policy": "model", "signal": None, "verdict": None, "reason": "the test's bad model serves its own order"}
    cfg_file.write_text(json.dumps(cfg))
    return res.artifact


def test_the_retrain_task_promotes_a_better_model_refuses_a_worse_one_and_rolls_back(world, env):
    from rerank.training.loop import is_heldout
    from workers.cli import app
    from workers.celery_app import create_app
    from workers.retrain import registry_of
    from workers.settings import load_settings

    environ, sql, tmp = env
    d, sl, queries, qrels, others = world
    settings = load_settings()
    reg = registry_of(settings)
    cli = CliRunner()

    # the serving model: a bad one, installed by hand
    bad = reg.add(_bad_model(world, tmp, settings))
    r = cli.invoke(app, ["model", "promote", bad, "--json"])
    assert r.exit_code == 0, r.output
    assert reg.current() == bad

    w = Worker(environ, "retrain", queues="admin")
    try:
        celery = create_app(settings)

        def run(**kw):
            return celery.send_task("fusionrank.model.retrain", kwargs={"options": OPTIONS, **kw}).get(timeout=900)

        # nothing logged yet: skipped
        out = run()
        assert out["status"] == "skipped" and out["new_events"] == 0

        # shoppers' behaviour arrives: the candidate beats the bad serving model on the held-out queries' behaviour
        n = _write_log(tmp / "good", queries, qrels, others, searches=14, seed=1)
        assert n > 500
        summary = _import(sql, tmp / "good")
        assert summary["rejected"] == 0
        # ... and a spammer hammering an irrelevant product for one training query
        spam_text = sorted(t for t in queries.values() if not is_heldout(t, HOLDOUT))[0]
        spam_product = others[0]
        _write_spam(tmp / "spam", spam_text, spam_product, others[1:])
        _import(sql, tmp / "spam")
        out = run()
        assert out["status"] == "promoted", out
        good = out["version"]
        ev = out["evaluation"]["log"]
        assert ev["diff"] >= MARGIN and ev["candidate"]["ndcg@10"] > ev["serving"]["ndcg@10"]
        assert out["evaluation"]["against"] == bad and out["heldout"]["queries"] >= 5 and out["train"]["queries"] >= 20
        assert reg.current() == good
        cov = out["train"]["log_coverage"]  # the share of the first stage the log judged, training and validation queries
        assert set(cov) == {"train", "validation"} and all(0 < c["top10"] <= 1 and 0 < c["all"] <= 1 for c in cov.values())
        assert 0 < cov["train"]["queries"] + cov["validation"]["queries"] <= out["train"]["queries"]
        lp = out["train"]["label_part"]  # the log's label part: half of each training query's searches (seeded by search)
        assert lp["share"] == 0.5 and lp["queries"] >= 20 and 0 < lp["sessions"] < out["train"]["sessions"]
        capped = out["train"]["spam_capping"]
        assert capped["sessions_capped"] >= 1997 and capped["clicks_capped"] >= 1999  # 3 searches kept, their click counted once
        top = _top10(settings, reg.path(good), spam_text)
        assert spam_product not in top, (spam_text, top)

        # no new behaviour: nothing trained
        again = run()
        assert again["status"] == "skipped" and again["new_events"] == 0

        # poisoned behaviour on the training queries (bots clicking irrelevant products): trained on it, the candidate
        # is worse on the held-out behaviour and is refused; it is kept as a version all the same
        train_texts = {t for t in queries.values() if not is_heldout(t, HOLDOUT)}
        _write_log(tmp / "poison", queries, qrels, others, searches=40, seed=2, poisoned=True, only=train_texts)
        _import(sql, tmp / "poison")
        out = run(qrels=str(sl.qrels), queries=str(sl.queries))
        assert out["status"] == "refused", out
        assert out["evaluation"]["log"]["diff"] < MARGIN and "qrels" in out["evaluation"]
        assert reg.current() == good and out["version"] in {v.version for v in reg.versions()}
    finally:
        w.kill()

    # every version is listed; the ledger has the decisions; rollback goes back to the model that served before
    r = cli.invoke(app, ["model", "list", "--json", "--ledger"])
    listing = json.loads(r.output)
    assert listing["current"] == good and len(listing["versions"]) == 3
    assert [e.get("decision") for e in listing["ledger"] if e["action"] == "retrain"] == ["promoted", "refused"]
    # each retraining's log coverage stays in the ledger: a shop sees whether its log learns more of the first stage
    assert all(0 < e["retrain"]["log_coverage"]["train"]["all"] <= 1 for e in listing["ledger"] if e["action"] == "retrain")
    r = cli.invoke(app, ["model", "rollback", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["version"] == bad and reg.current() == bad
    r = cli.invoke(app, ["model", "rollback"])
    assert r.exit_code != 0 and "nothing to roll back" in str(r.exception)

"""Reindex jobs on the LocalEngine with real encoders and a real SQL job record: reuse, re-encoding, faults at
every step (exception and SIGKILL) with resume, continuous searches during the job, rollback, cleanup, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from indexing import fields as F
from indexing.engines import create_engine
from indexing.pipeline import IndexJob
from indexing.reindex import ReindexError
from rerank.history.store import upgrade
from workers.reindex_jobs import (
    ReindexJobStore, abandon_job, cleanup_generations, make_plan, resume_job, rollback_alias, start_job, status,
)
from workers.settings import load_settings

ALIAS = "products"
N = 30
BATCH = 8  # 4 batches


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A source generation of N synthetic products (real encoders), built once; tests work on copies."""
    from indexing.synthetic import make_synthetic_catalog
    from workers.jobs import run_index_job

    base = tmp_path_factory.mktemp("reindex-src")
    cat = make_synthetic_catalog(base / "catalog", N)
    s = load_settings(data_dir=str(base / "data"), index_alias=ALIAS, engine="local", device="cpu")
    eng = create_engine("local", path=base / "data" / "engine")
    job = IndexJob(catalog=str(cat), index=ALIAS, images_root=str(cat.parent), device="cpu", batch_size=64)
    summary = run_index_job(eng, s, job, progress=False)
    eng.close()
    assert summary.failed == 0
    return base, cat


@pytest.fixture
def env(built, tmp_path, monkeypatch):
    base, cat = built
    shutil.copytree(base / "data", tmp_path / "data")
    monkeypatch.setenv("FUSIONRANK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FUSIONRANK_DEVICE", "cpu")
    s = load_settings()
    upgrade(s.effective_sql_url)
    eng = create_engine("local", path=tmp_path / "data" / "engine")
    store = ReindexJobStore(s.effective_sql_url)
    yield s, eng, store, cat
    store.close()
    eng.close()


def _plan(eng, s, cat, **kw):
    args = dict(alias=ALIAS, mapping="products-v1", text_model="minilm", text_backend="torch", image_model="efficientnet_lite0",
                images_root=str(cat.parent), device="cpu", batch_size=BATCH)
    args.update(kw)
    return make_plan(eng, **args)


def _assert_alias_complete(eng) -> None:
    eng.refresh(ALIAS)
    assert eng.count(ALIAS) == N
    assert len(eng.get_alias(ALIAS)) == 1


def test_reuse_copies_vectors_into_a_new_mapping_and_swaps(env):
    s, eng, store, cat = env
    plan = _plan(eng, s, cat, mapping="products-v2")
    src_docs = {d[F.ID]: d for d in eng.iter_documents(plan.source)}
    out = start_job(eng, store, plan, progress=False)
    assert (out.status, out.copied, out.reencoded, out.failed, out.batches) == ("done", N, 0, 0, 4)
    assert eng.get_alias(ALIAS) == [plan.target] and out.previous == [plan.source]
    assert eng.index_exists(plan.source)  # the old generation is kept
    assert eng.get_mapping(plan.target)["mappings"]["properties"][F.TEXT_VEC]["method"]["parameters"]["m"] == 32
    got = eng.get(plan.target, list(src_docs))
    for pid, d in src_docs.items():
        assert np.allclose(got[pid][F.TEXT_VEC], d[F.TEXT_VEC]) and got[pid][F.CONTENT_HASH] == d[F.CONTENT_HASH]
    st = status(eng, store, ALIAS)
    assert [g["count"] for g in st["generations"]] == [N, N] and st["current"] == [plan.target]
    assert st["job"]["status"] == "done" and st["job"]["batches_done"] == 4


def test_the_photo_colour_descriptor_is_left_out_of_an_older_mapping_and_recomputed_for_products_v3(env, tmp_path):
    s, eng, store, cat = env
    src = {d[F.ID]: d for d in eng.iter_documents(ALIAS)}
    photos = [i for i, d in src.items() if d.get(F.IMAGE_VEC) is not None]
    assert photos and all(src[i].get(F.IMAGE_COLOUR) is not None for i in photos)  # indexed with the default mapping (v3)
    down = start_job(eng, store, _plan(eng, s, cat, mapping="products-v1"), progress=False)
    assert (down.status, down.copied, down.failed) == ("done", N, 0)  # v1 is strict: the field must not be sent
    v1 = {d[F.ID]: d for d in eng.iter_documents(ALIAS)}
    assert all(F.IMAGE_COLOUR not in d for d in v1.values())
    up = start_job(eng, store, _plan(eng, s, cat, mapping="products-v3"), progress=False)
    assert (up.status, up.copied, up.reencoded, up.failed) == ("done", N, 0, 0)  # vectors copied; only the photos re-read
    v3 = {d[F.ID]: d for d in eng.iter_documents(ALIAS)}
    for i in photos:
        np.testing.assert_allclose(v3[i][F.IMAGE_COLOUR], src[i][F.IMAGE_COLOUR], atol=1e-6)
        np.testing.assert_allclose(v3[i][F.IMAGE_VEC], src[i][F.IMAGE_VEC], atol=1e-6)
    # a photo that is gone keeps its copied vector and goes without a descriptor, recorded against the product
    moved = tmp_path / "moved"
    shutil.copytree(cat.parent, moved)
    gone = src[photos[0]][F.IMAGE]
    (moved / gone).unlink()
    start_job(eng, store, _plan(eng, s, cat, mapping="products-v1"), progress=False)
    again = start_job(eng, store, _plan(eng, s, cat, mapping="products-v3", images_root=str(moved)), progress=False)
    assert (again.status, again.copied, again.failed) == ("done", N, 0)
    assert [e[0] for e in again.errors] == [photos[0]] and again.errors[0][1].startswith("image colour skipped: ")
    assert "not found" in again.errors[0][1]
    d = eng.get(ALIAS, [photos[0]])[photos[0]]
    assert d.get(F.IMAGE_COLOUR) is None and d[F.IMAGE_VEC] is not None


@pytest.mark.slow
def test_changed_text_model_reencodes_text_and_keeps_image_vectors(env):
    s, eng, store, cat = env
    plan = _plan(eng, s, cat, text_backend="onnx-int8")
    src = {d[F.ID]: d for d in eng.iter_documents(plan.source)}
    out = start_job(eng, store, plan, progress=False)
    assert (out.status, out.reencoded, out.copied) == ("done", N, 0)
    new = eng.get(plan.target, list(src))
    for pid, d in src.items():
        assert new[pid][F.TEXT_MODEL_ID] != d[F.TEXT_MODEL_ID]
        # int8 ONNX copy of the same model: close to the torch vector, not equal to it
        cos = float(np.dot(new[pid][F.TEXT_VEC], d[F.TEXT_VEC]))
        assert 0.9 < cos < 0.99999
        if d.get(F.IMAGE_VEC) is not None:
            assert np.allclose(new[pid][F.IMAGE_VEC], d[F.IMAGE_VEC])


@pytest.mark.parametrize("step", ["fill:1", "filled", "verify:count", "verify:sample", "swap"])
def test_a_job_killed_at_any_step_leaves_a_complete_alias_and_resumes(env, step):
    s, eng, store, cat = env
    plan = _plan(eng, s, cat)

    def fault(at: str) -> None:
        _assert_alias_complete(eng)  # at every step readers see a complete generation
        if at == step:
            raise Boom(at)

    with pytest.raises(Boom):
        start_job(eng, store, plan, checkpoint=fault, progress=False)
    assert eng.get_alias(ALIAS) == [plan.source]
    _assert_alias_complete(eng)
    job = store.get(plan.job_id)
    assert job.status == "failed" and "Boom" in job.error
    done_before = job.finished_batches
    assert done_before == (2 if step == "fill:1" else 4)
    with pytest.raises(ReindexError, match="unfinished"):
        start_job(eng, store, _plan(eng, s, cat), progress=False)

    out = resume_job(eng, store, ALIAS, checkpoint=lambda at: _assert_alias_complete(eng), progress=False)
    assert out.status == "done" and eng.get_alias(ALIAS) == [plan.target]
    assert out.batches_this_run == 4 - done_before  # finished batches were not redone
    assert out.copied == N
    _assert_alias_complete(eng)


def test_a_job_dying_after_the_swap_is_finished_by_resume_without_a_second_swap(env):
    s, eng, store, cat = env
    plan = _plan(eng, s, cat)
    with pytest.raises(Boom):
        start_job(eng, store, plan, checkpoint=lambda at: (_ for _ in ()).throw(Boom()) if at == "swapped" else None, progress=False)
    assert eng.get_alias(ALIAS) == [plan.target]
    out = resume_job(eng, store, ALIAS, progress=False)
    assert out.status == "done" and eng.get_alias(ALIAS) == [plan.target]


_KILLER = r"""
import os, signal, sys
from indexing.engines import create_engine
from workers.reindex_jobs import ReindexJobStore, make_plan, start_job
from workers.settings import load_settings
s = load_settings()
eng = create_engine("local", path=s.data_dir / "engine")
store = ReindexJobStore(s.effective_sql_url)
plan = make_plan(eng, alias="products", mapping="products-v1", text_model="minilm", text_backend="torch",
                 image_model="efficientnet_lite0", images_root=None, device="cpu", batch_size=8)
def cp(step):
    if step == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
start_job(eng, store, plan, checkpoint=cp, progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("step", ["fill:2", "swap"])
def test_sigkilled_job_is_resumed_from_its_record(env, step):
    s, eng, store, cat = env
    proc = subprocess.run([sys.executable, "-c", _KILLER, step], env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    job = store.unfinished(ALIAS)
    assert job is not None and job.status == "running"  # no chance to record the failure
    assert job.finished_batches == (3 if step == "fill:2" else 4)
    _assert_alias_complete(eng)
    assert eng.get_alias(ALIAS) == [job.source]
    out = resume_job(eng, store, ALIAS, progress=False)
    assert out.status == "done" and out.batches_this_run == 4 - job.finished_batches
    assert eng.get_alias(ALIAS) == [job.target]
    _assert_alias_complete(eng)


def test_searches_during_a_reindex_never_fail_nor_see_a_partial_index(env, tmp_path):
    from workers.bench.reindex import Searcher

    s, eng, store, cat = env
    reader = create_engine("local", path=tmp_path / "data" / "engine")  # its own instance, as another process
    docs = list(eng.iter_documents(ALIAS))
    searcher = Searcher(reader, ALIAS, [d[F.TITLE] for d in docs[:10]], [d[F.TEXT_VEC] for d in docs[:10]], N)
    searcher.start()
    try:
        for mapping in ("products-v2", "products-v1"):
            start_job(eng, store, _plan(eng, s, cat, mapping=mapping), progress=False)
    finally:
        log = searcher.stop()
        reader.close()
    assert len(log.rows) > 100
    assert [r for r in log.rows if not r[3]] == []
    assert log.counts == {N}


def test_rollback_goes_back_along_the_swaps_and_cleanup_keeps_the_current(env):
    s, eng, store, cat = env
    first = eng.get_alias(ALIAS)[0]
    a = start_job(eng, store, _plan(eng, s, cat), progress=False)
    b = start_job(eng, store, _plan(eng, s, cat, mapping="products-v2"), progress=False)
    assert eng.get_alias(ALIAS) == [b.target]
    assert rollback_alias(eng, store, ALIAS)["to"] == a.target
    assert rollback_alias(eng, store, ALIAS)["to"] == first
    with pytest.raises(ReindexError, match="no recorded previous generation"):
        rollback_alias(eng, store, ALIAS)
    _assert_alias_complete(eng)
    # the alias points at the oldest generation: keep 1 keeps the newest and the current
    assert cleanup_generations(eng, store, ALIAS, keep=1) == [a.target]
    assert eng.list_indices(f"{ALIAS}-") == sorted([first, b.target])
    assert eng.get_alias(ALIAS) == [first]


def test_cleanup_spares_an_unfinished_jobs_target_and_abandon_drops_it(env):
    s, eng, store, cat = env
    plan = _plan(eng, s, cat)
    with pytest.raises(Boom):
        start_job(eng, store, plan, checkpoint=lambda at: (_ for _ in ()).throw(Boom()) if at == "filled" else None, progress=False)
    assert cleanup_generations(eng, store, ALIAS, keep=1) == []
    assert eng.index_exists(plan.target)
    abandon_job(eng, store, ALIAS)
    assert not eng.index_exists(plan.target) and store.unfinished(ALIAS) is None
    _assert_alias_complete(eng)


def test_cli_start_status_rollback(env):
    from typer.testing import CliRunner

    from workers.cli import app

    s, eng, store, cat = env
    r = CliRunner().invoke(app, ["reindex", "start", "--mapping", "products-v2", "--batch-size", "16", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["status"] == "done" and out["copied"] == N
    r = CliRunner().invoke(app, ["reindex", "status", "--json"])
    st = json.loads(r.output)
    assert st["current"] == [out["target"]] and len(st["generations"]) == 2 and st["job"]["batches_done"] == 2
    r = CliRunner().invoke(app, ["reindex", "rollback"])
    assert r.exit_code == 0 and f"-> {out['source']}" in r.output
    eng.refresh(ALIAS)
    assert eng.get_alias(ALIAS) == [out["source"]]
    r = CliRunner().invoke(app, ["reindex", "cleanup", "--keep", "1", "--json"])
    assert json.loads(r.output) == {"deleted": []}  # the newest is kept, the current too


def test_admin_task_start_is_idempotent_by_job_id(env):
    from workers import reindex_tasks

    reindex_tasks._settings.cache_clear()
    import workers.tasks as tasks

    tasks._engine.cache_clear()
    try:
        args = ("job-1", ALIAS, "products-v1", "minilm", "torch", "efficientnet_lite0", None, 16)
        first = reindex_tasks.reindex_start_task.apply(args=args).get()
        again = reindex_tasks.reindex_start_task.apply(args=args).get()  # a redelivered start
        assert first["status"] == again["status"] == "done" and again["target"] == first["target"]
        st = reindex_tasks.reindex_status_task.apply(args=(ALIAS,)).get()
        assert len(st["generations"]) == 2
        back = reindex_tasks.reindex_rollback_task.apply(args=(ALIAS,)).get()
        assert back["to"] == first["source"]
    finally:
        reindex_tasks._settings.cache_clear()
        tasks._engine.cache_clear()

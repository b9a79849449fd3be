"""Reindex resume on a real OpenSearch node (tests marked ``opensearch``; the node of ``tests/conftest.py`` or
``OPENSEARCH_URL``), and the id-ordered reading it rests on, on both engines.

What the node shows: the scroll order (``_doc``) of an index changes when its segments merge, with no document
written (OpenSearch merges in the background; on a cluster a fresh scroll may also read another shard copy). A
resume that skips batch *numbers* of a fresh scroll then skips documents that moved into a finished batch's
positions and reads others twice. The fill therefore reads the source in product id order and a job's record
keeps the id ranges its finished batches covered; a resume reads strictly after them. The fault tests kill a job
at each step, merge the source's segments, resume, and check the target holds exactly the source's documents,
each written once.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import pytest
from opensearchpy import helpers

from indexing import fields as F
from indexing.engines.base import BulkAction, SearchEngine
from indexing.errors import EngineError
from indexing.lifecycle import generation_name
from indexing.pipeline import Encoders
from indexing.reindex import FillCoverage, fill_batch, iter_source_batches
from mappings import load_mapping
from rerank.history.store import upgrade
from workers.reindex_jobs import ReindexJobStore, make_plan, resume_job, start_job

N = 30
BATCH = 8  # 4 batches: 8, 8, 8, 6
SEGMENTS = 4


class Boom(RuntimeError):
    pass


def _ids(n: int, seed: int = 0) -> list[str]:
    """Product ids in a shuffled order: the order documents are written in is not their id order."""
    return [f"sku-{x:05d}" for x in np.random.default_rng(seed).permutation(np.arange(100, 100 + 7 * n, 7))[:n]]


def _docs(enc: Encoders, ids: list[str]) -> list[dict[str, Any]]:
    t, i = enc.text_info, enc.image_info  # dims and model ids; no model is loaded (same models: vectors are copied)
    rng = np.random.default_rng(1)
    out = []
    for k, pid in enumerate(ids):
        d = {F.ID: pid, F.TITLE: f"blue denim jacket {pid}", F.HAS_IMAGE: k % 3 != 0, F.TEXT_VEC: rng.standard_normal(t.dim).astype(np.float32),
             F.TEXT_MODEL_ID: t.model_id, F.CONTENT_HASH: f"h-{pid}", F.INDEXED_AT: 1_700_000_000}
        if k % 3 != 0:
            d.update({F.IMAGE: f"images/{pid}.jpg", F.IMAGE_VEC: rng.standard_normal(i.dim).astype(np.float32), F.IMAGE_MODEL_ID: i.model_id})
        out.append(d)
    return out


def _write_in_segments(eng: SearchEngine, index: str, docs: list[dict[str, Any]], segments: int = SEGMENTS) -> None:
    """One bulk + refresh per part: the index starts with ``segments`` segments (on OpenSearch)."""
    for part in np.array_split(np.arange(len(docs)), segments):
        eng.bulk(index, [BulkAction.index(docs[j][F.ID], docs[j]) for j in part], refresh=True)


def _scroll_ids(eng, index: str) -> list[str]:
    """The ids in scroll order (``_doc``, what ``helpers.scan`` sorts on; the order the fill used to batch by)."""
    return [h["_id"] for h in helpers.scan(eng.client, index=index, size=BATCH, _source=False)]


def _merge(eng, index: str) -> None:
    eng.client.indices.forcemerge(index=index, max_num_segments=1)
    eng.refresh(index)


@pytest.fixture(params=["local", pytest.param("opensearch", marks=pytest.mark.opensearch)])
def any_engine(request, tmp_path) -> Iterator[tuple[SearchEngine, str, str | None]]:
    """(engine, index name prefix, HNSW engine for its indices): a LocalEngine, or the session's node."""
    if request.param == "local":
        from indexing.engines.local import LocalEngine

        eng: SearchEngine = LocalEngine(tmp_path / "engine")
        yield eng, "rxids", None
        eng.close()
        return
    node = request.getfixturevalue("opensearch_node")
    eng = node.engine()
    prefix = f"rxids-{uuid.uuid4().hex[:8]}"
    yield eng, prefix, node.hnsw_engine
    for name in eng.list_indices(prefix):
        eng.delete_index(name)
    eng.close()


# --------------------------------------------------------------------------- what the node does to scroll order
@pytest.mark.opensearch
def test_batch_numbers_of_a_fresh_scroll_are_no_resume_key_after_a_segment_merge(live, opensearch_node):
    """The finding, on the node: number batches over a scroll, finish two, let the segments merge (no document
    changes), number a fresh scroll and skip the finished numbers: documents are skipped and others read twice.
    Resuming after the last finished product id instead reads exactly the rest."""
    eng, prefix = live
    name = f"{prefix}-src"
    eng.create_index(name, load_mapping("products-v1", text_dim=4, image_dim=4, hnsw_engine=opensearch_node.hnsw_engine))
    ids = _ids(40)
    _write_in_segments(eng, name, [{F.ID: i, F.TITLE: f"shirt {i}", F.CONTENT_HASH: f"h-{i}"} for i in ids])
    assert int(eng.client.indices.stats(index=name, metric="segments")["_all"]["primaries"]["segments"]["count"]) == SEGMENTS

    before = _scroll_ids(eng, name)
    assert sorted(before) == sorted(ids)
    finished = 2
    done_by_number = set(before[: finished * BATCH])
    by_id = [d[F.ID] for d in eng.iter_documents_by_id(name, batch_size=BATCH)]
    assert by_id == sorted(ids)
    cursor = by_id[finished * BATCH - 1]
    done_by_id = set(by_id[: finished * BATCH])

    _merge(eng, name)  # what OpenSearch does in the background; no document is written
    after = _scroll_ids(eng, name)
    assert sorted(after) == sorted(before) and eng.count(name) == len(ids)
    assert after != before  # the merge reordered the scroll

    resumed = after[finished * BATCH :]  # "skip batches 0 and 1" over the fresh scroll
    skipped = set(ids) - done_by_number - set(resumed)
    twice = done_by_number & set(resumed)
    assert skipped and len(skipped) == len(twice)  # the old resume loses documents and repeats as many others

    rest = [d[F.ID] for d in eng.iter_documents_by_id(name, after=cursor, batch_size=BATCH)]
    assert set(rest) | done_by_id == set(ids) and not set(rest) & done_by_id and len(rest) == len(set(rest))


# --------------------------------------------------------------------------- reading in product id order, both engines
def test_iter_documents_by_id_pages_in_id_order_from_a_cursor(any_engine):
    eng, prefix, hnsw = any_engine
    name = f"{prefix}-order"
    eng.create_index(name, load_mapping("products-v1", text_dim=4, image_dim=4, hnsw_engine=hnsw))
    ids = _ids(23, seed=3)
    _write_in_segments(eng, name, [{F.ID: i, F.TITLE: f"shirt {i}"} for i in ids], segments=3)
    want = sorted(ids)
    for size in (1, 7, 23, 100):
        assert [d[F.ID] for d in eng.iter_documents_by_id(name, batch_size=size)] == want
    assert [d[F.ID] for d in eng.iter_documents_by_id(name, after=want[6], batch_size=5)] == want[7:]
    assert [d[F.ID] for d in eng.iter_documents_by_id(name, after="sku-00150", batch_size=5)] == [i for i in want if i > "sku-00150"]
    assert list(eng.iter_documents_by_id(name, after=want[-1])) == []
    got = next(eng.iter_documents_by_id(name, after=want[0]))
    assert got == {F.ID: want[1], F.TITLE: f"shirt {want[1]}"}  # the whole source
    # a product id that is not the document's id cannot be a cursor
    eng.bulk(name, [BulkAction.index("zz-odd", {F.ID: "sku-00001", F.TITLE: "odd"})], refresh=True)
    with pytest.raises(EngineError, match="zz-odd"):
        list(eng.iter_documents_by_id(name))


def test_source_batches_skip_covered_ranges_and_never_span_one(any_engine):
    """Batches finished out of order (Celery workers) leave gaps: only the gaps' documents are batched again,
    numbered after the finished ones, each batch one id range."""
    eng, prefix, hnsw = any_engine
    name = f"{prefix}-cov"
    eng.create_index(name, load_mapping("products-v1", text_dim=4, image_dim=4, hnsw_engine=hnsw))
    ids = _ids(N, seed=5)
    _write_in_segments(eng, name, [{F.ID: i, F.TITLE: f"shirt {i}"} for i in ids])
    first = list(iter_source_batches(eng, name, BATCH))
    assert [len(b.docs) for b in first] == [8, 8, 8, 6] and [b.docs[0][F.ID] for b in first] == sorted(ids)[::8]
    assert [b.after for b in first] == [None] + [b.last for b in first[:-1]] and [b.start for b in first] == [0, 8, 16, 24]

    cov = FillCoverage()
    for b in (first[0], first[2]):  # batches 0 and 2 finished, 1 and 3 not
        cov.add(b.after, b.last, len(b.docs))
    again = list(iter_source_batches(eng, name, 5, coverage=cov, first_batch=4))
    assert [b.batch for b in again] == [4, 5, 6, 7] and [len(b.docs) for b in again] == [5, 3, 5, 1]
    assert [d[F.ID] for b in again for d in b.docs] == [d[F.ID] for b in (first[1], first[3]) for d in b.docs]
    assert [b.after for b in again] == [first[0].last, again[0].last, first[2].last, again[2].last]
    for b in again:
        cov.add(b.after, b.last, len(b.docs))
    assert cov.ranges == [(None, sorted(ids)[-1], N)] and list(iter_source_batches(eng, name, 5, coverage=cov)) == []


# --------------------------------------------------------------------------- kill, merge, resume: on the node
@pytest.fixture
def job_env(live, opensearch_node, tmp_path):
    """A source generation of N documents (written in 4 segments, shuffled ids) behind an alias on the node, and
    a job store on SQLite."""
    eng, prefix = live
    enc = Encoders("minilm", "torch", "efficientnet_lite0", "cpu")
    alias = prefix
    src = generation_name(alias, now=1_700_000_000)
    eng.create_index(src, load_mapping("products-v1", text_dim=enc.text_info.dim, image_dim=enc.image_info.dim, hnsw_engine=opensearch_node.hnsw_engine))
    docs = _docs(enc, _ids(N, seed=7))
    _write_in_segments(eng, src, docs)
    eng.swap_alias(alias, src)
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    store = ReindexJobStore(url)
    yield eng, store, alias, src, {d[F.ID]: d for d in docs}, opensearch_node.hnsw_engine, url
    store.close()


def _plan(eng, alias: str, hnsw: str):
    return make_plan(eng, alias=alias, mapping="products-v1", text_model="minilm", text_backend="torch", image_model="efficientnet_lite0",
                     images_root=None, device="cpu", batch_size=BATCH, hnsw_engine=hnsw)


def _merge_reorders(eng, index: str) -> None:
    before = _scroll_ids(eng, index)
    _merge(eng, index)
    after = _scroll_ids(eng, index)
    assert sorted(after) == sorted(before) and after != before, "the merge did not reorder the scroll; the test shows nothing"


def _assert_exact_copy(eng, store: ReindexJobStore, job_id: str, target: str, src: dict[str, dict[str, Any]]) -> None:
    """The target holds exactly the source's documents and the job's batches wrote each once."""
    eng.refresh(target)
    got = {d[F.ID]: d for d in eng.iter_documents_by_id(target)}
    assert sorted(got) == sorted(src)
    assert all(got[i][F.CONTENT_HASH] == d[F.CONTENT_HASH] and np.allclose(got[i][F.TEXT_VEC], d[F.TEXT_VEC]) for i, d in src.items())
    batches = store.batches(job_id)
    assert sum(b.stop - b.start for b in batches) == len(src)  # every document in exactly one batch: none skipped, none twice
    assert sum(b.copied for b in batches) == len(src) and sum(b.unchanged for b in batches) == 0


@pytest.mark.opensearch
@pytest.mark.parametrize("step", ["fill:0", "fill:1", "fill:2", "filled", "verify:count", "swap"])
def test_a_job_killed_at_any_step_resumes_after_a_segment_merge_with_exactly_the_sources_documents(job_env, step):
    eng, store, alias, src, docs, hnsw, _ = job_env
    plan = _plan(eng, alias, hnsw)

    def fault(at: str) -> None:
        if at == step:
            raise Boom(at)

    with pytest.raises(Boom):
        start_job(eng, store, plan, checkpoint=fault, progress=False)
    job = store.get(plan.job_id)
    done_before = job.finished_batches
    assert job.status == "failed" and done_before == (int(step[5:]) + 1 if step.startswith("fill:") else 4)
    assert eng.get_alias(alias) == [src]
    _merge_reorders(eng, src)

    out = resume_job(eng, store, alias, progress=False)
    assert out.status == "done" and eng.get_alias(alias) == [plan.target]
    assert out.batches_this_run == 4 - done_before and out.batches == 4 and out.failed == 0
    _assert_exact_copy(eng, store, plan.job_id, plan.target, docs)


_KILLER = r"""
import os, signal, sys
from indexing.engines.opensearch import OpenSearchEngine
from workers.reindex_jobs import ReindexJobStore, make_plan, start_job
url, sql, alias, hnsw, step = sys.argv[1:]
eng = OpenSearchEngine(url, timeout_s=60.0)
store = ReindexJobStore(sql)
plan = make_plan(eng, alias=alias, mapping="products-v1", text_model="minilm", text_backend="torch",
                 image_model="efficientnet_lite0", images_root=None, device="cpu", batch_size=8, hnsw_engine=hnsw)
def cp(at):
    if at == step:
        os.kill(os.getpid(), signal.SIGKILL)
start_job(eng, store, plan, checkpoint=cp, progress=False)
"""


@pytest.mark.opensearch
def test_a_sigkilled_job_resumes_after_a_segment_merge_with_exactly_the_sources_documents(job_env, opensearch_node):
    eng, store, alias, src, docs, hnsw, sql = job_env
    proc = subprocess.run([sys.executable, "-c", _KILLER, opensearch_node.url, sql, alias, hnsw, "fill:1"],
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    job = store.unfinished(alias)
    assert job is not None and job.status == "running" and job.finished_batches == 2  # no chance to record the failure
    _merge_reorders(eng, src)
    out = resume_job(eng, store, alias, progress=False)
    assert out.status == "done" and out.batches_this_run == 2 and eng.get_alias(alias) == [job.target]
    _assert_exact_copy(eng, store, job.job_id, job.target, docs)


@pytest.mark.opensearch
def test_a_job_recorded_by_scroll_position_is_resumed_by_reading_the_whole_source_again(job_env, caplog):
    """A record from before id ranges (batches numbered by scroll position, no ``fill_coverage``) says nothing
    about which documents its batches held: the resume reads every document again, copies what is missing and
    skips, without re-encoding, what the old batches wrote."""
    eng, store, alias, src, docs, hnsw, _ = job_env
    plan = _plan(eng, alias, hnsw)
    with pytest.raises(Boom):
        start_job(eng, store, plan, checkpoint=lambda at: (_ for _ in ()).throw(Boom()) if at == "created" else None, progress=False)
    enc = Encoders("minilm", "torch", "efficientnet_lite0", "cpu")
    scroll = list(eng.iter_documents(src, batch_size=BATCH))
    for n in range(2):  # what the old fill recorded: two batches of scroll positions, without id ranges
        part = scroll[n * BATCH : (n + 1) * BATCH]
        r = fill_batch(eng, plan, n, n * BATCH, part, encoders=enc)
        store.add_batch(plan.job_id, replace(r, after=None, last=None))
    assert store.coverage(plan.job_id).ranges == [] and store.get(plan.job_id).finished_batches == 2
    _merge_reorders(eng, src)

    with caplog.at_level(logging.WARNING, logger="indexing.reindex"):
        out = resume_job(eng, store, alias, progress=False)
    assert "2 finished fill batches were recorded without id ranges" in caplog.text
    assert out.status == "done" and out.batches_this_run == 4 and eng.get_alias(alias) == [plan.target]
    new = [b for b in store.batches(plan.job_id) if b.batch >= 2]
    assert [b.batch for b in new] == [2, 3, 4, 5] and sum(b.stop - b.start for b in new) == N
    assert sum(b.unchanged for b in new) == 2 * BATCH and sum(b.copied for b in new) == N - 2 * BATCH
    eng.refresh(plan.target)
    assert sorted(d[F.ID] for d in eng.iter_documents_by_id(plan.target)) == sorted(docs)

"""The fusion ranker on CUDA: the same scores as on the CPU, one request or a padded batch, direct or micro-batched.

Marked ``gpu`` and skipped where torch sees no CUDA device (CI has none); run on a lent GPU machine with
``python -m pytest -m gpu tests/rerank/test_gpu.py``. Needs only numpy and torch (no index, store or encoder).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

TOL = dict(atol=2e-4, rtol=2e-4)


def _requests(cfg, sizes, seed=0):
    """Random model inputs of the given candidate counts; every other request has a history, some photos are missing."""
    from rerank.model.inputs import RequestFeatures

    rng = np.random.default_rng(seed)
    dt, k = cfg.text_dim, cfg.history_k
    out = []
    for j, n in enumerate(sizes):
        hist = np.zeros(k, dtype=bool)
        if j % 2 == 0:
            hist[: max(1, k // 2)] = True
        img = rng.random(n) > 0.2
        out.append(RequestFeatures(
            ids=tuple(f"r{j}p{i}" for i in range(n)), query=rng.normal(size=dt).astype(np.float32),
            cand_text=rng.normal(size=(n, dt)).astype(np.float32), cand_text_mask=np.ones(n, dtype=bool),
            cand_image=np.where(img[:, None], rng.normal(size=(n, dt)), 0).astype(np.float32), cand_image_mask=img,
            first_stage=rng.random((n, cfg.first_stage_dim)).astype(np.float32),
            cats=rng.integers(0, cfg.hash_buckets, size=(n, cfg.n_cat_fields)).astype(np.int64),
            hist_text=rng.normal(size=(k, dt)).astype(np.float32), hist_text_mask=hist.copy(),
            hist_image=rng.normal(size=(k, dt)).astype(np.float32), hist_image_mask=hist.copy(),
            hist_event=np.where(hist, rng.integers(1, 5, size=k), 0).astype(np.int64), hist_age=rng.random(k).astype(np.float32),
            hist_mask=hist, hist_ids=tuple(f"h{i}" for i in range(int(hist.sum()))),
        ))
    return out


def _same(a, b):
    assert a.ids == b.ids and a.hist_ids == b.hist_ids
    np.testing.assert_allclose(a.scores, b.scores, **TOL)
    np.testing.assert_allclose(a.gates, b.gates, **TOL)
    np.testing.assert_allclose(a.history_weights, b.history_weights, **TOL)


@pytest.fixture(scope="module")
def rankers():
    from rerank.model.ranker import RankerConfig, build_ranker

    cfg = RankerConfig()
    cpu = build_ranker(cfg, device="cpu", seed=0).eval()
    gpu = build_ranker(cfg, device="cuda", seed=0).eval()
    assert gpu.device.type == "cuda"
    for (name, p), q in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        assert torch.equal(p, q.cpu()), name  # the same seed, the same weights
    return cfg, cpu, gpu


def test_cuda_scores_match_the_cpu_one_request_and_a_padded_batch(rankers):
    cfg, cpu, gpu = rankers
    reqs = _requests(cfg, (100, 37, 100, 5, 64))
    direct = [gpu.score(r) for r in reqs]
    for r, d in zip(reqs, direct):
        _same(d, cpu.score(r))
    for d, b in zip(direct, gpu.score_requests(reqs)):  # padded to 100 candidates, masked
        _same(d, b)


def test_micro_batched_cuda_calls_share_passes_and_match_direct(rankers):
    from rerank.model.batching import MicroBatcher

    cfg, _, gpu = rankers
    reqs = _requests(cfg, [100] * 24 + [50] * 8, seed=1)
    direct = [gpu.score(r) for r in reqs]
    got: list = [None] * len(reqs)
    batcher = MicroBatcher(gpu, max_batch=8, max_wait_ms=20.0)
    try:
        def worker(k):
            for i in range(k, len(reqs), 8):
                got[i] = batcher.score(reqs[i], timeout_s=30)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = batcher.stats
    finally:
        batcher.close()
    for d, g in zip(direct, got):
        _same(d, g)
    assert stats["requests"] == len(reqs) and stats["largest_batch"] > 1 and stats["batches"] < len(reqs)


"""The safe choice (rerank.safe): first-stage signals from a request's features, the training verdict, and an artifact
that learned nothing serving the best signal's order through the rerank call."""

from __future__ import annotations

import json
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from indexing.errors import ConfigError
from rerank.retrieval.signals import PER_LIST
from rerank.retrieval.retriever import LISTS
from rerank.safe import SAFE_CHOICE, decide_serving, order, response_block, serving_of, signal_scores


def _features(n: int, rng: np.random.Generator, *, bm25_missing: tuple[int, ...] = (), photos: bool = True):
    ids = tuple(f"d{i:02d}" for i in range(n))
    q = rng.normal(size=8)
    text = rng.normal(size=(n, 8))
    fs = np.zeros((n, len(LISTS) * len(PER_LIST) + 1), dtype=np.float32)
    fs[:, 0] = rng.uniform(1, 5, n)  # bm25 score (log1p)
    for i in bm25_missing:
        fs[i, 0], fs[i, 3] = 0.0, 1.0
    img_mask = np.ones(n, bool) if photos else np.zeros(n, bool)
    return SimpleNamespace(ids=ids, query=q, cand_text=text, cand_text_mask=np.ones(n, bool), cand_image=rng.normal(size=(n, 8)),
                           cand_image_mask=img_mask, first_stage=fs)


def test_signals_read_from_the_request_features():
    rng = np.random.default_rng(0)
    f = _features(6, rng, bm25_missing=(1, 4))
    assert order(f.ids, signal_scores("first_stage", f, LISTS)) == list(f.ids)  # the order the call received
    bm = signal_scores("bm25", f, LISTS)
    present = [i for i in range(6) if i not in (1, 4)]
    want = sorted(present, key=lambda i: -f.first_stage[i, 0]) + [1, 4]  # missing last, by id
    assert order(f.ids, bm) == [f.ids[i] for i in want]
    cos = (f.cand_text @ f.query) / (np.linalg.norm(f.cand_text, axis=1) * np.linalg.norm(f.query))
    assert np.allclose(signal_scores("knn_text", f, LISTS), cos)
    f.cand_image_mask[2] = False  # no photo: below every product with one
    im = signal_scores("knn_image", f, LISTS)
    assert order(f.ids, im)[-1] == "d02" and im[2] < np.delete(im, 2).min()
    with pytest.raises(ConfigError, match="valid: first_stage, bm25, knn_text, knn_image"):
        signal_scores("colour", f, LISTS)
    with pytest.raises(ConfigError, match="bm25 list"):
        signal_scores("bm25", f, ("knn_text",))


def test_verdict_serves_the_model_only_when_it_beats_the_best_signal_significantly():
    rng = np.random.default_rng(1)
    rows_good, rows_null = [], []
    for q in range(60):
        f = _features(10, rng)
        gains = {d: float(rng.integers(0, 3)) for d in f.ids}
        g = np.array([gains[d] for d in f.ids])
        rows_good.append((f.ids, g + rng.normal(0, 0.1, 10), gains, f))  # a model that knows the labels
        rows_null.append((f.ids, rng.normal(size=10), gains, f))  # a model that learned nothing
    good = decide_serving(rows_good, LISTS, seed=13)
    assert good["policy"] == "model" and good["signal"] is None and good["verdict"]["model_beats_best"]
    v = good["verdict"]
    assert set(v["baselines"]) == {"first_stage", "bm25", "knn_text", "knn_image"} and v["validation_queries"] == 60
    best = max(v["baselines"], key=lambda s: v["baselines"][s]["ndcg@10"])
    assert v["best_signal"] == best and v["baselines"][best]["model_vs"]["p"] < 0.05 and "serving the model" in v["summary"]
    assert v["baselines"]["first_stage"]["system"] == "hybrid_rrf"
    null = decide_serving(rows_null, LISTS, seed=13)
    assert null["policy"] == SAFE_CHOICE and null["signal"] == null["verdict"]["best_signal"]
    assert not null["verdict"]["model_beats_best"] and "serving the safe choice" in null["verdict"]["summary"]
    assert decide_serving(rows_null, LISTS, seed=13) == null  # seeded
    assert good["verdict"]["model_worse_mrr_than"] == [] and 0.0 < good["verdict"]["model_mrr@10"] <= 1.0
    # better NDCG@10 but a non-relevant product first where the first stage put a relevant one: not served
    rows_mrr = []
    for q in range(40):
        f = _features(20, rng)
        grades = [1] + [0] * 14 + [1, 1, 2, 2, 2]  # the first stage (row order) has a relevant product first, the best ones last
        gains = {d: float(g) for d, g in zip(f.ids, grades)}
        model = np.array([4.0] + [0.0] * 14 + [5, 5, 8, 8, 8])
        model[1] = 11.0  # a non-relevant product first, then the grade-2 ones, then the grade-1 ones
        rows_mrr.append((f.ids, model, gains, f))
    mr = decide_serving(rows_mrr, LISTS, seed=13)
    fs = mr["verdict"]["baselines"]["first_stage"]
    assert fs["mrr@10"] == 1.0 and mr["verdict"]["model_mrr@10"] == 0.5 and fs["model_worse_mrr"]
    assert mr["verdict"]["model_beats_best"] and "first_stage" in mr["verdict"]["model_worse_mrr_than"]
    assert mr["policy"] == SAFE_CHOICE and "MRR@10 is significantly below" in mr["verdict"]["summary"]
    empty = decide_serving([], LISTS, seed=13)
    assert empty["policy"] == SAFE_CHOICE and empty["signal"] == "first_stage"
    # no photo anywhere: knn_image is not a candidate
    nophoto = [(ids, s, g, _features(10, rng, photos=False)) for ids, s, g, _ in rows_null[:5]]
    assert "knn_image" not in decide_serving(nophoto, LISTS, seed=1)["verdict"]["baselines"]


def test_artifact_serving_block_is_checked():
    assert serving_of({})["policy"] == "model" and "not tested" in serving_of({})["reason"]
    assert serving_of({"serving": {"policy": "safe_choice", "signal": "knn_text"}})["signal"] == "knn_text"
    with pytest.raises(ConfigError, match="policy"):
        serving_of({"serving": {"policy": "maybe"}})
    with pytest.raises(ConfigError, match="signal"):
        serving_of({"serving": {"policy": "safe_choice", "signal": "price"}})
    assert response_block({"policy": "safe_choice", "signal": "bm25", "verdict": {"summary": "why"}}) == \
        {"policy": "safe_choice", "signal": "bm25", "reason": "why"}


def _noise_dataset(shared_data, out):
    """Fashion dev queries whose judged products get grades drawn at random: labels independent of every input."""
    from tests.rerank.evaldata import build_fashion_slice

    sl = build_fashion_slice(shared_data, out, n_queries=150, judged_per_query=10, others=10, seed=3)
    rng = random.Random(7)
    lines = []
    for line in sl.qrels.read_text().splitlines():
        q, z, d, _g = line.split()
        lines.append(f"{q} {z} {d} {rng.choice([0, 0, 1, 2])}")
    sl.qrels.write_text("\n".join(lines) + "\n")
    return sl


@pytest.mark.slow
def test_train_on_labels_independent_of_every_input_serves_the_best_signal(shared_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from indexing import fields as F
    from indexing.encoders import get_text_encoder
    from indexing.engines import create_engine
    from rerank.model.artifact import load_artifact
    from rerank.reranker import Reranker
    from workers.cli import app

    sl = _noise_dataset(shared_data, tmp_path / "noise")
    data = tmp_path / "data"
    monkeypatch.setenv("FUSIONRANK_DATA_DIR", str(data))
    out = tmp_path / "model"
    res = CliRunner().invoke(app, ["train", "--catalog", str(sl.catalog), "--queries", str(sl.queries), "--qrels", str(sl.qrels),
                                   "--images-root", str(sl.images_root), "--out", str(out), "--epochs", "3", "--min-epochs", "0",
                                   "--max-minutes", "0.5", "--threads", "1", "--no-progress", "--no-colour"])
    assert res.exit_code == 0, res.output
    assert "verdict: the model does not beat the best first-stage signal" in res.output
    assert "serving: the safe choice" in res.output and "<- best signal" in res.output
    config = json.loads((out / "config.json").read_text())
    sv = config["serving"]
    v = sv["verdict"]
    assert sv["policy"] == "safe_choice" and sv["signal"] == v["best_signal"] and not v["model_beats_best"]
    assert v["validation_queries"] >= 10 and set(v["baselines"]) >= {"first_stage", "bm25", "knn_text"}
    best = max(v["baselines"].values(), key=lambda b: b["ndcg@10"])["ndcg@10"]
    assert v["baselines"][v["best_signal"]]["ndcg@10"] == best
    assert json.loads((out / "training_report.json").read_text())["serving"] == sv

    # the artifact serves the signal's order through the rerank call (the cached index the training built)
    engine_dir = next((data / "eval-cache").glob("*/engine"))
    engine = create_engine("local", path=engine_dir)
    text = get_text_encoder("minilm")
    art = load_artifact(out, mapping=engine.get_mapping("eval"), device="cpu")
    assert art.serves_safe_choice and art.serving["signal"] == sv["signal"]
    query = "black shoes for men"
    hits = engine.bm25_search("eval", query, size=12, source=[F.ID, F.TITLE])
    assert len(hits) >= 5
    shuffled = list(hits)
    random.Random(1).shuffle(shuffled)  # given out of BM25 order: first_stage keeps it, bm25 restores BM25's order
    resp = {"hits": {"hits": [{"_id": h.id, "_score": h.score, "_source": dict(h.source or {})} for h in shuffled]}}
    vecs = engine.get("eval", [h.id for h in hits], fields=[F.TEXT_VEC])
    qv = np.asarray(text.encode([query]))[0]
    cos = {h.id: float(np.dot(vecs[h.id][F.TEXT_VEC], qv) / (np.linalg.norm(vecs[h.id][F.TEXT_VEC]) * np.linalg.norm(qv))) for h in hits}
    # the expected orders, computed here from each signal's definition
    expected = {"first_stage": [h.id for h in shuffled], "bm25": [d for _, d in sorted((-h.score, h.id) for h in hits)],
                "knn_text": sorted(cos, key=lambda d: (-cos[d], d))}
    assert sv["signal"] in expected  # no photos in this slice: knn_image cannot win
    assert len({tuple(v) for v in expected.values()}) == 3  # the three orders differ, so the checks below tell them apart

    def served(art):
        got = Reranker(engine, "eval", art, text_encoder=text, budget_ms=60_000).rerank(query, resp)
        assert got["fusionrank"]["degraded"] is None
        return got

    got = served(art)
    assert got["fusionrank"]["serving"]["policy"] == "safe_choice" and got["fusionrank"]["serving"]["signal"] == sv["signal"]
    assert "does not beat" in got["fusionrank"]["serving"]["reason"]
    assert [h["_id"] for h in got["hits"]["hits"]] == expected[sv["signal"]]
    for h in got["hits"]["hits"]:
        assert h["_explanation"]["safe_choice"]["signal"] == sv["signal"] and h["_explanation"]["gates"] == {}
    # the same artifact told to serve each other signal serves that signal's order
    for signal in expected:
        d = tmp_path / f"model-{signal}"
        shutil.copytree(out, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["serving"] = {**cfg["serving"], "signal": signal}
        (d / "config.json").write_text(json.dumps(cfg))
        other = served(load_artifact(d, mapping=engine.get_mapping("eval"), device="cpu"))
        assert [h["_id"] for h in other["hits"]["hits"]] == expected[signal], signal
        assert other["fusionrank"]["serving"]["signal"] == signal
    rr = Reranker(engine, "eval", art, text_encoder=text, budget_ms=60_000)
    # search (the hybrid retrieval) says the same
    s = rr.search(query, size=5)
    assert s.serving["policy"] == "safe_choice" and len(s.hits) == 5

"""The fusion systems of the evaluation harness, and the trained-model cache key (knn_image alignment)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from indexing.errors import ConfigError
from rerank.evaluation.harness import EvalRequest, evaluate, transform_id
from rerank.evaluation.systems import FUSION_SYSTEMS, SYSTEMS
from tests.rerank.evaldata import build_fashion_slice

FAST = {"epochs": 6, "patience": 6, "max_minutes": 1.0, "d_model": 32, "hidden": 64}


def _indexer(data_dir: Path):
    from workers.jobs import run_index_job
    from workers.settings import load_settings

    settings = load_settings(data_dir=data_dir)
    return lambda engine, job: run_index_job(engine, settings, job, progress=False)


def _req(sl, **kw) -> EvalRequest:
    return EvalRequest(catalog=sl.catalog, queries=sl.queries, qrels=sl.qrels, gain="identity", images_root=sl.images_root, **kw)


@pytest.fixture(scope="module")
def small_slice(shared_data, tmp_path_factory):
    return build_fashion_slice(shared_data, tmp_path_factory.mktemp("fusion-small"))


@pytest.fixture(scope="module")
def train_slice(shared_data, tmp_path_factory):
    """80 dev queries, 10 judged products each: enough training queries for the model to learn."""
    return build_fashion_slice(shared_data, tmp_path_factory.mktemp("fusion-slice"), n_queries=80, judged_per_query=10, others=20)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fusion-eval-data")


# ------------------------------------------------------------------ the cache key's alignment identifier (pure)
def test_transform_id_tells_query_maps_apart():
    from rerank.model.alignment import Alignment, AlignmentConfig, build_head

    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    f1 = lambda q: w1 @ q  # noqa: E731
    f1_again = lambda q: (w1 @ q).copy()  # noqa: E731  (another object, the same map)
    f2 = lambda q: w2 @ q  # noqa: E731
    assert transform_id(None, 4) is None
    assert transform_id(f1, 4) == transform_id(f1_again, 4) != transform_id(f2, 4)
    import torch

    torch.manual_seed(0)
    a = Alignment(build_head(6, 4), image_dim=6, text_dim=4, config=AlignmentConfig())
    torch.manual_seed(1)
    b = Alignment(build_head(6, 4), image_dim=6, text_dim=4, config=AlignmentConfig())
    ia, ib = transform_id(a.query_to_image_space, 4), transform_id(b.query_to_image_space, 4)
    assert ia.startswith("alignment:") and ia != ib and ia == transform_id(a.query_to_image_space, 4)


def test_a_training_query_set_is_split_without_a_test_share_and_its_model_cached_apart(tmp_path):
    """--train-queries / --train-ubi: the fusion systems train on the harness's own train/validation split of those
    queries (none held out unused), and such a model never answers for one trained on the 70/10/20 split."""
    import dataclasses
    from types import SimpleNamespace

    from rerank.datasets.data import Query
    from rerank.datasets.splits import assign, load_or_create_splits
    from rerank.evaluation.harness import TRAIN_ONLY_SPLIT
    from rerank.evaluation.systems import EvalContext, fusion_cache_dir
    from rerank.training.ranker import DatasetSpec, TrainConfig

    queries = [Query(f"q{i}", f"query {i}") for i in range(200)]
    splits = load_or_create_splits(queries, tmp_path, name="ubi", seed=13, fractions=TRAIN_ONLY_SPLIT)
    assert not splits.test and len(splits.train) + len(splits.validation) == 200 and len(splits.validation) >= 10
    inner = assign(queries, seed=13, fractions=TRAIN_ONLY_SPLIT)  # what the harness's lambdamart trains on
    assert {q for q, s in inner.items() if s == "train"} == set(splits.train)
    base = DatasetSpec(Path("c.csv"), Path("q.tsv"), Path("r.tsv"))
    ctx = EvalContext(mode="retrieve", items=[], cache_dir=tmp_path)
    ctx.train_key = "k"
    keys = []
    for spec in (base, dataclasses.replace(base, split=TRAIN_ONLY_SPLIT)):
        ctx.fusion = SimpleNamespace(dataset=spec, also=())
        keys.append(fusion_cache_dir(ctx, TrainConfig()))
    assert keys[0] != keys[1]
    # labels from a log: validated on its own judgments, so a model judged on other ones (or before them) never answers
    v1, v2 = tmp_path / "v1.tsv", tmp_path / "v2.tsv"
    v1.write_text("ubi-a 0 p1 1.2\n")
    v2.write_text("ubi-a 0 p1 0.9\n")
    logged = dataclasses.replace(base, split=TRAIN_ONLY_SPLIT, labels_from_log=True)
    for spec in (logged, dataclasses.replace(logged, validation_qrels=v1), dataclasses.replace(logged, validation_qrels=v2)):
        ctx.fusion = SimpleNamespace(dataset=spec, also=())
        keys.append(fusion_cache_dir(ctx, TrainConfig()))
    assert len(set(keys)) == 5
    # --ubi-validation-share: the 90/10 split is the share 0.1 (models cached under it still match); another share is another key
    from rerank.evaluation.harness import ubi_split

    assert ubi_split(0.1) == TRAIN_ONLY_SPLIT and ubi_split(0.3) == (0.7, 0.3, 0.0)
    ctx.fusion = SimpleNamespace(dataset=dataclasses.replace(logged, split=ubi_split(0.3)), also=())
    assert fusion_cache_dir(ctx, TrainConfig()) not in keys


def test_fusion_systems_are_registered_and_trainable():
    for name in FUSION_SYSTEMS:
        assert SYSTEMS.get(name).trainable, name
    assert SYSTEMS.get("fusion_no_image").use_image is False and SYSTEMS.get("fusion_text_only").use_history is False
    assert SYSTEMS.get("fusion_concat").strategy == "concat" and SYSTEMS.get("fusion").strategy == "attention"


# ------------------------------------------------------------------ regression: the knn_image list keys trained models
@pytest.mark.slow
def test_lambdamart_trained_without_the_image_list_is_not_reused_with_it(small_slice, data_dir):
    from indexing.encoders import image_encoder_info, text_encoder_info

    dt, di = text_encoder_info("minilm").dim, image_encoder_info("efficientnet_lite0").dim
    w = np.random.default_rng(7).standard_normal((di, dt)).astype(np.float32)

    def q2i(q):
        v = w @ np.asarray(q, dtype=np.float32)
        return v / np.linalg.norm(v)

    idx = _indexer(data_dir)
    plain = evaluate(_req(small_slice, systems=("lambdamart",)), data_dir=data_dir, indexer=idx)
    models = lambda: sorted(p.parent.name for p in (data_dir / "eval-models").glob("lambdamart-*/model.txt"))  # noqa: E731
    assert len(models()) == 1
    with_list = evaluate(_req(small_slice, systems=("lambdamart",)), data_dir=data_dir, indexer=idx, query_to_image_space=q2i)
    assert with_list.info["training"]["query_to_image_space"] != plain.info["training"]["query_to_image_space"] is None
    assert len(models()) == 2  # trained again, not the model fitted without that list's features
    # the same map again reuses the second model
    evaluate(_req(small_slice, systems=("lambdamart",)), data_dir=data_dir, indexer=idx, query_to_image_space=q2i)
    assert len(models()) == 2


# ------------------------------------------------------------------ the fusion systems in the harness
@pytest.mark.slow
def test_fusion_systems_train_once_each_and_beat_random(train_slice, data_dir):
    systems = ("random", "fusion", "fusion_no_image", "fusion_no_history", "fusion_text_only")
    idx = _indexer(data_dir)
    rep = evaluate(_req(train_slice, mode="rerank", systems=systems, options={"fusion_options": FAST}), data_dir=data_dir, indexer=idx)
    out = rep.to_json()
    assert out["queries"] >= 8 and out["training"]["queries"] >= 40
    for name in systems:
        for k in ("ndcg@10", "mrr@10", "recall@100"):
            assert 0.0 <= out["systems"][name][k] <= 1.0, (name, k)
    assert out["systems"]["fusion"]["ndcg@10"] > out["systems"]["random"]["ndcg@10"] + 0.02
    assert "fusion ranker (attention, full)" in out["systems"]["fusion"]["note"]
    # four distinct trainings (one cache directory each), with the ablation flags they were asked for
    dirs = sorted((data_dir / "eval-models").glob("fusion-*/config.json"))
    assert len(dirs) == 4
    flags = sorted((c["ranker"]["use_image"], c["ranker"]["use_history"], c["ablation"]) for c in (json.loads(p.read_text()) for p in dirs))
    # no photos in this slice: the full model has no alignment, so use_image is False in every ranker config
    assert sorted(f[2] for f in flags) == ["full", "no_history", "no_image", "text_only"]
    assert sorted(f[1] for f in flags) == [False, False, True, True]
    # fusion_attention is the same training as fusion: reused from the cache, same metrics
    rep2 = evaluate(_req(train_slice, mode="rerank", systems=("fusion_attention",), options={"fusion_options": FAST}), data_dir=data_dir, indexer=idx)
    assert rep2.systems["fusion_attention"].metrics == rep.systems["fusion"].metrics
    assert len(list((data_dir / "eval-models").glob("fusion-*/config.json"))) == 4
    # --model fusion=DIR scores with the given artifact
    full = next(p.parent for p in dirs if json.loads(p.read_text())["ablation"] == "full")
    rep3 = evaluate(_req(train_slice, mode="rerank", systems=("fusion",), model_dirs={"fusion": full}), data_dir=data_dir, indexer=idx)
    assert rep3.systems["fusion"].metrics == rep.systems["fusion"].metrics


@pytest.mark.slow
def test_fusion_strategy_system_in_retrieve_mode(train_slice, data_dir):
    rep = evaluate(_req(train_slice, mode="retrieve", systems=("random", "fusion_concat"), top_n=50, limit_queries=8,
                        options={"fusion_options": FAST}), data_dir=data_dir, indexer=_indexer(data_dir))
    r = rep.systems["fusion_concat"]
    assert 0.0 <= r.metrics["ndcg@10"] <= 1.0 and r.metrics["ndcg@10"] >= rep.systems["random"].metrics["ndcg@10"]
    assert "fusion ranker (concat, full)" in r.note
    # a cached model that this code cannot load (another feature layout) is trained again, not a crash
    cached = Path(rep.info["artifacts"]["fusion_concat"])
    cfg = json.loads((cached / "config.json").read_text())
    cfg["ranker"]["first_stage_dim"] += 1
    (cached / "config.json").write_text(json.dumps(cfg))
    again = evaluate(_req(train_slice, mode="retrieve", systems=("fusion_concat",), top_n=50, limit_queries=8, options={"fusion_options": FAST}),
                     data_dir=data_dir, indexer=_indexer(data_dir))
    fresh = json.loads((cached / "config.json").read_text())
    assert again.info["artifacts"]["fusion_concat"] == str(cached) and fresh["artifact_version"] != cfg["artifact_version"]
    assert fresh["ranker"]["first_stage_dim"] == cfg["ranker"]["first_stage_dim"] - 1


@pytest.mark.slow
def test_a_seed_option_trains_again_on_the_same_evaluation_split(train_slice, tmp_path):
    """``seed=N`` is another training (its own cache entry and trainer seed), scored on the very queries of the default."""
    idx = _indexer(tmp_path)
    runs = {}
    for seed in (None, 14):
        opts = dict(FAST, **({"seed": seed} if seed is not None else {}))
        rep = evaluate(_req(train_slice, mode="rerank", systems=("fusion",), limit_queries=8, options={"fusion_options": opts}),
                       data_dir=tmp_path, indexer=idx)
        art = Path(rep.info["artifacts"]["fusion"])
        runs[seed] = (art, json.loads((art / "training_report.json").read_text())["train_config"]["seed"], rep)
    (a0, s0, r0), (a1, s1, r1) = runs[None], runs[14]
    assert (s0, s1) == (13, 14) and a0 != a1
    assert r0.queries == r1.queries == 8 and r0.info["split_sizes"] == r1.info["split_sizes"]


def test_unknown_fusion_option_is_refused(small_slice, data_dir):
    with pytest.raises(ConfigError, match="fusion_options"):
        evaluate(_req(small_slice, systems=("fusion",), options={"fusion_options": {"epoch": 3}}), data_dir=data_dir, indexer=_indexer(data_dir))


@pytest.mark.slow
def test_fusion_with_photos_uses_its_alignment_for_the_image_list(shared_data, tmp_path):
    """Photos in the slice: the full model trains an alignment, and the harness re-runs knn_image with it."""
    sl = build_fashion_slice(shared_data, tmp_path / "photos", n_queries=16, judged_per_query=8, others=60, with_images=True)
    rep = evaluate(_req(sl, mode="rerank", systems=("random", "fusion", "fusion_no_image"), options={"fusion_options": FAST}),
                   data_dir=tmp_path / "data", indexer=_indexer(tmp_path / "data"))
    for name in ("fusion", "fusion_no_image"):
        assert 0.0 <= rep.systems[name].metrics["ndcg@10"] <= 1.0
    cfgs = {c["ablation"]: c for c in (json.loads(p.read_text()) for p in (tmp_path / "data" / "eval-models").glob("fusion-*/config.json"))}
    assert cfgs["full"]["ranker"]["use_image"] is True and cfgs["full"]["alignment"] is not None
    assert "knn_image" in cfgs["full"]["features"]["lists"] and "knn_image" not in cfgs["no_image"]["features"]["lists"]
    assert cfgs["no_image"]["alignment"] is None
    # the colour head reads the photos' colours (trained on the slice's products whose colour field is filled); the
    # no-image ablation keeps its text inputs (query colours, the colour field) and never reads a photo
    for ablation in ("full", "no_image"):
        assert cfgs[ablation]["features"]["colour"] is True and len(cfgs[ablation]["colour"]["names"]) >= 2, ablation
    assert cfgs["full"]["colour"]["report"]["train_products"] > 0
    # the slice was indexed with the default mapping (products-v3): the head reads the pixel colour descriptor too
    assert [f for f, _ in cfgs["full"]["colour"]["inputs"]] == ["image_colour", "image_vec"]
    assert "knn_image re-run with the model's alignment" in rep.systems["fusion"].note
    assert "no knn_image features" in rep.systems["fusion_no_image"].note


def _personal_slice(shared: Path, out: Path, n_queries: int = 40, judged: int = 10):
    """The first simulated shoppers' queries, their judged products, their events and those products."""
    import csv
    import random

    dev = shared / "fashion" / "bench" / "dev"
    rows = [line.rstrip("\n").split("\t") for line in open(dev / "personal_queries.tsv", encoding="utf-8")][1 : n_queries + 1]
    qids, users = {r[0] for r in rows}, {r[2] for r in rows}
    grades: dict[str, dict[str, str]] = {}
    for line in open(dev / "personal_qrels.tsv", encoding="utf-8"):
        q, _, d, g = line.split()
        if q in qids:
            grades.setdefault(q, {})[d] = g
    rng = random.Random(0)
    keep = {q: dict(rng.sample(sorted(by.items()), min(judged, len(by)))) for q, by in grades.items()}
    with open(dev / "events.csv", encoding="utf-8") as f:
        ev_lines = [f.readline()] + [line for line in f if line.split(",", 1)[0] in users]
    wanted = {d for v in keep.values() for d in v} | {line.split(",")[1] for line in ev_lines[1:]}
    with open(shared / "fashion" / "bench" / "catalog.csv", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fieldnames, chosen = reader.fieldnames, [{**r, "image": ""} for r in reader if r["product_id"] in wanted]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "catalog.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(chosen)
    (out / "queries.tsv").write_text("query_id\tquery\tuser_id\n" + "".join("\t".join(r) + "\n" for r in rows))
    (out / "qrels.tsv").write_text("".join(f"{q} 0 {d} {g}\n" for q in sorted(keep) for d, g in sorted(keep[q].items())))
    (out / "events.csv").write_text("".join(ev_lines))
    return out


@pytest.mark.slow
def test_fusion_reads_shopper_histories_from_the_events_file(shared_data, tmp_path):
    d = _personal_slice(shared_data, tmp_path / "personal")
    data = tmp_path / "data"
    req = EvalRequest(catalog=d / "catalog.csv", queries=d / "queries.tsv", qrels=d / "qrels.tsv", gain="identity", events=d / "events.csv",
                      images_root=shared_data / "fashion", systems=("random", "hybrid_rrf", "fusion", "fusion_no_history"), options={"fusion_options": FAST})
    rep = evaluate(req, data_dir=data, indexer=_indexer(data))
    for name in ("random", "fusion", "fusion_no_history"):
        assert 0.0 <= rep.systems[name].metrics["ndcg@10"] <= 1.0
    # the shoppers' queries name a product type: the intent bound keeps the history from putting another type first,
    # so the briefly trained model's MRR@10 (a product of the asked type first) stays near the first stage's
    for name in ("fusion", "fusion_no_history"):
        if rep.systems[name].serving["policy"] == "model":
            assert "bounded by the query's intent (article_type)" in rep.systems[name].note
        assert rep.systems[name].metrics["mrr@10"] >= rep.systems["hybrid_rrf"].metrics["mrr@10"] - 0.05
    reports = {json.loads((p.parent / "config.json").read_text())["ablation"]: json.loads(p.read_text())
               for p in (data / "eval-models").glob("fusion-*/training_report.json")}
    assert set(reports) == {"full", "no_history"}
    info = next(iter(reports["full"]["datasets"].values()))
    assert info["requests_with_history"] > 0 and info["events"] == str(d / "events.csv")
    n = rep.queries
    assert f" 0 of {n} queries with a user history" not in rep.systems["fusion"].note
    assert f"of {n} queries with a user history" in rep.systems["fusion"].note
    assert f"0 of {n} queries with a user history" in rep.systems["fusion_no_history"].note  # the ablation reads none
    # the full model compares the history products' attributes with the candidates': the harness hands them over
    m = re.search(r"history attribute agreement: (\d+) of (\d+) history products with attributes", rep.systems["fusion"].note)
    assert m and int(m.group(1)) > 0 and int(m.group(1)) == int(m.group(2)), rep.systems["fusion"].note
    assert "history attribute agreement" not in rep.systems["fusion_no_history"].note

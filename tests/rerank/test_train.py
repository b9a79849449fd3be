"""Training: listwise losses, events -> histories, and a real (small) training run with its artifact."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from indexing import fields as F
from indexing.errors import CatalogError, ConfigError
from rerank.datasets.metrics import ndcg_at_k
from rerank.training.ranker import DatasetSpec, TrainConfig, histories, lambda_loss, listwise_softmax_loss, read_events, train_ranker


def test_listwise_losses_prefer_the_graded_order():
    gains = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    good = torch.tensor([[3.0, 2.0, 0.0, 9.0], [0.0, 1.0, 0.0, 0.0]])  # the padded 9.0 must not count
    bad = torch.tensor([[0.0, 2.0, 3.0, -9.0], [0.0, 1.0, 0.0, 0.0]])
    for fn in (listwise_softmax_loss, lambda_loss):
        lg, lb = float(fn(good, gains, mask)), float(fn(bad, gains, mask))
        assert np.isfinite(lg) and lg < lb, fn.__name__
    # a batch with no positive gain gives a zero loss, not NaN
    z = listwise_softmax_loss(good, torch.zeros_like(gains), mask)
    assert float(z) == 0.0


def test_events_file_to_histories(tmp_path):
    p = tmp_path / "events.csv"
    p.write_text("user_id,product_id,event,timestamp\n"
                 "u1,a,view,1000\nu1,b,purchase,2000\nu1,a,click,3000\nu2,c,view,2023-01-01T00:00:00Z\n"
                 "u3,d,teleport,1\nu3,e,view,yesterday\n")
    ev, bad = read_events(p)
    assert [b[0] for b in bad] == [6, 7]
    h = histories(ev, k=5, now=4000.0)
    ids, types, ages = h["u1"]
    assert ids == ("a", "b")  # newest interaction first
    assert types == ("click", "purchase") and ages == (1000.0, 2000.0)
    with pytest.raises(CatalogError):
        read_events(tmp_path / "missing.csv")


def test_bad_training_requests_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="loss"):
        TrainConfig(loss="pairwise")
    with pytest.raises(ConfigError):
        DatasetSpec(tmp_path / "c.csv", tmp_path / "q.tsv", tmp_path / "r.tsv").check()
    with pytest.raises(ConfigError):
        train_ranker([], out=tmp_path / "m", data_dir=tmp_path, indexer=lambda e, j: None)


@pytest.mark.slow
def test_training_on_a_real_slice_learns_and_writes_an_artifact(shared_data, tmp_path):
    """80 fashion dev queries, 10 judged products each (text only: no photos in the slice)."""
    from rerank.model.artifact import load_artifact
    from rerank.training.ranker import fit  # noqa: F401  (the loop under test, run by train_ranker)
    from tests.rerank.evaldata import build_fashion_slice
    from workers.jobs import run_index_job
    from workers.settings import load_settings

    sl = build_fashion_slice(shared_data, tmp_path / "slice", n_queries=80, judged_per_query=10, others=20)
    data = tmp_path / "data"
    settings = load_settings(data_dir=data)
    ds = DatasetSpec(sl.catalog, sl.queries, sl.qrels, gain="identity", images_root=sl.images_root)
    cfg = TrainConfig(epochs=12, patience=12, max_minutes=2.0, device="cpu", d_model=32, hidden=64, batch_size=8)
    res = train_ranker([ds], out=tmp_path / "model", data_dir=data, config=cfg,
                       indexer=lambda engine, job: run_index_job(engine, settings, job, progress=False))
    rep = res.report
    hist = rep["history"]
    assert hist[-1]["train_loss"] < hist[1]["train_loss"]  # the loss goes down
    info = rep["datasets"]["slice"]
    assert info["train_queries"] > 40 and info["validation_queries"] >= 4
    assert rep["alignment"] is None and info["knn_image_list"] == "skipped"  # no photos in this slice
    # the best validation NDCG@10 beats a random order of the same pools (mean of 20 shuffles)
    art = load_artifact(res.artifact, device="cpu")
    assert art.ranker.config.use_image is False
    # the intent bound's vocabularies are the slice catalog's own values, and the verdict judged the bounded scores
    import csv

    types = {r["article_type"] for r in csv.DictReader(open(sl.catalog)) if r["article_type"]}
    assert art.intent is not None and set(art.intent.names[F.ARTICLE_TYPE]) == types
    assert rep["intent"]["values"][F.ARTICLE_TYPE] == len(types) and rep["intent"]["bound"] == [F.ARTICLE_TYPE]
    # the query-to-attribute agreement inputs ride along (read with the intent block; rerank.model.attribute_match)
    assert art.feature_spec.attributes == ("catalog", "photo") and info["attribute_inputs"] == ["catalog", "photo"]
    assert art.ranker.config.first_stage_dim == art.feature_spec.first_stage_dim
    from rerank.datasets.data import read_qrels
    from rerank.datasets.metrics import map_gains

    qrels = read_qrels(sl.qrels)
    splits_file = info["splits_file"]
    import json

    valid = json.loads(open(splits_file).read())["splits"]["validation"]
    rnd = []
    for qid in valid:
        gains = map_gains(qrels.for_query(qid), "identity")
        if not any(gains.values()):
            continue
        for s in range(20):
            ids = sorted(gains)
            random.Random(s).shuffle(ids)
            rnd.append(ndcg_at_k(ids, gains, 10))
    assert rep["best_validation_ndcg@10"] > float(np.mean(rnd)) + 0.02


def test_cli_train_command_is_registered_and_refuses_a_missing_file(tmp_path):
    from typer.testing import CliRunner

    from workers.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0
    for opt in ("--catalog", "--queries", "--qrels", "--events", "--images-root", "--out", "--strategy", "--epochs", "--seed",
                "--max-minutes", "--no-image", "--no-history", "--text-only"):
        assert opt in res.output
    res = runner.invoke(app, ["train", "--catalog", str(tmp_path / "c.csv"), "--queries", str(tmp_path / "q.tsv"),
                              "--qrels", str(tmp_path / "r.tsv"), "--out", str(tmp_path / "m")])
    assert res.exit_code != 0


def test_dataset_spec_parse_reads_the_cli_form_and_names_what_is_wrong(tmp_path):
    d = DatasetSpec.parse(f"catalog={tmp_path}/c.csv,queries={tmp_path}/q.tsv,qrels={tmp_path}/r.tsv,gain=minus1,name=hd,events={tmp_path}/e.csv")
    assert d.catalog == tmp_path / "c.csv" and d.images_root == tmp_path and d.gain == "minus1" and d.name == "hd"
    assert d.events == tmp_path / "e.csv" and d.mode == "rerank"
    with pytest.raises(ConfigError, match="missing qrels"):
        DatasetSpec.parse("catalog=c.csv,queries=q.tsv")
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        DatasetSpec.parse("catalog=c.csv,queries=q.tsv,qrels=r.tsv,colour=red")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        DatasetSpec.parse("catalog=c.csv,queries.tsv")


@pytest.mark.slow
def test_cli_trains_one_model_on_several_datasets(shared_data, tmp_path):
    import json

    from typer.testing import CliRunner

    from tests.rerank.evaldata import build_fashion_slice
    from workers.cli import app

    a = build_fashion_slice(shared_data, tmp_path / "a", n_queries=30, judged_per_query=6, others=10, seed=0)
    b = build_fashion_slice(shared_data, tmp_path / "b", n_queries=30, judged_per_query=6, others=10, seed=1)
    args = ["train", "--out", str(tmp_path / "model"), "--max-minutes", "0.2", "--epochs", "2", "--threads", "1", "--no-progress", "--json"]
    for name, sl in (("first", a), ("second", b)):
        args += ["--dataset", f"catalog={sl.catalog},queries={sl.queries},qrels={sl.qrels},images_root={sl.images_root},name={name}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output.strip().splitlines()[-1])
    assert set(rep["datasets"]) == {"first", "second"}
    assert all(v["train_queries"] > 10 for v in rep["datasets"].values())
    assert (tmp_path / "model" / "config.json").is_file()


@pytest.mark.slow
def test_labels_from_a_log_validate_on_their_own_gains_and_never_read_the_validation_queries_clicks(shared_data, tmp_path):
    """A dataset whose labels come from a log: its validation queries take their gains from ``validation_qrels`` (the
    log's harder-shrunk judgments) and read the behaviour columns of a query the log never saw (their own clicks are
    their labels); its training queries are unchanged."""
    import dataclasses

    from indexing.encoders import get_text_encoder
    from rerank.datasets.clicks import Session
    from rerank.datasets.data import read_qrels, read_queries
    from rerank.model.behaviour import BEHAVIOUR_FEATURES, BehaviourStats
    from rerank.model.inputs import FeatureSpec
    from rerank.retrieval.signals import PER_LIST
    from rerank.training.ranker import prepare_dataset
    from tests.rerank.evaldata import build_fashion_slice
    from workers.jobs import run_index_job
    from workers.settings import load_settings

    sl = build_fashion_slice(shared_data, tmp_path / "slice", n_queries=20, judged_per_query=6, others=10)
    data = tmp_path / "data"
    settings = load_settings(data_dir=data)
    qs, qrels = read_queries(sl.queries).queries, read_qrels(sl.qrels)
    sessions = [Session(q.text.lower(), tuple(sorted(qrels.for_query(q.id))), frozenset({0}), client=f"c{k}") for q in qs for k in range(5)]
    beh = BehaviourStats.from_sessions(sessions, [1.0, 0.5, 0.25, 0.1])
    vq = tmp_path / "validation-qrels.tsv"  # other gains than the training qrels: 2 <-> 1
    vq.write_text("".join(f"{q.id} 0 {d} {3 - int(g) if g > 0 else 0}\n" for q in qs for d, g in sorted(qrels.for_query(q.id).items())))
    spec = FeatureSpec(lists=("bm25", "knn_text"), behaviour=True)
    cfg = TrainConfig(device="cpu", behaviour_query_dropout=0.0)  # every training query shows its own behaviour
    te = get_text_encoder(cfg.text_model, backend=cfg.text_backend, device="cpu")

    def prep(**kw):
        ds = DatasetSpec(sl.catalog, sl.queries, sl.qrels, gain="identity", images_root=sl.images_root, mode="retrieve", split=(0.5, 0.5, 0.0), **kw)
        return prepare_dataset(ds, data_dir=data, indexer=lambda engine, job: run_index_job(engine, settings, job, progress=False), text_encoder=te,
                               alignment=None, feature_spec=spec, config=cfg, behaviour=beh)

    start = len(spec.lists) * len(PER_LIST) + 1
    q_col = start + BEHAVIOUR_FEATURES.index("q_log_searches")
    plain, logged = prep(), prep(labels_from_log=True, validation_qrels=vq)
    assert len(logged.validation) >= 5 and len(logged.train) >= 5 and logged.info["labels_from_log"]
    assert "log_coverage" not in plain.info
    vgains = read_qrels(vq)
    # log_coverage: the share of each part's first stage the log judged; the validation lists keep every candidate in
    # first-stage order, so it is theirs
    top = [d in e.all_gains for e in logged.validation for d in e.features.ids[:10]]
    every = [d in e.all_gains for e in logged.validation for d in e.features.ids]
    assert logged.info["log_coverage"]["validation"] == {"top10": round(sum(top) / len(top), 4), "all": round(sum(every) / len(every), 4),
                                                         "queries": len(logged.validation)}
    assert 0.0 < logged.info["log_coverage"]["validation"]["all"] < 1.0 and logged.info["log_coverage"]["train"]["queries"] == len(logged.train)
    for e in logged.validation:
        assert dict(e.all_gains) == {d: float(g) for d, g in vgains.for_query(e.query_id).items()}
        assert np.all(e.features.first_stage[:, q_col] == 0)  # shown as a query the log never saw
    for e in plain.validation:  # qrels labels: the validation queries read their own behaviour, as before
        assert dict(e.all_gains) == {d: float(g) for d, g in qrels.for_query(e.query_id).items()}
        assert np.all(e.features.first_stage[:, q_col] > 0)
    for e in logged.train:  # the training queries are what they were
        assert dict(e.all_gains) == {d: float(g) for d, g in qrels.for_query(e.query_id).items()}
        assert np.all(e.features.first_stage[:, q_col] > 0)
    with pytest.raises(ConfigError, match="validation qrels file not found"):
        prep(labels_from_log=True, validation_qrels=tmp_path / "missing.tsv")
    # behaviour_product_scope "other_queries": a training query that reads its own behaviour finds it in the query columns
    # only; its product columns are those of a query the log never saw (the product under the other queries)
    spec = dataclasses.replace(spec, behaviour_product_scope="other_queries")
    scoped = prep(labels_from_log=True, validation_qrels=vq)
    p_cols = slice(start + BEHAVIOUR_FEATURES.index("p_ctr"), start + BEHAVIOUR_FEATURES.index("p_conv") + 1)
    text = {q.id: q.text for q in qs}
    for e, o in zip(scoped.train, logged.train):
        assert np.all(e.features.first_stage[:, q_col] > 0)
        hidden = beh.features(text[e.query_id], list(e.features.ids), query_level=False)
        assert np.allclose(e.features.first_stage[:, p_cols], hidden[:, 3:6])
        assert not np.allclose(e.features.first_stage[:, p_cols], o.features.first_stage[:, p_cols])
    # behaviour_label_part: a training query that reads its own behaviour is labelled by the log's label part (here: its
    # first two searches, with other gains) and reads its columns from its other three searches; the rest is unchanged
    spec = dataclasses.replace(spec, behaviour_product_scope="all")
    part = BehaviourStats.from_sessions([s for i, s in enumerate(sessions) if i % 5 < 2], [1.0, 0.5, 0.25, 0.1])
    pb, pq = tmp_path / "label-part-behaviour.json.gz", tmp_path / "label-part-qrels.tsv"
    part.save(pb)
    pq.write_text("".join(f"{q.id} 0 {d} 1.5\n" for q in qs for d in sorted(qrels.for_query(q.id))))
    cfg = dataclasses.replace(cfg, behaviour_label_part=True)
    split = prep(labels_from_log=True, validation_qrels=vq, label_part_qrels=pq, label_part_behaviour=pb)
    assert split.info["label_part"]["train_queries_labelled_by_it"] == len(split.train)  # dropout 0: every training query
    for e, o in zip(split.train, logged.train):
        assert set(e.all_gains.values()) == {1.5} and set(e.all_gains) == set(o.all_gains)
        assert np.allclose(e.features.first_stage[:, q_col], np.log1p(3)) and np.allclose(o.features.first_stage[:, q_col], np.log1p(5))
    for e, o in zip(split.validation, logged.validation):  # the validation queries are what they were
        assert dict(e.all_gains) == dict(o.all_gains) and np.array_equal(e.features.first_stage, o.features.first_stage)


def test_keep_epoch_last_and_average_run_every_epoch_and_keep_what_they_say():
    """``keep_epoch``: ``last`` keeps the weights after the last epoch (no early stopping), ``average`` the mean of the
    weights after epochs 2..N, i.e. the mean of the ``last`` models of 2, 3, ... N epochs of the same seeded training."""
    from rerank.model.ranker import RankerConfig
    from rerank.training.ranker import fit, validation_ndcg
    from tests.rerank import test_history_agreement as HA

    random.seed(0)
    train, valid = HA._shoppers(40, 0), HA._shoppers(12, 1)
    rcfg = RankerConfig(text_dim=HA.TD, first_stage_dim=HA.SPEC.first_stage_dim, n_cat_fields=HA.C, hash_buckets=HA.SPEC.hash_buckets,
                        history_k=HA.SPEC.history_k, d_model=16, hidden=32, heads=2)
    base = TrainConfig(batch_size=8, lr=5e-3, seed=3, threads=1, max_minutes=5, patience=1, min_epochs=0)
    lasts = {}
    for n in (2, 3, 4):
        model, rep = fit(train, {"v": valid}, rcfg, dataclasses.replace(base, epochs=n, keep_epoch="last"))
        assert rep["epochs_run"] == rep["best_epoch"] == n  # patience 1 stops nothing
        assert rep["best_validation_ndcg@10"] == pytest.approx(validation_ndcg(model, valid), abs=1e-6)
        lasts[n] = {k: v.clone() for k, v in model.state_dict().items()}
    avg, rep = fit(train, {"v": valid}, rcfg, dataclasses.replace(base, epochs=4, keep_epoch="average"))
    assert rep["epochs_run"] == 4
    for k, v in avg.state_dict().items():
        want = torch.stack([lasts[n][k].float() for n in (2, 3, 4)]).mean(0)
        assert torch.allclose(v.float(), want, atol=1e-5), k
    assert not torch.allclose(avg.state_dict()["head.0.weight"], lasts[4]["head.0.weight"])
    with pytest.raises(ConfigError, match="keep_epoch must be one of best, last, average"):
        TrainConfig(keep_epoch="median")

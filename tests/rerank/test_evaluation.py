"""Evaluation: readers, splits, and (further down) the harness on a small slice of real data."""

from __future__ import annotations

import dataclasses
import json

import pytest

from indexing.errors import CatalogError, ConfigError
from rerank.datasets.data import Query, read_event_users, read_qrels, read_queries
from rerank.datasets.splits import assign, group_of, load_or_create_splits


# ------------------------------------------------------------------ readers
def test_read_queries_records_bad_lines(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text("query_id\tquery\tuser_id\nq1\tred shoes\t\nq2\tbag\tu7\nq1\tdup\t\n\tno id\t\nq3\t\t\n")
    qs = read_queries(p)
    assert [(q.id, q.text, q.user_id) for q in qs.queries] == [("q1", "red shoes", None), ("q2", "bag", "u7")]
    reasons = [(e.line, e.reason) for e in qs.errors]
    assert reasons == [(4, "duplicate query_id 'q1'"), (5, "empty query_id"), (6, "query 'q3' has an empty text")]


def test_read_queries_bad_files(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        read_queries(tmp_path / "nope.tsv")
    p = tmp_path / "q.tsv"
    p.write_text("id\ttext\n")
    with pytest.raises(CatalogError, match="query_id and query"):
        read_queries(p)


def test_read_qrels_int_and_float_grades(tmp_path):
    p = tmp_path / "r.tsv"
    p.write_text("q1 0 a 2\nq1 0 b 1.67\nq2 0 a 3\nbroken line\nq2 0 c x\nq2 0 d nan\n")
    r = read_qrels(p)
    assert r.grades == {"q1": {"a": 2.0, "b": 1.67}, "q2": {"a": 3.0}}
    assert [e.line for e in r.errors] == [4, 5, 6]
    assert r.for_query("zz") == {}


def test_read_shared_data_files(shared_data):
    hd = read_queries(shared_data / "homedepot" / "queries.tsv")
    assert len(hd.queries) == 9795 and not hd.errors and hd.queries[0].user_id is None
    pq = read_queries(shared_data / "fashion" / "bench" / "dev" / "personal_queries.tsv")
    assert all(q.user_id for q in pq.queries)
    ev = read_event_users(shared_data / "fashion" / "bench" / "dev" / "events.csv")
    assert ev.events > 20000 and len(ev.products_by_user) > 100 and not ev.errors


# ------------------------------------------------------------------ splits
def _queries(n=200, users=0):
    return [Query(f"q{i}", f"query text {i}", f"u{i % users}" if users else None) for i in range(n)]


def test_splits_are_seeded_disjoint_and_proportional():
    qs = _queries(1000)
    a = assign(qs, seed=1)
    assert a == assign(list(reversed(qs)), seed=1)  # order of the file does not matter
    assert a != assign(qs, seed=2)
    counts = {s: sum(1 for v in a.values() if v == s) for s in ("train", "validation", "test")}
    assert counts == {"train": 700, "validation": 100, "test": 200}


def test_splits_group_by_user_and_by_query_text():
    qs = _queries(300, users=37) + [Query("x1", "Red  Shoes", None), Query("x2", "red shoes", None)]
    a = assign(qs, seed=3)
    by_user: dict[str, set[str]] = {}
    for q in qs[:300]:
        by_user.setdefault(q.user_id, set()).add(a[q.id])
    assert all(len(s) == 1 for s in by_user.values())  # a shopper never straddles splits
    assert a["x1"] == a["x2"] and group_of(qs[-1]) == group_of(qs[-2])
    assert {a[q.id] for q in qs} == {"train", "validation", "test"}


def test_splits_written_once_and_read_back(tmp_path):
    qs = _queries(50)
    s1 = load_or_create_splits(qs, tmp_path, name="fashion/dev", seed=5)
    assert s1.path and s1.path.startswith(str(tmp_path / "eval-splits"))
    stored = json.loads(open(s1.path).read())
    assert sorted(stored["splits"]["test"]) == sorted(s1.test)
    s2 = load_or_create_splits(qs, tmp_path, name="fashion/dev", seed=5)
    assert (s2.train, s2.validation, s2.test) == (s1.train, s1.validation, s1.test)
    assert s1.get("all") == {q.id for q in qs}
    with pytest.raises(ConfigError, match="unknown split"):
        s1.get("dev")
    with pytest.raises(ConfigError, match="summing to 1"):
        assign(qs, fractions=(0.5, 0.5, 0.5))


# ------------------------------------------------------------------ the harness on a real slice
from pathlib import Path  # noqa: E402

from rerank.evaluation.harness import EvalRequest, evaluate  # noqa: E402
from rerank.evaluation.report import format_table, plot_ndcg  # noqa: E402
from tests.rerank.evaldata import build_fashion_slice  # noqa: E402


@pytest.fixture(scope="session")
def fashion_slice(shared_data, tmp_path_factory):
    return build_fashion_slice(shared_data, tmp_path_factory.mktemp("fashion-slice"))


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-data")


def _indexer(data_dir: Path):
    from workers.jobs import run_index_job
    from workers.settings import load_settings

    settings = load_settings(data_dir=data_dir)
    return lambda engine, job: run_index_job(engine, settings, job, progress=False)


def _req(sl, **kw) -> EvalRequest:
    return EvalRequest(catalog=sl.catalog, queries=sl.queries, qrels=sl.qrels, gain="identity", images_root=sl.images_root, **kw)


@pytest.mark.slow
def test_retrieve_mode_baselines_beat_random_and_share_the_index(fashion_slice, eval_dir):
    systems = ("random", "bm25", "knn_text", "knn_image", "hybrid_minmax", "hybrid_rrf")
    rep = evaluate(_req(fashion_slice, mode="retrieve", split="all", systems=systems), data_dir=eval_dir, indexer=_indexer(eval_dir))
    out = rep.to_json()
    assert out["mode"] == "retrieve" and out["queries"] == fashion_slice.n_queries
    assert set(out["systems"]) == set(systems) - {"knn_image"}
    assert "text-to-image alignment" in out["skipped_systems"]["knn_image"]
    for name, m in out["systems"].items():
        for k in ("ndcg@10", "mrr@10", "recall@100", "judged@10"):
            assert 0.0 <= m[k] <= 1.0, (name, k)
    assert out["systems"]["random"]["runs"] == 5
    for name in ("bm25", "knn_text", "hybrid_rrf", "hybrid_minmax"):
        assert out["systems"][name]["ndcg@10"] > out["systems"]["random"]["ndcg@10"] + 0.1, name
    # every row: a 95% interval over the queries around its mean, and a paired test against the best first-stage system
    best = out["best_baseline"]
    assert best in ("bm25", "knn_text", "hybrid_rrf", "hybrid_minmax")
    assert out["systems"][best]["ndcg@10"] == max(out["systems"][n]["ndcg@10"] for n in ("bm25", "knn_text", "hybrid_rrf", "hybrid_minmax"))
    for name, m in out["systems"].items():
        for k in ("ndcg@10", "mrr@10"):
            lo, hi = m["ci95"][k]
            assert 0.0 <= lo <= m[k] <= hi <= 1.0 and hi - lo < 0.6, (name, k)
        vs = m["vs_best_baseline"]
        assert vs["system"] == best and vs["is_best_baseline"] == (name == best)
        assert vs["ndcg@10"]["diff"] == pytest.approx(m["ndcg@10"] - out["systems"][best]["ndcg@10"], abs=2e-6)
    rnd = out["systems"]["random"]["vs_best_baseline"]["ndcg@10"]
    assert rnd["significant"] and rnd["diff"] < -0.1 and rnd["p"] < 0.01  # 16 queries: random is clearly worse
    # a second evaluation reuses the cached index (no indexer call)
    def no_indexing(engine, job):
        raise AssertionError("the catalog was indexed twice")

    rep2 = evaluate(_req(fashion_slice, mode="retrieve", split="all", systems=("bm25",), subsets={"black": r"\bblack\b", "none": "^zzz$"}),
                    data_dir=eval_dir, indexer=no_indexing)
    assert rep2.systems["bm25"].metrics == rep.systems["bm25"].metrics
    # a subset is scored on its own queries: every matching query, no other, same metric definitions
    n_black = rep2.info["subsets"]["black"]["queries"]
    assert 0 < n_black < rep2.queries and rep2.info["subsets"]["none"]["queries"] == 0
    assert set(rep2.systems["bm25"].subsets) == {"black"}
    assert 0.0 <= rep2.systems["bm25"].subsets["black"]["ndcg@10"] <= 1.0
    assert "subset 'black'" in format_table(rep2)
    with pytest.raises(ConfigError, match="bad regular expression"):
        _req(fashion_slice, subsets={"broken": "("}).check()
    table = format_table(rep)
    assert "hybrid_rrf" in table and "n/a" in table
    png = plot_ndcg(rep, eval_dir / "ndcg.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerank_mode_reorders_judged_products_and_trains_lambdamart_once(fashion_slice, eval_dir):
    systems = ("random", "bm25", "hybrid_rrf", "lambdamart")
    rep = evaluate(_req(fashion_slice, mode="rerank", systems=systems), data_dir=eval_dir, indexer=_indexer(eval_dir))
    out = rep.to_json()
    assert out["split"] == "test" and 1 <= out["queries"] < fashion_slice.n_queries
    assert out["training"]["queries"] >= 5
    for name, m in out["systems"].items():
        assert m["recall@100"] == pytest.approx(1.0) and m["judged@10"] > 0  # the pool is the judged set
        assert 0.0 < m["ndcg@10"] <= 1.0
    models = list((eval_dir / "eval-models").glob("lambdamart-*/model.txt"))
    assert len(models) == 1
    rep2 = evaluate(_req(fashion_slice, mode="rerank", systems=("lambdamart",)), data_dir=eval_dir, indexer=_indexer(eval_dir))
    assert rep2.systems["lambdamart"].metrics == rep.systems["lambdamart"].metrics
    assert len(list((eval_dir / "eval-models").glob("lambdamart-*/model.txt"))) == 1
    # --model uses a given artifact
    rep3 = evaluate(_req(fashion_slice, mode="rerank", systems=("lambdamart",), model_dirs={"lambdamart": models[0].parent}),
                    data_dir=eval_dir, indexer=_indexer(eval_dir))
    assert rep3.systems["lambdamart"].metrics == rep.systems["lambdamart"].metrics


@pytest.mark.slow
def test_cross_encoder_fine_tunes_on_a_tiny_training_set(fashion_slice, eval_dir):
    req = _req(fashion_slice, mode="rerank", systems=("cross_encoder",), options={"ce_max_pairs": 48, "ce_batch_size": 8})
    rep = evaluate(req, data_dir=eval_dir, indexer=_indexer(eval_dir))
    r = rep.systems["cross_encoder"]
    assert 0.0 < r.metrics["ndcg@10"] <= 1.0
    assert "no pretrained cross-encoder exists offline" in r.note and "48" in r.note
    saved = list((eval_dir / "eval-models").glob("cross_encoder-*/model.safetensors"))
    assert len(saved) == 1


def test_training_files_protocol_and_bad_requests(fashion_slice, eval_dir, tmp_path):
    with pytest.raises(ConfigError, match="never saw"):
        evaluate(_req(fashion_slice, train_queries=fashion_slice.queries, train_qrels=fashion_slice.qrels), data_dir=tmp_path, indexer=_indexer(tmp_path))
    with pytest.raises(ConfigError, match="valid modes"):
        evaluate(_req(fashion_slice, mode="rank"), data_dir=tmp_path, indexer=_indexer(tmp_path))
    with pytest.raises(ConfigError, match="go together"):
        evaluate(_req(fashion_slice, train_queries=fashion_slice.queries), data_dir=tmp_path, indexer=_indexer(tmp_path))
    from indexing.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="hybrid_rrf"):
        evaluate(_req(fashion_slice, systems=("bm42",)), data_dir=tmp_path, indexer=_indexer(tmp_path))


@pytest.mark.slow
def test_train_files_evaluate_every_query(fashion_slice, eval_dir, tmp_path):
    # train on the first 10 queries' files, evaluate all 6 others
    lines = fashion_slice.queries.read_text().splitlines()
    head, rows = lines[0], lines[1:]
    tq, eq = tmp_path / "train_q.tsv", tmp_path / "eval_q.tsv"
    tq.write_text("\n".join([head] + rows[:10]) + "\n")
    eq.write_text("\n".join([head] + rows[10:]) + "\n")
    req = EvalRequest(catalog=fashion_slice.catalog, queries=eq, qrels=fashion_slice.qrels, gain="identity",
                      images_root=fashion_slice.images_root, train_queries=tq, train_qrels=fashion_slice.qrels,
                      systems=("bm25", "lambdamart"))
    out = evaluate(req, data_dir=eval_dir, indexer=_indexer(eval_dir)).to_json()
    assert out["split"] == "all" and out["queries"] == len(rows) - 10
    assert out["train"]["train"] + out["train"]["validation"] == 10
    assert 0.0 < out["systems"]["lambdamart"]["ndcg@10"] <= 1.0


@pytest.mark.slow
def test_cli_json_and_plot(fashion_slice, eval_dir, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from workers.cli import app

    monkeypatch.setenv("FUSIONRANK_DATA_DIR", str(eval_dir))  # reuse the session's cached index
    png = tmp_path / "plot.png"
    res = CliRunner().invoke(app, [
        "eval", "--catalog", str(fashion_slice.catalog), "--queries", str(fashion_slice.queries), "--qrels", str(fashion_slice.qrels),
        "--images-root", str(fashion_slice.images_root), "--gain", "identity", "--mode", "retrieve", "--split", "all",
        "--systems", "random,bm25,hybrid_rrf", "--json", "--plot", str(png), "--limit-queries", "5",
    ])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["queries"] == 5 and out["mode"] == "retrieve"
    assert set(out["systems"]["bm25"]) >= {"ndcg@10", "mrr@10", "recall@100"}
    assert png.is_file() and png.stat().st_size > 1000


# ------------------------------------------------------------------ diversity: list metrics and the trade-off by lambda
def _untrained_fusion(out: Path) -> Path:
    """A small real (untrained, seeded) FusionRanker artifact for the minilm index (no photos, no colour head)."""
    from indexing.encoders import get_text_encoder
    from rerank.model.artifact import EncoderRef, save_artifact
    from rerank.model.ranker import RankerConfig, build_ranker
    from rerank.model.inputs import FeatureSpec

    text = get_text_encoder("minilm")
    spec = FeatureSpec(history_k=6)
    cfg = RankerConfig(text_dim=text.dim, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields),
                       hash_buckets=spec.hash_buckets, history_k=spec.history_k, d_model=16, hidden=32, heads=2)
    return Path(save_artifact(out, build_ranker(cfg, device="cpu", seed=0), feature_spec=spec,
                              text_encoder=EncoderRef(text.model_id, text.dim), image_encoder=None))


@pytest.mark.slow
def test_diversity_metrics_and_the_trade_off_by_lambda(fashion_slice, eval_dir, tmp_path, monkeypatch):
    from rerank.evaluation.report import format_tradeoff, plot_tradeoff

    model = _untrained_fusion(tmp_path / "model")
    common = dict(mode="retrieve", split="all", top_n=50, model_dirs={"fusion": model})
    rep = evaluate(_req(fashion_slice, systems=("bm25", "fusion"), diversity=(0.0, 1.0, "auto"), **common), data_dir=eval_dir,
                   indexer=_indexer(eval_dir))
    out = rep.to_json()
    assert set(out) == {"by_diversity"} and list(out["by_diversity"]) == ["0", "1", "auto"]
    by = out["by_diversity"]
    for lab, o in by.items():
        assert o["diversity"] == lab and o["queries"] == fashion_slice.n_queries and o["diversity_step"]["lambdas"] == ["0", "1", "auto"]
        for name in ("bm25", "fusion"):
            m = o["systems"][name]
            assert 0.0 < m["ild@10"] <= 1.0 and 0.0 <= m["ndcg@10"] <= 1.0
            # the slice's catalog has types and colours (half of them withheld), no brand
            assert set(m["distinct@10"]) == {"article_type", "colour"} and 1.0 <= m["distinct@10"]["article_type"] <= 10.0
    # the baselines are the same at every lambda; the fusion system is re-ordered
    assert {k: v for k, v in by["0"]["systems"]["bm25"].items()} == by["1"]["systems"]["bm25"] == by["auto"]["systems"]["bm25"]
    f0, f1, fa = (by[k]["systems"]["fusion"] for k in ("0", "1", "auto"))
    assert f0["diversity"]["lambda_mean"] == 0.0 and f1["diversity"]["lambda_mean"] == 1.0 and f1["diversity"]["queries_diversified"] == 16
    from rerank.diversity import DiversityConfig

    assert 0.0 < fa["diversity"]["lambda_min"] <= fa["diversity"]["lambda_max"] <= DiversityConfig().auto_max  # auto: per query
    # lambda 1 places each next product as far from those above as it can: the top 10 are more diverse (this slice has
    # no photos, so the step's similarity and ild@10's are both the text vectors' cosine)
    assert f1["ild@10"] > f0["ild@10"] + 0.02
    # lambda 0 is the plain fusion system, metric for metric
    plain = evaluate(_req(fashion_slice, systems=("fusion",), **common), data_dir=eval_dir, indexer=_indexer(eval_dir)).to_json()
    assert "by_diversity" not in plain and "diversity" not in plain
    assert {k: v for k, v in plain["systems"]["fusion"].items() if k not in ("seconds", "note", "vs_best_baseline")} == \
        {k: v for k, v in f0.items() if k not in ("seconds", "note", "diversity", "vs_best_baseline")}
    # alone, fusion has no first-stage system to be tested against; beside bm25 it is, at every lambda
    assert plain["best_baseline"] is None and plain["systems"]["fusion"]["vs_best_baseline"] is None
    assert all(by[k]["best_baseline"] == "bm25" and by[k]["systems"]["fusion"]["vs_best_baseline"]["system"] == "bm25" for k in by)
    table = format_tradeoff(rep)
    assert "fusion:" in table and "bm25" not in table.split("fusion:")[1] and "colours@10" in table and "vs λ 0" in table
    assert "ild@10" in format_table(rep) and "colours@10" in format_table(rep)
    png = plot_tradeoff(rep, tmp_path / "tradeoff.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        _req(fashion_slice, diversity=(0.0, 1.5)).check()
    with pytest.raises(ConfigError, match="twice"):
        _req(fashion_slice, diversity=(0.3, "0.3")).check()

    # the command line: --diversity prints by_diversity with --json, the trade-off table without, --plot draws it
    from typer.testing import CliRunner

    from workers.cli import app

    monkeypatch.setenv("FUSIONRANK_DATA_DIR", str(eval_dir))
    args = ["eval", "--catalog", str(fashion_slice.catalog), "--queries", str(fashion_slice.queries), "--qrels", str(fashion_slice.qrels),
            "--images-root", str(fashion_slice.images_root), "--gain", "identity", "--mode", "retrieve", "--split", "all", "--top-n", "50",
            "--systems", "bm25,fusion", "--model", f"fusion={model}", "--limit-queries", "4"]
    res = CliRunner().invoke(app, [*args, "--diversity", "0,auto", "--json"])
    assert res.exit_code == 0, res.output
    js = json.loads(res.output.strip().splitlines()[-1])
    assert list(js["by_diversity"]) == ["0", "auto"] and "ild@10" in js["by_diversity"]["auto"]["systems"]["fusion"]
    res = CliRunner().invoke(app, [*args, "--diversity", "0,0.5", "--plot", str(tmp_path / "cli.png"), "--diversity-option", "colour_weight=0"])
    assert res.exit_code == 0, res.output
    assert "diversity trade-off" in res.output and (tmp_path / "cli.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, [*args, "--diversity", "0,2"])
    assert bad.exit_code != 0 and "[0, 1]" in str(bad.exception or bad.output)


# ------------------------------------------------------------------ systems plumbing (pure)
def test_pool_completion_and_random_runs():
    from indexing.engines.base import Hit
    from rerank.evaluation.harness import score_runs
    from rerank.evaluation.systems import SYSTEMS, EvalContext, EvalItem, candidates_for_pool, complete
    from rerank.datasets.metrics import MetricSpec
    from rerank.retrieval.retriever import FirstStage

    assert complete(["c", "x", "a", "c"], ["a", "b", "c", "d"]) == ["c", "a", "b", "d"]  # unknown ids dropped, rest by id
    stage = FirstStage("q", {"bm25": (Hit("b", 2.0), Hit("a", 1.0)), "knn_text": (Hit("a", 0.9),)}, {"knn_image": "no image"})
    cs = candidates_for_pool(stage, ["a", "b", "z"])
    assert cs.ids == ["a", "b", "z"] and cs.candidates[2].missing("bm25") and cs.candidates[2].missing("knn_text")
    item = EvalItem("q1", "q", None, {"a": 2.0, "b": 0.0, "z": 1.0}, stage, ("a", "b", "z"), cs)
    ctx = EvalContext(mode="rerank", items=[item])
    runs = SYSTEMS.create("random").runs(ctx)
    assert len(runs) == 5 and all(sorted(r["q1"]) == ["a", "b", "z"] for r in runs)
    assert runs == SYSTEMS.create("random").runs(ctx)  # seeded
    bm25 = SYSTEMS.create("bm25").runs(ctx)[0]["q1"]
    assert bm25 == ["b", "a", "z"]  # list order, then the judged product BM25 did not return
    m = score_runs([{"q1": ["a", "z", "b"]}], [item], MetricSpec())
    assert m["ndcg@10"] == pytest.approx(1.0) and m["mrr@10"] == 1.0
    # judged_share: how much of the first stage (pool order) has a judgment, over every item's candidates
    from rerank.datasets.pools import judged_share

    sparse = dataclasses.replace(item, gains={"b": 1.0})  # judged: the second of three
    assert judged_share([item, sparse]) == {"top10": round(4 / 6, 4), "all": round(4 / 6, 4), "queries": 2}
    assert judged_share([sparse], k=1) == {"top1": 0.0, "all": round(1 / 3, 4), "queries": 1}
    assert judged_share([]) == {"top10": None, "all": None, "queries": 0}


@pytest.mark.slow
def test_train_ubi_learns_from_a_simulated_log_without_the_evaluated_queries(fashion_slice, eval_dir, tmp_path):
    """A simulated UBI log of the slice's queries (shown: the judged products, shuffled; clicks by grade with a
    position bias); lambdamart trains on the click model's judgments, never on the evaluated queries' searches."""
    import random

    from rerank.datasets.data import read_qrels, read_queries

    rng = random.Random(3)
    qs = read_queries(fashion_slice.queries).queries
    qrels = read_qrels(fashion_slice.qrels)
    log = tmp_path / "ubi"
    log.mkdir()
    with open(log / "ubi_queries.jsonl", "w") as fq, open(log / "ubi_events.jsonl", "w") as fe:
        for i in range(600):
            q = qs[i % len(qs)]
            g = qrels.for_query(q.id)
            shown = sorted(g)
            rng.shuffle(shown)
            qid = f"s{i}"
            fq.write(json.dumps({"query_id": qid, "user_query": q.text, "client_id": f"c{i}", "timestamp": "2026-11-01T10:00:00Z",
                                 "query_response_hit_ids": shown}) + "\n")
            for r, d in enumerate(shown):
                if rng.random() < (1 / (r + 1)) * (0.1 + 0.4 * float(g[d])):
                    fe.write(json.dumps({"action_name": "click", "query_id": qid, "client_id": f"c{i}", "timestamp": "2026-11-01T10:00:05Z",
                                         "event_attributes": {"object": {"object_id": d}, "position": {"ordinal": r + 1}}}) + "\n")
    req = EvalRequest(catalog=fashion_slice.catalog, queries=fashion_slice.queries, qrels=fashion_slice.qrels, gain="identity",
                      images_root=fashion_slice.images_root, systems=("bm25", "lambdamart"), train_ubi=log)
    out = evaluate(req, data_dir=eval_dir, indexer=_indexer(eval_dir)).to_json()
    ubi = out["train"]["ubi"]
    assert ubi["click_model"] == "pbm" and ubi["excluded_query_texts"] == out["queries"] > 0
    trained = {q.text.lower() for q in read_queries(Path(ubi["judgments_file"]).with_name("queries.tsv")).queries}
    evaluated = {q.text.lower() for q in qs} - trained
    assert len(evaluated) >= out["queries"] and not trained & evaluated
    assert out["train"]["train"] + out["train"]["validation"] == len(trained)
    assert 0.0 < out["systems"]["lambdamart"]["ndcg@10"] <= 1.0
    cov = out["training"]["log_coverage"]  # the share of the training queries' first stage the log judged
    assert cov["train"]["queries"] == out["training"]["queries"] and cov["validation"]["queries"] == out["training"]["validation_queries"]
    assert all(0.0 < cov[p][k] <= 1.0 for p in ("train", "validation") for k in ("top10", "all"))
    # --ubi-validation-share (default 0.3): that share of the log's query texts validates (the verdict's paired test), none is lost
    assert abs(out["train"]["validation"] - 0.3 * len(trained)) <= 1
    narrow = evaluate(dataclasses.replace(req, systems=("bm25",), ubi_validation_share=0.1), data_dir=eval_dir, indexer=_indexer(eval_dir)).to_json()
    assert narrow["train"]["train"] + narrow["train"]["validation"] == len(trained)
    assert narrow["train"]["validation"] < out["train"]["validation"] and abs(narrow["train"]["validation"] - 0.1 * len(trained)) <= 1
    with pytest.raises(ConfigError, match="--ubi-validation-share must be in"):
        evaluate(dataclasses.replace(req, ubi_validation_share=1.0), data_dir=eval_dir, indexer=_indexer(eval_dir))
    # --ubi-labels qrels: the same log queries and split, labelled by the qrels of the same texts (the reference arm)
    graded = evaluate(dataclasses.replace(req, systems=("bm25",), ubi_labels="qrels"), data_dir=eval_dir, indexer=_indexer(eval_dir)).to_json()
    assert graded["ubi_labels"]["labels"] == "qrels" and graded["ubi_labels"]["log_texts_without_qrels"] == 0
    assert (graded["train"]["train"], graded["train"]["validation"]) == (out["train"]["train"], out["train"]["validation"])
    by_text = {q.text.lower(): q.id for q in qs}
    log_q = {q.id: q.text.lower() for q in read_queries(Path(graded["train"]["ubi"]["judgments_file"]).with_name("queries.tsv")).queries}
    labels = read_qrels(graded["train"]["ubi"]["judgments_file"]).grades
    assert labels and all(dict(labels[i]) == dict(qrels.for_query(by_text[t])) for i, t in log_q.items() if i in labels)
    with pytest.raises(ConfigError, match="--ubi-labels needs --train-ubi"):
        evaluate(EvalRequest(catalog=fashion_slice.catalog, queries=fashion_slice.queries, qrels=fashion_slice.qrels, gain="identity",
                             ubi_labels="qrels"), data_dir=eval_dir, indexer=_indexer(eval_dir))
    with pytest.raises(ConfigError, match="--ubi-labels must be one of clicks, qrels"):
        evaluate(dataclasses.replace(req, ubi_labels="grades"), data_dir=eval_dir, indexer=_indexer(eval_dir))
    with pytest.raises(ConfigError, match="--train-ubi replaces"):
        evaluate(EvalRequest(catalog=fashion_slice.catalog, queries=fashion_slice.queries, qrels=fashion_slice.qrels, gain="identity",
                             train_ubi=log, train_queries=fashion_slice.queries, train_qrels=fashion_slice.qrels), data_dir=eval_dir, indexer=_indexer(eval_dir))


@pytest.mark.slow
def test_head_queries_are_the_ones_the_log_searched_often_and_stay_in_its_training_log(fashion_slice, eval_dir, tmp_path):
    """``--head-queries N``: only the queries with N or more searches in the log are evaluated (every other query of the
    slice: 25 searches, the rest: 2), and their searches are not removed from the training log."""
    from rerank.datasets.data import read_qrels, read_queries

    qs = read_queries(fashion_slice.queries).queries
    qrels = read_qrels(fashion_slice.qrels)
    log = tmp_path / "ubi"
    log.mkdir()
    n = 0
    with open(log / "ubi_queries.jsonl", "w") as fq, open(log / "ubi_events.jsonl", "w") as fe:
        for j, q in enumerate(qs):
            shown = sorted(qrels.for_query(q.id))
            for _ in range(25 if j % 2 == 0 else 2):
                n += 1
                fq.write(json.dumps({"query_id": f"s{n}", "user_query": q.text, "client_id": f"c{n}", "timestamp": "2026-11-01T10:00:00Z",
                                     "query_response_hit_ids": shown}) + "\n")
                if shown:
                    fe.write(json.dumps({"action_name": "click", "query_id": f"s{n}", "client_id": f"c{n}", "timestamp": "2026-11-01T10:00:05Z",
                                         "event_attributes": {"object": {"object_id": shown[0]}, "position": {"ordinal": 1}}}) + "\n")
    req = EvalRequest(catalog=fashion_slice.catalog, queries=fashion_slice.queries, qrels=fashion_slice.qrels, gain="identity",
                      images_root=fashion_slice.images_root, systems=("bm25",), train_ubi=log, split="all", head_queries=20)
    out = evaluate(req, data_dir=eval_dir, indexer=_indexer(eval_dir)).to_json()
    head = [q for j, q in enumerate(qs) if j % 2 == 0]
    with_gain = [q for q in head if any(g > 0 for g in qrels.for_query(q.id).values())]
    assert out["head_queries"]["queries"] == len(head) and out["head_queries"]["of"] == len(qs)
    assert out["queries"] == len(with_gain) > 0
    assert out["train"]["ubi"]["excluded_query_texts"] == 0 and out["train"]["ubi"]["sessions_excluded"] == 0
    with pytest.raises(ConfigError, match="--head-queries needs --train-ubi"):
        evaluate(EvalRequest(catalog=fashion_slice.catalog, queries=fashion_slice.queries, qrels=fashion_slice.qrels, gain="identity",
                             head_queries=20), data_dir=eval_dir, indexer=_indexer(eval_dir))
    with pytest.raises(ConfigError, match="no query of the 'all' split has 100 or more searches"):
        evaluate(dataclasses.replace(req, head_queries=100), data_dir=eval_dir, indexer=_indexer(eval_dir))


@pytest.mark.slow
def test_an_artifact_serving_the_safe_choice_is_scored_as_it_serves(fashion_slice, eval_dir, tmp_path):
    """A fusion artifact whose verdict chose the first-stage order scores exactly like hybrid_rrf (the order it reorders),
    and the report says what it served."""
    model = _untrained_fusion(tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["serving"] = {"policy": "safe_choice", "signal": "first_stage", "verdict": {"summary": "test: nothing learned"}}
    (model / "config.json").write_text(json.dumps(cfg))
    for mode in ("retrieve", "rerank"):
        out = evaluate(_req(fashion_slice, systems=("hybrid_rrf", "fusion"), mode=mode, split="all", top_n=50, model_dirs={"fusion": model}),
                       data_dir=eval_dir, indexer=_indexer(eval_dir)).to_json()
        f, h = out["systems"]["fusion"], out["systems"]["hybrid_rrf"]
        for k in ("ndcg@10", "mrr@10", "recall@100", "judged@10"):
            assert f[k] == h[k], (mode, k)
        assert f["ci95"] == h["ci95"] and out["best_baseline"] == "hybrid_rrf"
        assert f["vs_best_baseline"]["ndcg@10"] == {"diff": 0.0, "p": 1.0, "significant": False, "diff_ci95": [0.0, 0.0],
                                                    "queries": fashion_slice.n_queries}
        assert f["serving"]["policy"] == "safe_choice" and f["serving"]["signal"] == "first_stage"
        assert "serves the safe choice (first_stage), not the model" in f["note"]
    # the untrained model itself (serving its model) orders differently
    plain = evaluate(_req(fashion_slice, systems=("hybrid_rrf", "fusion"), mode="retrieve", split="all", top_n=50,
                          model_dirs={"fusion": _untrained_fusion(tmp_path / "plain")}), data_dir=eval_dir, indexer=_indexer(eval_dir)).to_json()
    assert plain["systems"]["fusion"]["serving"]["policy"] == "model" and plain["systems"]["fusion"]["ndcg@10"] != plain["systems"]["hybrid_rrf"]["ndcg@10"]


def test_subset_of_the_queries_naming_a_catalog_value(tmp_path):
    """``--subset colour=values:colour``: the queries that name any colour the catalog uses, as whole words or phrases."""
    import re

    from rerank.evaluation.harness import subset_pattern

    cat = tmp_path / "catalog.csv"
    cat.write_text("product_id,title,base_colour,article_type\n1,a,Navy Blue,Shirts\n2,b,Red,Shirts\n3,c,,Heels\n4,d,Off White,Heels\n")
    rx = subset_pattern("values:colour", cat)
    hits = {q for q in ("navy blue shirts", "RED heels", "reddish heels", "off white heels", "white heels", "shirts for men", "navy shirts")
            if re.search(rx, q, flags=re.IGNORECASE)}
    assert hits == {"navy blue shirts", "RED heels", "off white heels"}
    assert subset_pattern(r"\bred\b", cat) == r"\bred\b"  # a regular expression stays as it is
    with pytest.raises(ConfigError, match="no value in field 'base_colour'"):
        subset_pattern("values:base_colour", cat)
    with pytest.raises(ConfigError, match="needs a catalog field"):
        EvalRequest(catalog=cat, queries=cat, qrels=cat, gain="identity", subsets={"colour": "values:"}).check()


def test_the_eval_commands_defaults_for_a_log_are_the_harness_constants():
    """``fusionrank eval``'s ``--ubi-validation-share`` and ``--ubi-labels`` defaults are literals (importing the harness
    for them would load it on every CLI start): they must equal the harness's own defaults."""
    import typer

    from rerank.evaluation.harness import UBI_LABELS, UBI_VALIDATION_SHARE
    from workers.cli import app

    cmd = typer.main.get_command(app).commands["eval"]
    defaults = {p.name: p.default for p in cmd.params}
    assert defaults["ubi_validation_share"] == UBI_VALIDATION_SHARE == EvalRequest.__dataclass_fields__["ubi_validation_share"].default
    assert defaults["ubi_labels"] == UBI_LABELS[0] == EvalRequest.__dataclass_fields__["ubi_labels"].default

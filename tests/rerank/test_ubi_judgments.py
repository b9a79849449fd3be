"""Implicit judgments from a (simulated) UBI log as the harness's training files: evaluated queries left out, cached."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from rerank.datasets.data import read_qrels, read_queries
from rerank.datasets.ubi_judgments import ubi_query_id, write_ubi_judgments


def _log(d: Path, seed: int = 0) -> Path:
    """Two queries; products 'good-*' are clicked often, 'bad-*' rarely (simulated, position-biased)."""
    rng = random.Random(seed)
    d.mkdir(parents=True)
    with open(d / "ubi_queries.jsonl", "w") as fq, open(d / "ubi_events.jsonl", "w") as fe:
        for i in range(400):
            text = "Black Shoes" if i % 2 else "red dress"
            prods = [f"good-{j}" for j in range(3)] + [f"bad-{j}" for j in range(5)]
            rng.shuffle(prods)
            qid = f"q{i}"
            fq.write(json.dumps({"query_id": qid, "user_query": text, "client_id": f"c{i}", "timestamp": "2026-11-01T10:00:00Z",
                                 "query_response_hit_ids": prods}) + "\n")
            for r, p in enumerate(prods):
                if rng.random() < (1.0 / (r + 1)) * (0.8 if p.startswith("good") else 0.05):
                    fe.write(json.dumps({"action_name": "click", "query_id": qid, "client_id": f"c{i}", "timestamp": "2026-11-01T10:00:05Z",
                                         "event_attributes": {"object": {"object_id": p}, "position": {"ordinal": r + 1}}}) + "\n")
    return d


def test_judgments_rank_the_clicked_products_first_and_leave_out_excluded_queries(tmp_path: Path) -> None:
    log = _log(tmp_path / "log")
    uj = write_ubi_judgments(log, tmp_path / "out", exclude=["red  DRESS"], model="pbm")
    qs = read_queries(uj.queries).queries
    assert [q.text for q in qs] == ["Black Shoes"]
    assert qs[0].id == ubi_query_id("black shoes")
    g = read_qrels(uj.qrels).for_query(qs[0].id)
    assert min(g[f"good-{j}"] for j in range(3)) > max(g[f"bad-{j}"] for j in range(5))
    assert max(g.values()) <= 2.0 and uj.info["sessions_excluded"] == 200 and uj.info["excluded_query_texts"] == 1
    again = write_ubi_judgments(log, tmp_path / "out", exclude=["red dress"], model="pbm")
    assert again.qrels == uj.qrels  # cached by content
    both = write_ubi_judgments(log, tmp_path / "out", model="ctr")
    assert both.qrels != uj.qrels and len(read_queries(both.queries).queries) == 2


def test_cli_click_models_compares_on_held_out_searches(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from workers.cli import app

    log = _log(tmp_path / "log")
    r = CliRunner().invoke(app, ["events", "click-models", str(log), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    m = out["models"]
    assert set(m) == {"ctr", "pbm", "sdbn"} and out["test_sessions"] + out["train_sessions"] == 400
    assert m["pbm"]["log_likelihood"] > m["ctr"]["log_likelihood"]  # the simulated clicks are position-biased
    assert m["pbm"]["theta"][0] > m["pbm"]["theta"][3]


def test_cli_train_from_ubi_takes_a_catalog_and_no_qrels(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from workers.cli import app

    log = _log(tmp_path / "log")
    cat = tmp_path / "c.csv"
    cat.write_text("product_id,title\ngood-0,a\n")
    r = CliRunner().invoke(app, ["train", "--from-ubi", str(log), "--catalog", str(cat), "--queries", str(cat), "--out", str(tmp_path / "m")])
    assert r.exit_code != 0 and "no --queries/--qrels" in r.output
    r = CliRunner().invoke(app, ["train", "--from-ubi", str(log), "--out", str(tmp_path / "m")])
    assert r.exit_code != 0 and "--from-ubi takes --catalog" in r.output


def test_train_says_how_much_of_the_first_stage_the_log_judged() -> None:
    from workers.commands.train import log_coverage_lines

    rep = {"datasets": {"ubi-pbm": {"log_coverage": {"train": {"top10": 0.625, "all": 0.2, "queries": 168}, "validation": {}}},
                        "qrels-set": {"gain": "identity"}}}
    assert log_coverage_lines(rep) == ["ubi-pbm: the log judged 62% of the first stage's top 10 for its 168 training queries "
                                       "(20% of every candidate); what it never showed trains as irrelevant"]
    assert log_coverage_lines({"datasets": {"ubi-pbm": {"log_coverage": {"train": {"top10": None, "all": None, "queries": 0}}}}}) == []


def test_a_stronger_prior_pulls_a_rarely_examined_pair_towards_the_log_mean(tmp_path: Path) -> None:
    """prior_strength: a product examined once and clicked once is not judged as sure as one clicked often; the setting
    is part of the cache key (and written in the info)."""
    from rerank.datasets.clicks import Session
    from rerank.datasets.ubi_judgments import judgments_from_sessions

    often = [Session("q", ("a", "b", "c"), frozenset({0}), client=f"c{i}") for i in range(40)]
    once = [Session("q", ("lucky", "b", "c"), frozenset({0}), client="x")]
    grades = {}
    for s in (1.0, 5.0):
        j, info = judgments_from_sessions(often + once, model="ctr", prior_strength=s)
        assert info["prior_strength"] == s
        grades[s] = j["q"]
    assert grades[1.0]["a"] >= grades[1.0]["lucky"] > grades[5.0]["lucky"]
    log = _log(tmp_path / "log")
    assert write_ubi_judgments(log, tmp_path / "out", prior_strength=5.0).qrels != write_ubi_judgments(log, tmp_path / "out").qrels


def test_validation_judgments_judge_the_same_pairs_shrunk_harder(tmp_path: Path) -> None:
    """The log's validation judgments (early stopping and the verdict read them): the same queries and pairs as the
    training judgments, a lucky once-clicked pair pulled further towards the log's mean, the clicked products still first."""
    from rerank.datasets.clicks import Session
    from rerank.datasets.ubi_judgments import VALIDATION_PRIOR_STRENGTH, log_judgments

    often = [Session("q", ("a", "b", "c"), frozenset({0}), client=f"c{i}") for i in range(40)]
    once = [Session("q", ("lucky", "b", "c"), frozenset({0}), client="x")]
    lj = log_judgments(often + once, model="ctr")
    assert VALIDATION_PRIOR_STRENGTH > lj.info["prior_strength"] and lj.info["validation_prior_strength"] == VALIDATION_PRIOR_STRENGTH
    assert set(lj.validation) == set(lj.train) and set(lj.validation["q"]) == set(lj.train["q"])
    assert lj.train["q"]["lucky"] > lj.validation["q"]["lucky"] and lj.validation["q"]["a"] > lj.validation["q"]["lucky"]
    assert log_judgments(often + once, model="ctr", validation_prior_strength=1.0).validation == lj.train
    log = _log(tmp_path / "log")
    uj = write_ubi_judgments(log, tmp_path / "out", model="pbm")
    train, valid = read_qrels(uj.qrels), read_qrels(uj.validation_qrels)
    assert uj.validation_qrels is not None and uj.validation_qrels.parent == uj.qrels.parent
    assert {q: set(g) for q, g in train.grades.items()} == {q: set(g) for q, g in valid.grades.items()}
    for q, g in valid.grades.items():
        assert min(g[f"good-{j}"] for j in range(3)) > max(g[f"bad-{j}"] for j in range(5))
        assert g != train.for_query(q)
    assert write_ubi_judgments(log, tmp_path / "out", model="pbm").validation_qrels == uj.validation_qrels  # cached
    other = write_ubi_judgments(log, tmp_path / "out", model="pbm", validation_prior_strength=3.0)
    assert other.validation_qrels != uj.validation_qrels and read_qrels(other.qrels).grades == train.grades


def test_the_label_part_is_a_seeded_half_of_the_searches_judged_and_counted_alone(tmp_path: Path) -> None:
    """The log's label part (a training query that reads its own behaviour is labelled by it and reads its columns from
    the other searches): about half of each query's searches, the same on every run; its judgments come from its own
    searches only (still ranking the clicked products first) and its statistics count those searches only."""
    from rerank.datasets.clicks import Session
    from rerank.datasets.ubi_judgments import LABEL_PART_SHARE, in_label_part, log_judgments
    from rerank.model.behaviour import BehaviourStats

    log = _log(tmp_path / "log")
    uj = write_ubi_judgments(log, tmp_path / "out", model="pbm")
    assert uj.label_part_qrels is not None and uj.label_part_behaviour is not None
    full, part = BehaviourStats.load(uj.behaviour), BehaviourStats.load(uj.label_part_behaviour)
    for q, n in full.searches.items():
        assert abs(part.searches[q] - LABEL_PART_SHARE * n) < 0.15 * n  # 200 searches per query: about half
    assert uj.info["label_part"]["sessions"] == sum(part.searches.values())
    lp, train = read_qrels(uj.label_part_qrels), read_qrels(uj.qrels)
    assert set(lp.grades) == set(train.grades) and lp.grades != train.grades
    for q, g in lp.grades.items():
        assert min(g[f"good-{j}"] for j in range(3)) > max(g[f"bad-{j}"] for j in range(5))
    # the query's searches less its label part: what a training query labelled by that part reads
    q = "black shoes"
    rest = full.features(q, ["good-0", "bad-0"], without=part)
    assert np.allclose(rest[:, 6], np.log1p(full.searches[q] - part.searches[q]))
    assert np.allclose(rest[:, 1], np.log1p(np.array([full.pairs[(q, d)][1] - part.pairs[(q, d)][1] for d in ("good-0", "bad-0")])), atol=1e-3)
    # seeded by the search's id: the same membership every time, none without an id twice the same
    s = [Session("q", ("a",), frozenset(), query_id=f"s{i}") for i in range(1000)]
    assert [in_label_part(x, i) for i, x in enumerate(s)] == [in_label_part(x, 0) for x in s]
    assert 400 < sum(in_label_part(x, i) for i, x in enumerate(s)) < 600
    assert log_judgments([Session("q", ("a", "b"), frozenset({0}), query_id="x")], model="ctr").label_part is None


def test_qrels_by_text_label_the_logs_queries_with_a_persons_grades(tmp_path: Path) -> None:
    """``--ubi-labels qrels``: the log's query texts (any case) take the grades of the graded query of the same text,
    under the log's query ids; a text without graded products is counted, not labelled."""
    from rerank.datasets.data import Query
    from rerank.datasets.ubi_judgments import write_qrels_by_text

    uj = write_ubi_judgments(_log(tmp_path / "log"), tmp_path / "out")
    graded = [Query("a", "black shoes"), Query("b", "Red Dress"), Query("c", "something else")]
    out, missing = write_qrels_by_text(uj, graded, {"a": {"p1": 2.0, "p2": 0.0}, "c": {"p3": 1.0}}, tmp_path / "out" / "graded.tsv")
    assert missing == 1  # "red dress" has no graded product
    got = read_qrels(out).grades
    assert got == {ubi_query_id("Black Shoes"): {"p1": 2.0, "p2": 0.0}}
    assert set(got) <= {q.id for q in read_queries(uj.queries).queries}

"""The model registry (versions, the current link, the ledger, promote, rollback) and the loop's library half
(the held-out split, the estimate, the promotion rule)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from indexing.errors import ConfigError, ModelArtifactError
from rerank.model.artifact import FORMAT_VERSION


def _fake_artifact(d, version: str):
    """A folder with the artifact's config (the registry reads only config.json and training_report.json)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"artifact_version": version, "kind": "fusion_ranker", "format_version": FORMAT_VERSION}))
    (d / "weights.safetensors").write_bytes(os.urandom(16))
    (d / "training_report.json").write_text(json.dumps({"best_validation_ndcg@10": 0.5, "datasets": {"ubi-store": {}}}))
    return d


@pytest.fixture()
def reg(tmp_path):
    from rerank.model.registry import ModelRegistry

    r = ModelRegistry(tmp_path / "models")
    for i, v in enumerate(("20261201T000000Z-aaa", "20261202T000000Z-bbb", "20261203T000000Z-ccc")):
        assert r.add(_fake_artifact(tmp_path / f"src{i}", v)) == v
    return r


def test_versions_promote_and_rollback_along_the_promotions(reg, tmp_path):
    a, b, c = (v.version for v in reg.versions())
    assert reg.current() is None
    with pytest.raises(ConfigError, match="no model has been promoted"):
        reg.rollback()
    reg.promote(a)
    reg.promote(b)
    e = reg.promote(c, reason="better", evaluation={"log": {"diff": 0.05}})
    assert e["previous"] == b and reg.current() == c
    assert os.readlink(reg.link) == c  # a relative link: the folder can move
    assert [v.version for v in reg.versions() if v.current] == [c]
    assert reg.rollback()["version"] == b
    assert reg.rollback()["version"] == a  # back along the promotions, not back and forth
    with pytest.raises(ConfigError, match="only version"):
        reg.rollback()
    reg.promote(c)
    assert reg.serving_stack() == [a, c] and reg.rollback()["version"] == a
    actions = [(x["action"], x["version"]) for x in reg.ledger()]
    assert actions == [("promote", a), ("promote", b), ("promote", c), ("rollback", b), ("rollback", a), ("promote", c), ("rollback", a)]


def test_bad_requests_change_nothing(reg, tmp_path):
    a = reg.versions()[0].version
    reg.promote(a)
    for bad in ("nope", "../x", "", "current", ".lock"):
        with pytest.raises(ConfigError):
            reg.promote(bad)
    assert reg.current() == a and len(reg.ledger()) == 1
    with pytest.raises(ModelArtifactError):
        reg.add(tmp_path)  # not an artifact
    (reg.root / "ledger.jsonl").open("a").write('{"torn')  # a writer died mid-line: skipped, not fatal
    assert len(reg.ledger()) == 1


def test_adding_twice_keeps_one_copy_and_a_plain_current_folder_is_refused(reg, tmp_path):
    from rerank.model.registry import ModelRegistry

    n = len(reg.versions())
    v = reg.add(_fake_artifact(tmp_path / "again", "20261201T000000Z-aaa"))
    assert v == "20261201T000000Z-aaa" and len(reg.versions()) == n
    other = ModelRegistry(tmp_path / "plain")
    (tmp_path / "plain" / "current").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not a symlink"):
        other.current()


def test_concurrent_promotions_leave_a_consistent_link_and_ledger(reg):
    vs = [v.version for v in reg.versions()]
    errors = []

    def hammer(k):
        try:
            for i in range(20):
                reg.promote(vs[(k + i) % 3])
        except Exception as e:  # pragma: no cover - the test fails below
            errors.append(e)

    ts = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    led = reg.ledger()
    assert len(led) == 80 and reg.current() == led[-1]["version"]
    assert all(led[i]["previous"] == led[i - 1]["version"] for i in range(1, len(led)))  # serialised: each saw the one before


def test_the_held_out_split_is_by_query_and_stable():
    from rerank.datasets.clicks import Session
    from rerank.training.loop import is_heldout, split_sessions_by_query

    texts = [f"query number {i}" for i in range(2000)]
    held = [t for t in texts if is_heldout(t, 0.2)]
    assert 0.15 < len(held) / len(texts) < 0.25
    assert is_heldout("Query  Number 7", 0.2) == is_heldout("query number 7", 0.2)  # normalised text
    ss = [Session(t.lower(), ("a", "b"), frozenset({0})) for t in texts[:200] for _ in range(3)]
    train, out = split_sessions_by_query(ss, 0.2)
    assert {s.query for s in train}.isdisjoint({s.query for s in out}) and len(train) + len(out) == 600
    with pytest.raises(ValueError):
        is_heldout("x", 1.0)


def test_the_estimate_and_the_rule():
    from rerank.training.loop import decide, estimate, paired

    judg = {"red dress": {"d1": 2, "d2": 1, "d3": 0}, "blue jeans": {"j1": 2}, "nothing": {"x": 0}}
    good = estimate(lambda q: ["d1", "d2", "d3"] if q == "red dress" else ["j1"], judg)
    worse = estimate(lambda q: ["d3", "d2", "d1"] if q == "red dress" else ["z", "j1"], judg)
    assert good.queries == 2 and good.ndcg == pytest.approx(1.0)  # the query without a positive gain is left out
    assert 0.3 < worse.ndcg < 0.8
    up, down = paired(good, worse), paired(worse, good)
    assert up["diff"] > 0.2 and (up["better"], up["worse"]) == (2, 0) and down["diff"] == -up["diff"]
    assert decide({"log": up}, 0.01)[0] is True
    ok, why = decide({"log": up, "qrels": down}, 0.01)
    assert ok is False and "qrels" in why
    assert decide({"log": paired(good, good)}, 0.01)[0] is False  # equal is not better by the margin
    assert decide({"log": {"diff": 0.0, "queries": 0, "better": 0, "worse": 0}}, 0.0)[0] is False

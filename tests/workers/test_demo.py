import json

import pytest
from typer.testing import CliRunner

from workers.cli import app

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_on_a_generated_catalog(tmp_path, monkeypatch):
    """Where ../shared/data does not exist the demo generates a catalog and still does every step."""
    monkeypatch.setenv("FUSIONRANK_SHARED_DATA", str(tmp_path / "no-shared-data"))
    monkeypatch.setenv("FUSIONRANK_DEVICE", "cpu")
    res = CliRunner().invoke(app, ["demo", "--synthetic-size", "80", "--systems", "random,bm25,knn_text,hybrid_rrf", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["steps"]["data"]["synthetic"] is True
    assert out["steps"]["index"]["count"] == 80 and out["steps"]["index"]["build"]["failed"] == 0
    assert set(out["steps"]["search"]) == {"black casual shoes for men", "women's red handbag"}
    ev = out["evaluation"]
    assert ev["mode"] == "retrieve" and ev["queries"] > 0
    ndcg = {name: m["ndcg@10"] for name, m in ev["systems"].items()}
    assert set(ndcg) == {"random", "bm25", "knn_text", "hybrid_rrf"}
    # text matching beats chance by a wide margin on colour + type queries
    assert min(ndcg["bm25"], ndcg["knn_text"], ndcg["hybrid_rrf"]) > ndcg["random"] + 0.2

    # a second run reuses the index (nothing re-encoded) and gives the same table
    again = CliRunner().invoke(app, ["demo", "--synthetic-size", "80", "--systems", "random,bm25,knn_text,hybrid_rrf", "--json"])
    assert again.exit_code == 0, again.output
    out2 = json.loads(again.output.strip().splitlines()[-1])
    assert out2["steps"]["index"]["path"] == out["steps"]["index"]["path"]
    assert {n: m["ndcg@10"] for n, m in out2["evaluation"]["systems"].items()} == ndcg


def test_demo_trains_the_fusion_model_and_installs_it_for_the_drop_in_call(tmp_path, monkeypatch):
    """After the demo, ``build_reranker()`` serves its model over its index with no other set-up."""
    from workers.composition import build_reranker

    monkeypatch.setenv("FUSIONRANK_SHARED_DATA", str(tmp_path / "no-shared-data"))
    monkeypatch.setenv("FUSIONRANK_DEVICE", "cpu")
    monkeypatch.setenv("FUSIONRANK_RERANK_BUDGET_MS", "10000")  # the subject is the wiring, not the budget (a shared CPU)
    args = ["demo", "--synthetic-size", "80", "--systems", "bm25,fusion", "--train-minutes", "0.1", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert set(out["evaluation"]["systems"]) == {"bm25", "fusion"}
    serving = out["steps"]["serving"]
    assert serving["installed"] is True and serving["index"] and serving["model_version"]

    r = build_reranker(history=False)
    hits = r.engine.bm25_search(r.index, "red handbag", size=10)
    assert len(hits) >= 2
    resp = {"hits": {"hits": [{"_id": h.id, "_score": h.score} for h in hits]}}
    ranked = r.rerank("red handbag", resp)
    assert ranked["fusionrank"]["degraded"] is None and ranked["fusionrank"]["model_version"].replace(":", "-") == serving["model_version"]
    assert sorted(h["_id"] for h in ranked["hits"]["hits"]) == sorted(h.id for h in hits)
    r.engine.close()

    again = CliRunner().invoke(app, args)  # a second run keeps the installed index alias as it is
    assert again.exit_code == 0, again.output
    assert "left as it is" in json.loads(again.output.strip().splitlines()[-1])["steps"]["serving"]["note"]

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

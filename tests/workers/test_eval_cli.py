import pytest

from indexing.errors import ConfigError
from workers.commands.evaluate import parse_fusion_options


def test_fusion_options_are_parsed_and_checked():
    assert parse_fusion_options(["max_minutes=2.5", "epochs=3", "loss=lambda"]) == {"max_minutes": 2.5, "epochs": 3, "loss": "lambda"}
    assert parse_fusion_options([]) == {}
    with pytest.raises(ConfigError, match="unknown --fusion-option 'speed'"):
        parse_fusion_options(["speed=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_fusion_options(["epochs"])


@pytest.mark.slow
@pytest.mark.opensearch
def test_eval_on_opensearch_matches_the_local_engine_and_the_pipelines_fuse_like_the_client(tmp_path, monkeypatch, opensearch_node):
    """``fusionrank eval --engine opensearch``: the local evaluation index copied into the node, every system searched
    there; kNN and the fusions agree with the local run, and the node's own hybrid pipelines give the client's order."""
    import json

    from typer.testing import CliRunner

    from indexing.synthetic import make_synthetic_catalog, make_synthetic_queries
    from workers.cli import app

    data = tmp_path / "synthetic"
    catalog = make_synthetic_catalog(data, n=120, seed=3)
    queries, qrels = make_synthetic_queries(data)
    monkeypatch.setenv("FUSIONRANK_DEVICE", "cpu")
    monkeypatch.setenv("FUSIONRANK_OPENSEARCH_URL", opensearch_node.url)
    monkeypatch.setenv("FUSIONRANK_HNSW_ENGINE", opensearch_node.hnsw_engine)
    args = ["eval", "--catalog", str(catalog), "--queries", str(queries), "--qrels", str(qrels), "--gain", "identity",
            "--mode", "retrieve", "--split", "all", "--top-n", "50", "--systems", "bm25,knn_text,hybrid_minmax,hybrid_rrf", "--json"]
    runs = {}
    for engine in ("local", "opensearch"):
        res = CliRunner().invoke(app, [*args, "--engine", engine])
        assert res.exit_code == 0, res.output
        runs[engine] = json.loads(res.output.strip().splitlines()[-1])
    local, remote = runs["local"], runs["opensearch"]
    assert remote["index"]["engine"] == "opensearch" and remote["index"]["name"].startswith("fusionrank-eval-")
    assert remote["index"]["docs"] == local["index"]["docs"] == 120
    ndcg = {e: {s: m["ndcg@10"] for s, m in r["systems"].items()} for e, r in runs.items()}
    # the same stored vectors: kNN differs only by lucene's HNSW (approximate) on 120 documents
    assert abs(ndcg["opensearch"]["knn_text"] - ndcg["local"]["knn_text"]) <= 0.01
    # BM25 is Lucene's there and tantivy's here: close on these titles, not identical
    assert abs(ndcg["opensearch"]["bm25"] - ndcg["local"]["bm25"]) <= 0.1
    check = remote["pipeline_fusion"]
    for system in ("hybrid_minmax", "hybrid_rrf"):
        r = check[system]
        assert r["queries"] > 10
        # RRF ranks equal BM25 scores by id here and in document order there: count what is left beside that rule
        same = max(r["same_top_k"], r.get("same_top_k_engine_tie_order", 0))
        assert same + r["near_ties"] >= r["queries"] - 1, r["first_differences"]
        assert r["overlap_at_k"] >= 0.98
    assert "pipeline_fusion" not in local

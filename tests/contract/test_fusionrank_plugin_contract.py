"""The plugin path's pipeline bodies and ``fusionrank opensearch setup-pipeline --processor fusionrank`` (default),
without a node: bodies, the plugin check, the dry run. The live node runs them in ``test_fusionrank_plugin_live.py``.

The official API spec knows OpenSearch's own processors only, so a body with ``fusionrank_rerank`` cannot validate
against it as a whole; its first-stage part (the same ``normalization-processor`` as the ML Commons path) does.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from indexing.errors import ConfigError
from rerank.retrieval import opensearch_pipeline as P

SERVICE = "http://api:8000"
KEY = "simulated-service-key-7c21"


def test_the_processor_body_carries_url_key_and_budget():
    assert P.fusionrank_processor(SERVICE + "/", KEY) == {"fusionrank_rerank": {
        "tag": "fusionrank", "description": "rerank the hits with the fusionrank service (shopper, photos, first-stage scores)",
        "service_url": SERVICE, "budget_ms": 50, "api_key": KEY}}
    assert "api_key" not in P.fusionrank_processor(SERVICE, None, budget_ms=200)["fusionrank_rerank"]


@pytest.mark.parametrize("kwargs, expect", [
    ({"service_url": "api:8000"}, "service URL must be http"),
    ({"service_url": SERVICE + "/rerank/v1/rerank"}, "without /v1/rerank"),
    ({"budget_ms": 0}, "budget_ms must be an integer from 1 to 60000"),
    ({"budget_ms": True}, "budget_ms must be an integer"),
    ({"budget_ms": 50.0}, "budget_ms must be an integer"),
])
def test_bad_processor_settings_are_refused(kwargs, expect):
    args = {"service_url": SERVICE, "api_key": KEY, **kwargs}
    with pytest.raises(ConfigError, match=expect):
        P.fusionrank_processor(args.pop("service_url"), args.pop("api_key"), **args)


@pytest.mark.parametrize("first_stage", ["min-max", "none"])
def test_the_first_stage_part_validates_against_the_spec(spec, first_stage):
    body = P.fusionrank_pipeline_body(SERVICE, KEY, first_stage=first_stage, weights={"bm25": 0.3, "knn_text": 0.7} if first_stage == "min-max" else None)
    assert [list(p) for p in body["response_processors"]] == [["fusionrank_rerank"]]
    assert ("phase_results_processors" in body) == (first_stage == "min-max")
    spec.validate_request("search_pipeline.put", {k: v for k, v in body.items() if k != "response_processors"})


def test_nodes_without_the_plugin():
    info = {"nodes": {"a": {"name": "n1", "plugins": [{"name": "fusionrank"}, {"name": "opensearch-knn"}]},
                      "b": {"name": "n2", "plugins": [{"name": "opensearch-knn"}]}}}
    assert P.nodes_without_plugin(info) == ["n2"]
    with pytest.raises(Exception, match="lists no nodes"):
        P.nodes_without_plugin({"nodes": {}})


class _Transport:
    """The opensearch-py transport boundary: records requests, answers GET /_nodes/plugins from ``plugins``."""

    def __init__(self, plugins):
        self.plugins, self.requests = plugins, []

    def perform_request(self, method, path, params=None, body=None):
        self.requests.append((method, path, body))
        if path == "/_nodes/plugins":
            return {"nodes": {"x": {"name": "node-1", "plugins": [{"name": p} for p in self.plugins]}}}
        return {"acknowledged": True}


class _Client:
    def __init__(self, plugins):
        self.transport = _Transport(plugins)


def test_setup_checks_the_plugin_then_puts_the_pipeline():
    client = _Client(["fusionrank"])
    cfg = P.PluginPipelineConfig(service_url=SERVICE, api_key=KEY, pipeline_name="shop", first_stage="none", budget_ms=80)
    out = P.setup_plugin_pipeline(client, cfg)
    assert out.pipeline == "shop" and out.search_path == "/<index>/_search?search_pipeline=shop"
    (m1, p1, _), (m2, p2, body) = client.transport.requests
    assert (m1, p1, m2, p2) == ("GET", "/_nodes/plugins", "PUT", "/_search/pipeline/shop")
    assert body == P.fusionrank_pipeline_body(SERVICE, KEY, first_stage="none", budget_ms=80)


def test_setup_without_the_plugin_says_how_to_install_it_and_puts_nothing():
    client = _Client(["opensearch-knn"])
    with pytest.raises(ConfigError, match=r"not installed on 1 node\(s\) \(node-1\).*opensearch-plugin install.*--processor ml-rerank"):
        P.setup_plugin_pipeline(client, P.PluginPipelineConfig(service_url=SERVICE, api_key=KEY))
    assert [r[0] for r in client.transport.requests] == ["GET"]


@pytest.fixture
def cli(monkeypatch):
    from workers import cli as cli_mod

    monkeypatch.setenv("FUSIONRANK_API_KEY", KEY)
    return lambda *args: CliRunner().invoke(cli_mod.app, ["opensearch", "setup-pipeline", *args], catch_exceptions=True)


def test_cli_dry_run_prints_the_plugin_pipeline_with_the_key_redacted(cli):
    res = cli("--service-url", SERVICE, "--dry-run", "--budget-ms", "120")
    assert res.exit_code == 0, res.output
    steps = json.loads(res.output)
    assert [(s["method"], s["path"]) for s in steps] == [("GET", "/_nodes/plugins"), ("PUT", "/_search/pipeline/fusionrank-rerank")]
    proc = steps[1]["body"]["response_processors"][0]["fusionrank_rerank"]
    assert proc["service_url"] == SERVICE and proc["budget_ms"] == 120 and proc["api_key"] == P.REDACTED
    assert KEY not in res.output
    assert "normalization-processor" in steps[1]["body"]["phase_results_processors"][0]


def test_cli_refuses_options_of_the_other_path_and_unknown_processors(cli):
    res = cli("--service-url", SERVICE, "--document-field", "title", "--dry-run")
    assert isinstance(res.exception, ConfigError) and "--document-field apply to --processor ml-rerank only" in str(res.exception)
    res = cli("--service-url", SERVICE, "--processor", "cohere", "--dry-run")
    assert isinstance(res.exception, ConfigError) and "unknown --processor 'cohere'; valid: fusionrank, ml-rerank" in str(res.exception)

"""The search-pipeline integration (``rerank.retrieval.opensearch_pipeline``, ``fusionrank opensearch setup-pipeline``):
every body it sends validates against the official OpenSearch API spec; the requests go out in order through a
real opensearch-py client to the recording fake node; failures name the step; broken bodies are rejected."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from indexing import fields as F
from indexing.engines.opensearch import OpenSearchEngine
from indexing.errors import ConfigError, EngineError
from indexing.opensearch_spec import OpenSearchSpec, SpecViolationError
from rerank.retrieval import opensearch_pipeline as P
from tests.contract.ml_fake import DEFAULT_TRUSTED, TRUSTED, FakeMLOpenSearchServer

pytestmark = pytest.mark.contract

SERVICE = "http://api:8000"
KEY = "simulated-service-key-3f9a"


@pytest.fixture
def ml_server(spec: OpenSearchSpec) -> FakeMLOpenSearchServer:
    return FakeMLOpenSearchServer(spec)


def _config(**kw) -> P.PipelineConfig:
    return P.PipelineConfig(**{"service_url": SERVICE, "api_key": KEY, **kw})


# --------------------------------------------------------------------------- bodies vs the spec
@pytest.mark.parametrize(("first_stage", "has_image"), [("min-max", False), ("min-max", True), ("rrf", False), ("none", False)])
def test_every_body_of_the_plan_validates_against_the_spec(spec, first_stage, has_image):
    # the spec documents RRF's rank constant where OpenSearch 3.1+ reads it (2.19's form: test_hybrid_live.py)
    weights = {"bm25": 0.2, "knn_text": 0.5, "knn_image": 0.3} if has_image else None
    steps = P.planned_steps(_config(first_stage=first_stage, has_image=has_image, model_group="fusionrank", weights=weights,
                                    opensearch_version="3.1.0"),
                            connector_id="c1", model_group_id="g1", model_id="m1", trusted=DEFAULT_TRUSTED)
    assert [s.operation for s in steps] == ["cluster.put_settings", "ml.create_connector", "ml.register_model_group",
                                            "ml.register_model", "ml.deploy_model", "search_pipeline.put"]
    for s in steps:
        assert spec.operation_for(s.method, s.path) == s.operation, s
        if s.body is not None:
            spec.validate_request(s.operation, s.body)
    pipeline = steps[-1].body
    (rerank,) = pipeline["response_processors"]
    assert rerank["rerank"]["ml_opensearch"] == {"model_id": "m1"}
    assert rerank["rerank"]["context"]["document_fields"] == [F.TITLE, F.DESCRIPTION]
    phase = pipeline.get("phase_results_processors")
    if first_stage == "none":
        assert phase is None
    else:
        (proc,) = phase
        assert ("normalization-processor" if first_stage == "min-max" else "score-ranker-processor") in proc
    if first_stage == "min-max":  # explicit weights follow the hybrid sub-queries (bm25, knn_text, knn_image)
        combination = phase[0]["normalization-processor"]["combination"]
        if has_image:
            assert combination["parameters"]["weights"] == [0.2, 0.5, 0.3]
        else:  # none: equal weights over 2 or 3 sub-queries alike
            assert "parameters" not in combination


def _fill(body: dict, query: str, docs: list[str]) -> str:
    """The connector's request body as ML Commons sends it: its cohere.rerank pre-process fills query (a string),
    documents (a JSON array of strings) and top_n (the number of hits) into the template."""
    (action,) = body["actions"]
    return (action["request_body"].replace("${parameters.query}", json.dumps(query)[1:-1])
            .replace("${parameters.documents}", json.dumps(docs)).replace("${parameters.top_n}", str(len(docs)))
            .replace("${parameters.model}", body["parameters"]["model"]))


QUERY, DOCS = 'men\'s "black" running shoe', ["Men Black Running Shoelight mesh upper", "Red Dress"]


def test_the_connector_speaks_the_cohere_rerank_format_to_the_service(spec):
    body = P.connector_body(SERVICE + "/", KEY)
    (action,) = body["actions"]
    assert action["url"] == "http://api:8000/v1/rerank" and action["method"] == "POST"
    assert action["headers"]["Authorization"] == "Bearer ${credential.api_key}" and body["credential"] == {"api_key": KEY}
    assert (action["pre_process_function"], action["post_process_function"]) == (P.PRE_PROCESS, P.POST_PROCESS)
    assert json.loads(_fill(body, QUERY, DOCS)) == {"model": "fusionrank", "query": QUERY, "documents": DOCS, "top_n": 2}
    assert not re.search(r"\$\{parameters\.(?!query|documents|top_n|model)", action["request_body"])


def test_the_service_accepts_what_the_connector_sends_and_answers_what_the_post_process_reads():
    from workers.service import schemas

    req = schemas.CohereRerankRequest.model_validate_json(_fill(P.connector_body(SERVICE, KEY), QUERY, DOCS))
    assert (req.query, req.documents, req.top_n, req.user_id, req.product_ids) == (QUERY, DOCS, 2, None, None)
    # connector.post_process.cohere.rerank reads $.results[*].index and .relevance_score
    assert "results" in schemas.CohereRerankResponse.model_fields
    assert {"index", "relevance_score"} <= set(schemas.CohereResult.model_fields)


def test_the_search_body_carries_the_query_context_and_the_document_fields(spec):
    rng = np.random.default_rng(0)
    body = P.rerank_search_body("black running shoe", text_vector=rng.standard_normal(8), image_vector=rng.standard_normal(4), size=50)
    spec.validate_request("search", body)
    assert body["ext"] == {"rerank": {"query_context": {"query_text": "black running shoe"}}}
    assert body["_source"] == [F.ID, F.TITLE, F.DESCRIPTION]  # the rerank processor reads these from the hits
    assert body["size"] == 50 and len(body["query"]["hybrid"]["queries"]) == 3


def test_the_trusted_endpoint_regex_admits_the_service_only():
    rx = P.trusted_endpoint_regex("https://rerank.internal:8443/fr/")
    assert rx == "^https://rerank\\.internal:8443/fr/.*$"
    assert re.fullmatch(rx, "https://rerank.internal:8443/fr/v1/rerank")
    for other in ("https://rerankxinternal:8443/fr/v1/rerank", "https://rerank.internal:8443/frx/v1/rerank",
                  "http://rerank.internal:8443/fr/v1/rerank", "https://evil.example/https://rerank.internal:8443/fr/v1/rerank"):
        assert not re.fullmatch(rx, other), other
    body = P.cluster_settings_body("https://rerank.internal:8443/fr", trusted=[*DEFAULT_TRUSTED, rx])
    assert body["persistent"][TRUSTED] == [*DEFAULT_TRUSTED, rx]  # kept, ours once


# --------------------------------------------------------------------------- sending, through a real client
def test_setup_sends_the_requests_in_order_and_each_validates(ml_server, spec):
    result = P.setup_search_pipeline(ml_server.client(), _config(model_group="fusionrank"))
    seq = [(r.method, r.path.split("?")[0]) for r in ml_server.requests]
    assert seq == [
        ("GET", "/_cluster/settings"),
        ("PUT", "/_cluster/settings"),
        ("POST", "/_plugins/_ml/connectors/_create"),
        ("POST", "/_plugins/_ml/model_groups/_register"),
        ("POST", "/_plugins/_ml/models/_register"),
        ("POST", f"/_plugins/_ml/models/{result.model_id}/_deploy"),
        ("PUT", "/_search/pipeline/fusionrank-rerank"),
    ]
    checked = [spec.validate_captured(r.method, r.path, r.body) for r in ml_server.requests]
    assert checked[1:] == ["cluster.put_settings", "ml.create_connector", "ml.register_model_group", "ml.register_model",
                           "ml.deploy_model", "search_pipeline.put"]
    # each id the cluster returned went into the next request
    (cid,) = ml_server.connectors
    (gid,) = ml_server.model_groups
    register = ml_server.of("ml.register_model")[0].json()
    assert (result.connector_id, result.model_group_id) == (cid, gid)
    assert (register["connector_id"], register["model_group_id"], register["function_name"]) == (cid, gid, "remote")
    assert ml_server.models[result.model_id]["model_state"] == "DEPLOYED" and result.deploy_state == "COMPLETED"
    rerank = ml_server.pipelines["fusionrank-rerank"]["response_processors"][0]["rerank"]
    assert rerank["ml_opensearch"]["model_id"] == result.model_id and rerank["ignore_failure"] is True
    # the cluster's trusted endpoints were kept and ours added; the key travels in the connector body only
    assert ml_server.persistent[TRUSTED] == [*DEFAULT_TRUSTED, "^http://api:8000/.*$"]
    assert ml_server.persistent["plugins.ml_commons.connector.private_ip_enabled"] is True
    assert [r.operation for r in ml_server.requests if r.body and KEY.encode() in r.body] == ["ml.create_connector"]


def test_a_rerun_reuses_a_model_and_keeps_the_trusted_list_unchanged(ml_server):
    first = P.setup_search_pipeline(ml_server.client(), _config())
    ml_server.requests.clear()
    again = P.setup_search_pipeline(ml_server.client(), _config(model_id=first.model_id, pipeline_name="shop.v2", first_stage="rrf",
                                                                      opensearch_version="3.1.0"))
    assert [r.operation for r in ml_server.requests] == ["cluster.get_settings", "cluster.put_settings", "search_pipeline.put"]
    assert ml_server.persistent[TRUSTED].count("^http://api:8000/.*$") == 1 and again.connector_id is None
    assert ml_server.pipelines["shop.v2"]["response_processors"][0]["rerank"]["ml_opensearch"]["model_id"] == first.model_id


def test_older_clusters_answer_with_tasks_which_are_polled(ml_server):
    ml_server.register_returns_model_id = False
    ml_server.deploy_status = "CREATED"
    ml_server.deploy_task_states = ["RUNNING", "RUNNING", "COMPLETED"]
    naps: list[float] = []
    result = P.setup_search_pipeline(ml_server.client(), _config(), poll_s=0.25, sleep=naps.append)
    assert result.deploy_state == "COMPLETED" and result.model_id in ml_server.models
    assert [r.operation for r in ml_server.requests].count("ml.get_task") == 1 + 3 and naps == [0.25, 0.25]


def test_a_deploy_task_that_never_finishes_times_out_naming_the_step(ml_server):
    ml_server.deploy_status = "CREATED"
    ml_server.deploy_task_states = ["RUNNING"]
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(EngineError, match=r"step 'deploy model'.*still RUNNING after 5s"):
        P.setup_search_pipeline(ml_server.client(), _config(), task_timeout_s=5, poll_s=1, sleep=sleep, clock=lambda: now[0])
    assert "fusionrank-rerank" not in ml_server.pipelines  # nothing after the failed step


def test_an_untrusted_endpoint_fails_at_the_connector_step_without_leaking_the_key(ml_server):
    with pytest.raises(EngineError) as e:
        P.setup_search_pipeline(ml_server.client(), _config(cluster_settings=False), display_url="http://os:9200")
    msg = str(e.value)
    assert "step 'create connector'" in msg and "HTTP 400" in msg and "trusted connector endpoint regex" in msg
    assert "--no-cluster-settings" in msg and KEY not in msg
    assert not ml_server.models and not ml_server.pipelines


def test_a_cluster_error_names_the_step(ml_server):
    ml_server.fail_next("PUT", "search_pipeline.put", 400, {"error": {"root_cause": [], "type": "illegal_argument_exception",
                                                                       "reason": "Invalid processor type rerank"}, "status": 400})
    with pytest.raises(EngineError, match=r"step 'create search pipeline' \(PUT /_search/pipeline/fusionrank-rerank\).*Invalid processor type rerank.*neural-search"):
        P.setup_search_pipeline(ml_server.client(), _config())


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"service_url": "api:8000"}, "http(s)://host"),
        ({"service_url": "http://api:8000/v1/rerank"}, "without /v1/rerank"),
        ({"service_url": "http://u:p@api:8000"}, "credentials"),
        ({"api_key": ""}, "FUSIONRANK_API_KEY"),
        ({"pipeline_name": "my pipeline"}, "pipeline name"),
        ({"document_fields": ()}, "document_fields"),
        ({"first_stage": "linear"}, "valid: min-max, rrf, none"),
        ({"weights": {"bm25": 0.5, "knn_text": 0.6}}, "sum to 1"),
        ({"first_stage": "rrf", "weights": {"bm25": 0.5, "knn_text": 0.5}}, "min-max first stage only"),
    ],
)
def test_bad_configuration_is_refused_before_any_request(kwargs, expect):
    with pytest.raises(ConfigError, match=re.escape(expect)):
        _config(**kwargs)


# --------------------------------------------------------------------------- the CLI
@pytest.fixture
def cli(ml_server, monkeypatch):
    from workers import cli as cli_mod
    from workers.commands import opensearch as cmd

    monkeypatch.setenv("FUSIONRANK_API_KEY", KEY)
    monkeypatch.setattr(cmd, "build_opensearch_engine", lambda settings, url=None: OpenSearchEngine(client=ml_server.client()))

    def run(*args: str):
        return CliRunner().invoke(cli_mod.app, ["opensearch", "setup-pipeline", *args], catch_exceptions=True)

    return run


def test_cli_setup_pipeline_creates_everything_and_prints_the_ids(cli, ml_server, spec):
    res = cli("--processor", "ml-rerank", "--service-url", SERVICE, "--pipeline-name", "shop", "--document-field", F.TITLE, "--weights", '{"bm25": 0.3, "knn_text": 0.7}', "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["connector_id"] in ml_server.connectors and out["model_id"] in ml_server.models and out["pipeline"] == "shop"
    pipe = ml_server.pipelines["shop"]
    assert pipe["response_processors"][0]["rerank"]["context"]["document_fields"] == [F.TITLE]
    assert pipe["phase_results_processors"][0]["normalization-processor"]["combination"]["parameters"]["weights"] == [0.3, 0.7]
    for r in ml_server.requests:
        spec.validate_captured(r.method, r.path, r.body)


def test_cli_dry_run_prints_valid_bodies_redacts_the_key_and_sends_nothing(cli, ml_server, spec, monkeypatch):
    res = cli("--processor", "ml-rerank", "--service-url", SERVICE, "--dry-run", "--no-fail-open")
    assert res.exit_code == 0, res.output
    steps = json.loads(res.output)
    assert [s["name"] for s in steps] == ["cluster settings", "create connector", "register model", "deploy model", "create search pipeline"]
    assert KEY not in res.output and steps[1]["body"]["credential"] == {"api_key": P.REDACTED}
    for s in steps:
        if s["body"] is not None:
            spec.validate_request(s["operation"], s["body"])
    assert steps[-1]["body"]["response_processors"][0]["rerank"]["ignore_failure"] is False
    assert ml_server.requests == []
    monkeypatch.delenv("FUSIONRANK_API_KEY")
    assert cli("--processor", "ml-rerank", "--service-url", SERVICE, "--dry-run").exit_code == 0  # the plan shows before a key exists


def test_cli_without_an_api_key_is_a_clear_error(cli, ml_server, monkeypatch):
    from indexing.errors import ConfigError as CE

    monkeypatch.delenv("FUSIONRANK_API_KEY")
    res = cli("--processor", "ml-rerank", "--service-url", SERVICE)
    assert isinstance(res.exception, CE) and "FUSIONRANK_API_KEY" in str(res.exception) and ml_server.requests == []
    res = cli("--processor", "ml-rerank", "--service-url", SERVICE, "--api-key-env", "FR_TEST_UNSET_KEY_VAR")
    assert isinstance(res.exception, CE) and "FR_TEST_UNSET_KEY_VAR" in str(res.exception)


# --------------------------------------------------------------------------- the check rejects broken bodies
def _plan_bodies() -> dict[str, dict]:
    steps = P.planned_steps(_config(model_group="g"), connector_id="c1", model_group_id="g1", model_id="m1")
    return {s.operation: copy.deepcopy(s.body) for s in steps if s.body is not None}


@pytest.mark.parametrize(
    ("operation", "breakage", "expect"),
    [
        ("ml.create_connector", lambda b: b["actions"][0].update(pre_process_functions=b["actions"][0].pop("pre_process_function")),
         "unknown parameter(s) 'pre_process_functions'"),
        ("ml.create_connector", lambda b: b.pop("credential"), "'credential' is a required property"),
        ("ml.create_connector", lambda b: b.update(protocol="https"), "is not one of"),
        ("ml.register_model", lambda b: b.update(connector=b.pop("connector_id")), "unknown parameter(s) 'connector'"),
        ("ml.register_model_group", lambda b: b.pop("name"), "'name' is a required property"),
        ("search_pipeline.put", lambda b: b["response_processors"][0]["rerank"]["context"].update(document_fields="title"),
         "is not of type 'array'"),
        ("search_pipeline.put", lambda b: b["response_processors"][0]["rerank"]["ml_opensearch"].update(modelid="m1"),
         "unknown parameter(s) 'modelid'"),
        ("cluster.put_settings", lambda b: b.update(persistant=b.pop("persistent")), "unknown parameter(s) 'persistant'"),
    ],
)
def test_broken_bodies_fail_validation(spec, operation, breakage, expect):
    body = _plan_bodies()[operation]
    spec.validate_request(operation, body)
    breakage(body)
    with pytest.raises(SpecViolationError) as e:
        spec.validate_request(operation, body)
    assert expect in str(e.value)

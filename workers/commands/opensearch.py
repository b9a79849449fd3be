"""``fusionrank opensearch setup-pipeline``: let OpenSearch call the fusionrank service from a search pipeline;
``fusionrank opensearch dev-node``: a real OpenSearch node on this machine (:mod:`workers.devnode`).

Creates (in order) the ML Commons cluster settings, an HTTP connector to ``{service_url}/v1/rerank``, a remote
model (registered and deployed) and a search pipeline whose ``rerank`` processor uses it; the bodies come from
:mod:`rerank.retrieval.opensearch_pipeline`. The cluster is ``FUSIONRANK_OPENSEARCH_URL`` (with
``FUSIONRANK_OPENSEARCH_USER`` / ``..._PASSWORD`` / ``..._CA_CERTS``) or ``--opensearch-url``; the connector's
credential is the service's API key (``FUSIONRANK_API_KEY``, or the variable named by ``--api-key-env``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, List, Optional

import typer

FIRST_STAGE_HELP = "first stage of the pipeline: min-max (normalization-processor), rrf (score-ranker-processor, >= 2.19) or none"


def build_opensearch_engine(settings: Any, url: str | None = None) -> Any:
    """The ``OpenSearchEngine`` the command talks through (whatever ``FUSIONRANK_ENGINE`` says)."""
    from indexing.engines.opensearch import OpenSearchEngine

    kwargs = settings.opensearch_kwargs()
    if url:
        kwargs["url"] = url
    return OpenSearchEngine(**kwargs)


def _api_key(settings: Any, env_name: str | None) -> str | None:
    from indexing.errors import ConfigError

    if env_name:
        value = os.environ.get(env_name)
        if not value:
            raise ConfigError(f"--api-key-env {env_name}: that environment variable is not set or empty")
        return value
    return settings.api_key.get_secret_value() if settings.api_key else None


def _weights(raw: Optional[str]) -> dict[str, float] | None:
    from indexing.errors import ConfigError

    if raw is None:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--weights must be a JSON object such as '{{\"bm25\": 0.3, \"knn_text\": 0.7}}': {e}") from None
    if not isinstance(parsed, dict):
        raise ConfigError("--weights must be a JSON object of list name -> weight")
    return parsed


PROCESSORS = ("fusionrank", "ml-rerank")
PROCESSOR_HELP = ("fusionrank: the fusionrank plugin's processor (query, user id, hit ids and scores to POST /rerank; the full model); "
                  "ml-rerank: ML Commons + neural-search's rerank processor (query and hit texts only)")


def _setup_plugin_pipeline(service_url: str, pipeline_name: str, api_key_env: Optional[str], first_stage: str, weights: Optional[str],
                           image: bool, budget_ms: int, opensearch_url: Optional[str], dry_run: bool, as_json: bool,
                           ignored: dict[str, Any]) -> None:
    from indexing.errors import ConfigError
    from rerank.retrieval.opensearch_pipeline import PluginPipelineConfig, plugin_planned_steps, redacted_steps, setup_plugin_pipeline
    from workers.settings import load_settings

    given = [name for name, value in ignored.items() if value]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to --processor ml-rerank only")
    settings = load_settings()
    key = _api_key(settings, api_key_env) or ""
    config = PluginPipelineConfig(service_url=service_url, api_key=key, pipeline_name=pipeline_name, first_stage=first_stage,
                                  weights=_weights(weights), has_image=image, budget_ms=budget_ms)
    if dry_run:
        typer.echo(json.dumps(redacted_steps(plugin_planned_steps(config), key), indent=2))
        return
    engine = build_opensearch_engine(settings, opensearch_url)
    try:
        result = setup_plugin_pipeline(engine.client, config, display_url=engine.display_url)
    finally:
        engine.close()
    if as_json:
        typer.echo(json.dumps({"pipeline": result.pipeline, "processor": "fusionrank_rerank", "search_path": result.search_path}))
        return
    typer.echo(f"search pipeline: {result.pipeline} (fusionrank_rerank, budget {budget_ms} ms)")
    typer.echo(f"search with:     POST {result.search_path}  (body: ext.fusionrank.user_id = the shopper)")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    os_app = typer.Typer(help="OpenSearch integration: a local dev node, search pipelines that call the fusionrank service.", no_args_is_help=True)
    app.add_typer(os_app, name="opensearch")

    @os_app.command("dev-node")
    def dev_node(
        port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="HTTP port on 127.0.0.1 (default: a free one)"),
        heap: str = typer.Option("1g", "--heap", help="JVM heap (-Xms/-Xmx), e.g. 1g or 512m"),
        stop: bool = typer.Option(False, "--stop", help="stop the node started for this data dir"),
    ) -> None:
        """Start a real OpenSearch 2.19.1 node (k-NN, neural-search, ML Commons) in the background; the URL is the last line.

        Built from Maven Central artifacts with Maven (workers/opensearch_node; needs `mvn` and Java 17+), data in
        <data dir>/opensearch-node. Point fusionrank at it with FUSIONRANK_ENGINE=opensearch,
        FUSIONRANK_OPENSEARCH_URL=<url> and FUSIONRANK_HNSW_ENGINE=lucene (its k-NN has no native faiss)."""
        from workers import devnode
        from workers.settings import load_settings

        data_dir = load_settings().data_dir
        if stop:
            state = devnode.stop_dev_node(data_dir)
            typer.echo(f"stopped the OpenSearch node at {state['url']} (pid {state['pid']})" if state else
                       f"no OpenSearch dev node was running for {data_dir}")
            return
        if not re.fullmatch(r"[1-9][0-9]*[kmg]", heap):
            from indexing.errors import ConfigError

            raise ConfigError(f"--heap {heap!r}: give a size such as 1g or 512m")
        already = devnode.running(data_dir)
        if already:
            typer.echo(f"an OpenSearch node is already running for {data_dir} (pid {already['pid']}, log {already['log']})")
            typer.echo(already["url"])
            return
        typer.echo(f"building (first time: Maven fetches ~400 MB) and starting OpenSearch {devnode.OPENSEARCH_VERSION} under {data_dir / 'opensearch-node'} ...")
        state = devnode.start_dev_node(data_dir, port=port, heap=heap)
        typer.echo(f"OpenSearch {devnode.OPENSEARCH_VERSION} is up (pid {state['pid']}, log {state['log']}); stop it with: fusionrank opensearch dev-node --stop")
        typer.echo(f"use it: export FUSIONRANK_ENGINE=opensearch FUSIONRANK_OPENSEARCH_URL={state['url']} FUSIONRANK_HNSW_ENGINE=lucene")
        typer.echo(state["url"])

    @os_app.command("setup-pipeline")
    def setup_pipeline(
        service_url: str = typer.Option(..., "--service-url", help="base URL of the fusionrank service as OpenSearch reaches it, e.g. http://api:8000"),
        processor: str = typer.Option("fusionrank", "--processor", help=PROCESSOR_HELP),
        budget_ms: int = typer.Option(50, "--budget-ms", min=1, max=60_000, help="fusionrank processor: time budget of the service call (then the first-stage order)"),
        pipeline_name: str = typer.Option("fusionrank-rerank", "--pipeline-name", help="search pipeline id"),
        api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="environment variable holding the service's API key (default: FUSIONRANK_API_KEY)"),
        document_field: Optional[List[str]] = typer.Option(None, "--document-field", help="_source field sent as document text (repeat; default: title, description)"),
        first_stage: str = typer.Option("min-max", "--first-stage", help=FIRST_STAGE_HELP),
        weights: Optional[str] = typer.Option(None, "--weights", help='min-max list weights as JSON, e.g. \'{"bm25": 0.3, "knn_text": 0.7}\''),
        image: bool = typer.Option(False, "--image/--no-image", help="the hybrid query has a third sub-query (kNN on image_vec)"),
        model_group: Optional[str] = typer.Option(None, "--model-group", help="register a model group of this name first"),
        model_id: Optional[str] = typer.Option(None, "--model-id", help="reuse this deployed model: no connector or model is created"),
        fail_open: bool = typer.Option(True, "--fail-open/--no-fail-open", help="ignore_failure on the rerank processor: first-stage order when the service fails"),
        cluster_settings: bool = typer.Option(True, "--cluster-settings/--no-cluster-settings", help="update the ML Commons cluster settings (trusted endpoint...)"),
        private_ip: bool = typer.Option(True, "--private-ip/--no-private-ip", help="allow the connector to reach a private address (plugins.ml_commons.connector.private_ip_enabled)"),
        ml_nodes_only: bool = typer.Option(False, "--ml-nodes-only", help="leave plugins.ml_commons.only_run_on_ml_node alone (clusters with ML nodes)"),
        opensearch_url: Optional[str] = typer.Option(None, "--opensearch-url", help="cluster URL (default: FUSIONRANK_OPENSEARCH_URL)"),
        task_timeout: float = typer.Option(60.0, "--task-timeout", min=1.0, help="seconds to wait for ML Commons register/deploy tasks"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the requests (JSON, API key redacted) and send nothing"),
        as_json: bool = typer.Option(False, "--json", help="print the created ids as one JSON object"),
    ) -> None:
        """Create the search pipeline that reranks OpenSearch hits with the fusionrank service.

        --processor fusionrank (default): fusionrank's plugin processor (the full model: shopper, photos, first-stage
        scores; the plugin must be installed on every node). --processor ml-rerank: ML Commons connector + model +
        neural-search `rerank` processor (no plugin to install; texts only)."""
        if processor not in PROCESSORS:
            from indexing.errors import ConfigError

            raise ConfigError(f"unknown --processor {processor!r}; valid: {', '.join(PROCESSORS)}")
        if processor == "fusionrank":
            _setup_plugin_pipeline(service_url, pipeline_name, api_key_env, first_stage, weights, image, budget_ms, opensearch_url, dry_run, as_json,
                                   ignored={"--document-field": document_field, "--model-group": model_group, "--model-id": model_id})
            return
        from rerank.retrieval.opensearch_pipeline import DEFAULT_DOCUMENT_FIELDS, REDACTED, PipelineConfig, planned_steps, redacted_steps, setup_search_pipeline
        from workers.settings import load_settings

        settings = load_settings()
        key = _api_key(settings, api_key_env)
        if dry_run and not key:
            key = REDACTED  # the plan can be shown before a key exists
        config = PipelineConfig(
            service_url=service_url, api_key=key or "", pipeline_name=pipeline_name,
            document_fields=tuple(document_field) if document_field else DEFAULT_DOCUMENT_FIELDS,
            first_stage=first_stage, weights=_weights(weights), has_image=image, fail_open=fail_open,
            model_group=model_group, model_id=model_id, cluster_settings=cluster_settings,
            allow_private_ip=private_ip, run_on_data_nodes=not ml_nodes_only,
        )
        if dry_run:
            typer.echo(json.dumps(redacted_steps(planned_steps(config), key), indent=2))
            return
        engine = build_opensearch_engine(settings, opensearch_url)
        try:
            result = setup_search_pipeline(engine.client, config, display_url=engine.display_url, task_timeout_s=task_timeout)
        finally:
            engine.close()
        if as_json:
            typer.echo(json.dumps(result.to_dict()))
            return
        if result.connector_id:
            typer.echo(f"connector:       {result.connector_id}")
        if result.model_group_id:
            typer.echo(f"model group:     {result.model_group_id}")
        typer.echo(f"model:           {result.model_id}" + (f" ({result.deploy_state})" if result.deploy_state else ""))
        typer.echo(f"search pipeline: {result.pipeline}")
        typer.echo(f"search with:     POST {result.search_path}  (body: ext.rerank.query_context.query_text = the query)")

"""OpenSearch calls fusionrank from inside a search pipeline: ML Commons connector, model and ``rerank`` processor.

The bodies (pure functions, contract-tested against the OpenSearch API spec) and the one call that sends
them in order, :func:`setup_search_pipeline`:

1. ``PUT /_cluster/settings`` (:func:`cluster_settings_body`): trust the service's URL
   (``plugins.ml_commons.trusted_connector_endpoints_regex``, merged with the patterns the cluster already
   trusts), allow a private address (``plugins.ml_commons.connector.private_ip_enabled``, OpenSearch >= 2.15:
   the service usually sits on the same private network) and, for a cluster without dedicated ML nodes,
   ``plugins.ml_commons.only_run_on_ml_node: false``.
2. ``POST /_plugins/_ml/connectors/_create`` (:func:`connector_body`): an HTTP connector to the service's
   Cohere-format endpoint ``POST {service_url}/v1/rerank`` with ML Commons' built-in
   ``connector.pre_process.cohere.rerank`` / ``connector.post_process.cohere.rerank`` functions; the API key is
   the connector's credential, sent as ``Authorization: Bearer ${credential.api_key}``.
3. ``POST /_plugins/_ml/model_groups/_register`` (optional, :func:`model_group_body`), then
   ``POST /_plugins/_ml/models/_register`` (:func:`register_model_body`: ``function_name: remote``) and
   ``POST /_plugins/_ml/models/<id>/_deploy``.
4. ``PUT /_search/pipeline/<name>`` (:func:`rerank_pipeline_body`): the hybrid first stage's
   ``normalization-processor`` (or RRF's ``score-ranker-processor``, from :mod:`rerank.retrieval.opensearch_bodies`) and a
   ``rerank`` response processor of type ``ml_opensearch`` whose ``context.document_fields`` name the
   ``_source`` fields sent as each document's text.

What crosses the wire, from OpenSearch's own code (neural-search ``MLOpenSearchRerankProcessor`` and
``DocumentContextSourceFetcher``, ml-commons ``CohereRerankPreProcessFunction``): the query text given in the
search request's ``ext.rerank.query_context`` and, per hit, the values of ``document_fields`` concatenated with
no separator. ``top_n`` is the number of hits. Nothing else: no user id, no product ids, no image, no first-stage
scores. The service therefore reranks these as plain texts (text relevance only); personalization, images and
the first-stage signals need the drop-in call (``Reranker.rerank``) or ``POST /rerank`` / ``POST /search``.

Hits must carry the ``document_fields`` in ``_source``: :func:`rerank_search_body` asks for them.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence
from urllib.parse import quote, urlsplit

import numpy as np

from indexing import fields as F
from indexing.errors import ConfigError, EngineError, EngineUnavailableError
from rerank.retrieval.opensearch_bodies import DEFAULT_OPENSEARCH_VERSION, hybrid_search_body, normalization_pipeline_body, rrf_pipeline_body

log = logging.getLogger(__name__)

PRE_PROCESS = "connector.pre_process.cohere.rerank"
POST_PROCESS = "connector.post_process.cohere.rerank"
RERANK_PATH = "/v1/rerank"
#: the request body template of the connector's ``predict`` action (the Cohere rerank wire format); the
#: pre-process function fills ``query``, ``documents`` (a JSON array of strings) and ``top_n`` (= number of hits)
REQUEST_BODY_TEMPLATE = (
    '{ "model": "${parameters.model}", "query": "${parameters.query}", '
    '"documents": ${parameters.documents}, "top_n": ${parameters.top_n} }'
)
TRUSTED_ENDPOINTS = "plugins.ml_commons.trusted_connector_endpoints_regex"
PRIVATE_IP = "plugins.ml_commons.connector.private_ip_enabled"
ONLY_ML_NODE = "plugins.ml_commons.only_run_on_ml_node"
DEFAULT_DOCUMENT_FIELDS: tuple[str, ...] = (F.TITLE, F.DESCRIPTION)
DEFAULT_PIPELINE = "fusionrank-rerank"
DEFAULT_MODEL_NAME = "fusionrank-reranker"
REDACTED = "**********"
FirstStage = Literal["min-max", "rrf", "none"]
FIRST_STAGES: tuple[str, ...] = ("min-max", "rrf", "none")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
_JAVA_REGEX_SPECIALS = set("\\.[]{}()*+?^$|")


# --------------------------------------------------------------------------- checks
def service_base_url(service_url: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing slash; ConfigError for anything else."""
    raw = (service_url or "").strip()
    try:
        parts = urlsplit(raw)
    except ValueError as e:
        raise ConfigError(f"service URL {service_url!r} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"service URL must be http(s)://host[:port][/prefix], got {service_url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("service URL must not carry credentials, a query or a fragment: the API key goes in the connector's credential")
    if parts.path.rstrip("/").endswith(RERANK_PATH):
        raise ConfigError(f"give the service's base URL (without {RERANK_PATH}), got {service_url!r}")
    return raw.rstrip("/")


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{what} {value!r} must be 1-255 letters, digits, '_', '.', '-' (starting with a letter or digit)")
    return value


def _check_fields(document_fields: Sequence[str]) -> list[str]:
    names = [document_fields] if isinstance(document_fields, str) else list(document_fields)
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise ConfigError(f"document_fields must be a non-empty list of field names, got {document_fields!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"document_fields repeats a field: {names}")
    return names


def java_regex_literal(text: str) -> str:
    """``text`` escaped for a Java regular expression (ML Commons matches connector URLs with ``String.matches``)."""
    return "".join("\\" + c if c in _JAVA_REGEX_SPECIALS else c for c in text)


def trusted_endpoint_regex(service_url: str) -> str:
    """The ``trusted_connector_endpoints_regex`` entry that admits exactly the service's endpoints."""
    return "^" + java_regex_literal(service_base_url(service_url)) + "/.*$"


# --------------------------------------------------------------------------- bodies
def cluster_settings_body(
    service_url: str,
    *,
    trusted: Sequence[str] = (),
    allow_private_ip: bool = True,
    run_on_data_nodes: bool = True,
) -> dict[str, Any]:
    """``PUT /_cluster/settings`` body. ``trusted``: the patterns the cluster trusts now (the setting is one list,
    so writing only ours would drop them); ours is appended once."""
    mine = trusted_endpoint_regex(service_url)
    patterns = [str(p) for p in trusted if str(p) != mine] + [mine]
    persistent: dict[str, Any] = {TRUSTED_ENDPOINTS: patterns}
    if allow_private_ip:
        persistent[PRIVATE_IP] = True
    if run_on_data_nodes:
        persistent[ONLY_ML_NODE] = False
    return {"persistent": persistent}


def connector_body(
    service_url: str,
    api_key: str,
    *,
    name: str = "fusionrank rerank",
    description: str | None = None,
    model: str = "fusionrank",
) -> dict[str, Any]:
    """``POST /_plugins/_ml/connectors/_create`` body: the service's ``/v1/rerank`` in the Cohere format."""
    base = service_base_url(service_url)
    if not isinstance(api_key, str) or not api_key.strip():
        raise ConfigError("the connector needs the service's API key (FUSIONRANK_API_KEY): the service refuses unauthenticated calls")
    return {
        "name": name,
        "description": description or f"fusionrank multimodal reranker, Cohere rerank format, at {base}",
        "version": 1,
        "protocol": "http",
        "parameters": {"model": model},
        "credential": {"api_key": api_key},
        "actions": [
            {
                "action_type": "predict",
                "method": "POST",
                "url": base + RERANK_PATH,
                "headers": {"Authorization": "Bearer ${credential.api_key}", "Content-Type": "application/json"},
                "request_body": REQUEST_BODY_TEMPLATE,
                "pre_process_function": PRE_PROCESS,
                "post_process_function": POST_PROCESS,
            }
        ],
    }


def model_group_body(name: str, *, description: str = "fusionrank rerank models") -> dict[str, Any]:
    """``POST /_plugins/_ml/model_groups/_register`` body (no access mode: that needs the security plugin)."""
    return {"name": _check_name(name, "model group name"), "description": description}


def register_model_body(
    connector_id: str,
    *,
    name: str = DEFAULT_MODEL_NAME,
    description: str = "fusionrank reranker behind an ML Commons HTTP connector",
    model_group_id: str | None = None,
) -> dict[str, Any]:
    """``POST /_plugins/_ml/models/_register`` body of an externally hosted (``remote``) model."""
    if not connector_id:
        raise ConfigError("registering the model needs the connector id")
    body: dict[str, Any] = {"name": name, "function_name": "remote", "description": description, "connector_id": connector_id}
    if model_group_id:
        body["model_group_id"] = model_group_id
    return body


def rerank_processor(
    model_id: str,
    *,
    document_fields: Sequence[str] = DEFAULT_DOCUMENT_FIELDS,
    fail_open: bool = True,
    tag: str = "fusionrank",
) -> dict[str, Any]:
    """One ``rerank`` response processor (``ml_opensearch``). ``fail_open``: ``ignore_failure`` so that the
    first-stage order comes back when the service is down or slow."""
    if not model_id:
        raise ConfigError("the rerank processor needs the model id")
    return {
        "rerank": {
            "tag": tag,
            "description": "rerank the hits with the fusionrank service",
            "ignore_failure": bool(fail_open),
            "ml_opensearch": {"model_id": model_id},
            "context": {"document_fields": _check_fields(document_fields)},
        }
    }


def rerank_pipeline_body(
    model_id: str,
    *,
    document_fields: Sequence[str] = DEFAULT_DOCUMENT_FIELDS,
    first_stage: FirstStage = "min-max",
    weights: Mapping[str, float] | None = None,
    has_image: bool = False,
    fail_open: bool = True,
    description: str | None = None,
    opensearch_version: str = DEFAULT_OPENSEARCH_VERSION,
) -> dict[str, Any]:
    """``PUT /_search/pipeline/<name>`` body: the hybrid first stage's phase-results processor (``min-max``:
    :func:`~rerank.retrieval.opensearch_bodies.normalization_pipeline_body`; ``rrf``:
    :func:`~rerank.retrieval.opensearch_bodies.rrf_pipeline_body`; ``none``: no hybrid query) + the ``rerank`` processor."""
    if first_stage not in FIRST_STAGES:
        raise ConfigError(f"unknown first stage {first_stage!r}; valid: {', '.join(FIRST_STAGES)}")
    body: dict[str, Any] = {"description": description or f"fusionrank: {first_stage} first stage, then the fusionrank reranker"}
    if first_stage == "min-max":
        body["phase_results_processors"] = normalization_pipeline_body(weights, has_image=has_image)["phase_results_processors"]
    elif first_stage == "rrf":
        if weights is not None:
            raise ConfigError("weights apply to the min-max first stage only (RRF is unweighted here)")
        body["phase_results_processors"] = rrf_pipeline_body(opensearch_version=opensearch_version)["phase_results_processors"]
    body["response_processors"] = [rerank_processor(model_id, document_fields=document_fields, fail_open=fail_open)]
    return body


# --------------------------------------------------------------------------- fusionrank's own processor (plugin)
#: the search response processor of fusionrank's OpenSearch plugin (``rerank/opensearch_plugin``)
PLUGIN_PROCESSOR = "fusionrank_rerank"
DEFAULT_BUDGET_MS = 50


def fusionrank_processor(service_url: str, api_key: str | None, *, budget_ms: int = DEFAULT_BUDGET_MS, tag: str = "fusionrank") -> dict[str, Any]:
    """One ``fusionrank_rerank`` response processor (the plugin's): it posts the query, ``ext.fusionrank.user_id``
    and every hit's id and score to ``{service_url}/rerank`` and fails open (first-stage order, the reason in
    ``ext.fusionrank.degraded``) past ``budget_ms`` or on any failure. ``api_key`` (None: a service without auth)
    is stored in the pipeline and sent as ``X-API-Key``."""
    url = service_base_url(service_url)
    if isinstance(budget_ms, bool) or not isinstance(budget_ms, int) or not 1 <= budget_ms <= 60_000:
        raise ConfigError(f"budget_ms must be an integer from 1 to 60000, got {budget_ms!r}")
    body: dict[str, Any] = {"tag": tag, "description": "rerank the hits with the fusionrank service (shopper, photos, first-stage scores)",
                            "service_url": url, "budget_ms": budget_ms}
    if api_key:
        body["api_key"] = api_key
    return {PLUGIN_PROCESSOR: body}


def fusionrank_pipeline_body(
    service_url: str,
    api_key: str | None,
    *,
    first_stage: FirstStage = "min-max",
    weights: Mapping[str, float] | None = None,
    has_image: bool = False,
    budget_ms: int = DEFAULT_BUDGET_MS,
    description: str | None = None,
    opensearch_version: str = DEFAULT_OPENSEARCH_VERSION,
) -> dict[str, Any]:
    """``PUT /_search/pipeline/<name>`` body for the plugin path: the hybrid first stage's phase-results processor
    (as :func:`rerank_pipeline_body`; ``none``: any query, no hybrid) + the ``fusionrank_rerank`` processor."""
    body = rerank_pipeline_body("unused", first_stage=first_stage, weights=weights, has_image=has_image,
                                description=description or f"fusionrank: {first_stage} first stage, then the fusionrank model (plugin)",
                                opensearch_version=opensearch_version)
    body["response_processors"] = [fusionrank_processor(service_url, api_key, budget_ms=budget_ms)]
    return body


def rerank_search_body(
    query: str,
    *,
    text_vector: Sequence[float] | np.ndarray,
    image_vector: Sequence[float] | np.ndarray | None = None,
    size: int = 100,
    per_list: int = 200,
    document_fields: Sequence[str] = DEFAULT_DOCUMENT_FIELDS,
    source: Sequence[str] = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """The ``_search`` body to send with ``?search_pipeline=<name>``: the hybrid query of
    :func:`~rerank.retrieval.opensearch_bodies.hybrid_search_body`, ``_source`` holding the id and the ``document_fields``
    (the rerank processor reads them from the hits), and ``ext.rerank.query_context.query_text``. ``size`` is
    how many hits the service reranks."""
    wanted = list(dict.fromkeys([F.ID, *_check_fields(document_fields), *source]))
    body = hybrid_search_body(query, text_vector=text_vector, image_vector=image_vector, size=size, per_list=per_list, source=wanted, **kwargs)
    body["ext"] = {"rerank": {"query_context": {"query_text": query}}}
    return body


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PipelineConfig:
    """What :func:`setup_search_pipeline` creates. ``model_id``: reuse a deployed model (no connector/model steps)."""

    service_url: str
    api_key: str = field(default="", repr=False)
    pipeline_name: str = DEFAULT_PIPELINE
    document_fields: tuple[str, ...] = DEFAULT_DOCUMENT_FIELDS
    first_stage: FirstStage = "min-max"
    weights: Mapping[str, float] | None = None
    has_image: bool = False
    fail_open: bool = True
    model_name: str = DEFAULT_MODEL_NAME
    model_group: str | None = None
    model_id: str | None = None
    cluster_settings: bool = True
    allow_private_ip: bool = True
    run_on_data_nodes: bool = True
    opensearch_version: str = DEFAULT_OPENSEARCH_VERSION  # where RRF's rank constant goes (2.19 vs 3.1+)

    def __post_init__(self) -> None:
        service_base_url(self.service_url)
        _check_name(self.pipeline_name, "pipeline name")
        object.__setattr__(self, "document_fields", tuple(_check_fields(self.document_fields)))
        if self.model_group is not None:
            _check_name(self.model_group, "model group name")
        if self.model_id is None and not (self.api_key or "").strip():
            raise ConfigError("no API key for the connector: set FUSIONRANK_API_KEY (or pass --api-key-env VAR)")
        rerank_pipeline_body("m", document_fields=self.document_fields, first_stage=self.first_stage,
                             weights=self.weights, has_image=self.has_image)  # fail early on bad weights


@dataclass(frozen=True)
class Step:
    """One request of the plan (``body`` None: no body)."""

    name: str
    method: str
    path: str
    operation: str
    body: dict[str, Any] | None = None


def pipeline_path(name: str) -> str:
    return "/_search/pipeline/" + quote(_check_name(name, "pipeline name"), safe="")


def planned_steps(config: PipelineConfig, *, connector_id: str = "<connector_id>", model_group_id: str = "<model_group_id>",
                  model_id: str = "<model_id>", trusted: Sequence[str] = ()) -> list[Step]:
    """Every request :func:`setup_search_pipeline` sends, in order, with placeholders for the ids the cluster
    returns (``--dry-run``). The API key is in the connector body: print with :func:`redacted_steps`."""
    steps: list[Step] = []
    if config.cluster_settings:
        steps.append(Step("cluster settings", "PUT", "/_cluster/settings", "cluster.put_settings",
                          cluster_settings_body(config.service_url, trusted=trusted, allow_private_ip=config.allow_private_ip,
                                                run_on_data_nodes=config.run_on_data_nodes)))
    if config.model_id is None:
        steps.append(Step("create connector", "POST", "/_plugins/_ml/connectors/_create", "ml.create_connector",
                          connector_body(config.service_url, config.api_key or REDACTED)))
        group_id = None
        if config.model_group:
            steps.append(Step("register model group", "POST", "/_plugins/_ml/model_groups/_register", "ml.register_model_group",
                              model_group_body(config.model_group)))
            group_id = model_group_id
        steps.append(Step("register model", "POST", "/_plugins/_ml/models/_register", "ml.register_model",
                          register_model_body(connector_id, name=config.model_name, model_group_id=group_id)))
        steps.append(Step("deploy model", "POST", f"/_plugins/_ml/models/{quote(model_id, safe='<>')}/_deploy", "ml.deploy_model"))
    else:
        model_id = config.model_id
    steps.append(Step("create search pipeline", "PUT", pipeline_path(config.pipeline_name), "search_pipeline.put",
                      rerank_pipeline_body(model_id, document_fields=config.document_fields, first_stage=config.first_stage,
                                           weights=config.weights, has_image=config.has_image, fail_open=config.fail_open,
                              opensearch_version=config.opensearch_version)))
    return steps


def redacted_steps(steps: Sequence[Step], secret: str | None) -> list[dict[str, Any]]:
    """The steps as JSON-friendly dicts, the API key replaced by ``**********``."""
    out = []
    for s in steps:
        body = s.body
        if body is not None and "credential" in body:
            body = {**body, "credential": {k: REDACTED for k in body["credential"]}}
        d = asdict(s)
        d["body"] = body
        out.append(d)
    if secret:
        import json

        text = json.dumps(out)
        if secret in text:  # the key must appear nowhere else (defensive: a key pasted into a name)
            out = json.loads(text.replace(secret, REDACTED))
    return out


# --------------------------------------------------------------------------- sending
@dataclass(frozen=True)
class PipelineSetup:
    """What the cluster created."""

    pipeline: str
    model_id: str
    connector_id: str | None
    model_group_id: str | None
    deploy_task_id: str | None
    deploy_state: str | None
    trusted_endpoints: tuple[str, ...]
    search_path: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trusted_endpoints"] = list(self.trusted_endpoints)
        return d


class _Sender:
    def __init__(self, client: Any, display_url: str, secrets: Sequence[str]):
        self.client = client
        self.display_url = display_url
        self.secrets = [s for s in secrets if s]

    def _scrub(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, REDACTED)
        return text

    def __call__(self, step: str, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None) -> Any:
        try:
            import opensearchpy
        except ImportError:  # pragma: no cover - a runtime dependency
            raise ConfigError("setting up the search pipeline needs opensearch-py: pip install 'opensearch-py>=2.6'") from None
        log.info("OpenSearch setup step %r: %s %s", step, method, path)
        try:
            return self.client.transport.perform_request(method, path, params=dict(params or {}), body=body)
        except opensearchpy.ConnectionTimeout:
            raise EngineUnavailableError(f"step {step!r} ({method} {path}): OpenSearch at {self.display_url} did not answer in time") from None
        except opensearchpy.ConnectionError as e:
            raise EngineUnavailableError(self._scrub(f"step {step!r} ({method} {path}): cannot reach OpenSearch at {self.display_url}: {e.error}")) from None
        except opensearchpy.TransportError as e:
            raise EngineError(self._scrub(f"step {step!r} ({method} {path}) failed: OpenSearch at {self.display_url} answered "
                                          f"HTTP {e.status_code} {_reason(e.info, e.error)}{_hint(step, e.status_code)}")) from None


def _reason(info: Any, error: Any) -> str:
    err = info.get("error") if isinstance(info, Mapping) else None
    if isinstance(err, Mapping):
        text = f"{err.get('type', 'error')}: {err.get('reason', '')}".rstrip(": ")
        cause = err.get("caused_by")
        if isinstance(cause, Mapping):
            text += f" (caused by: {cause.get('type', 'error')}: {cause.get('reason', '')})"
        return text
    if isinstance(err, str):
        return err
    return str(info if info else error)[:500]


def _hint(step: str, status: int) -> str:
    if status in (401, 403):
        return " (check the OpenSearch credentials: ML Commons and cluster settings need an admin role)"
    if step == "create connector":
        return " (was the service URL trusted? run without --no-cluster-settings, or add it to " + TRUSTED_ENDPOINTS + ")"
    if step == "create search pipeline" and status == 400:
        return " (the rerank and normalization processors need the neural-search plugin, >= 2.12; rrf needs >= 2.19)"
    return ""


def _current_trusted(send: _Sender) -> list[str]:
    resp = send("read cluster settings", "GET", "/_cluster/settings", params={"include_defaults": "true", "flat_settings": "true"})
    for section in ("transient", "persistent", "defaults"):
        value = (resp.get(section) or {}).get(TRUSTED_ENDPOINTS) if isinstance(resp, Mapping) else None
        if value is not None:
            return [value] if isinstance(value, str) else [str(v) for v in value]
    return []


def _wait_task(send: _Sender, step: str, task_id: str, *, timeout_s: float, poll_s: float, sleep: Callable[[float], None],
               clock: Callable[[], float]) -> dict[str, Any]:
    """Poll ``GET /_plugins/_ml/tasks/<id>`` until the task leaves CREATED/RUNNING (bounded by ``timeout_s``)."""
    deadline = clock() + timeout_s
    while True:
        task = send(step, "GET", f"/_plugins/_ml/tasks/{quote(task_id, safe='')}")
        state = str(task.get("state", ""))
        if state not in ("CREATED", "RUNNING"):
            if state != "COMPLETED":
                raise EngineError(f"step {step!r}: ML Commons task {task_id} ended {state or 'without a state'}: {task.get('error', 'no error given')}")
            return task
        if clock() >= deadline:
            raise EngineError(f"step {step!r}: ML Commons task {task_id} still {state} after {timeout_s:g}s; check GET /_plugins/_ml/tasks/{task_id}")
        sleep(poll_s)


def setup_search_pipeline(
    client: Any,
    config: PipelineConfig,
    *,
    display_url: str = "the cluster",
    task_timeout_s: float = 60.0,
    poll_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> PipelineSetup:
    """Send :func:`planned_steps` to the cluster behind ``client`` (an ``opensearchpy.OpenSearch``), in order,
    feeding each returned id into the next body. Failures raise EngineError naming the step."""
    send = _Sender(client, display_url, [config.api_key])
    trusted: list[str] = []
    if config.cluster_settings:
        trusted = _current_trusted(send)
        body = cluster_settings_body(config.service_url, trusted=trusted, allow_private_ip=config.allow_private_ip,
                                     run_on_data_nodes=config.run_on_data_nodes)
        send("cluster settings", "PUT", "/_cluster/settings", body)
        trusted = body["persistent"][TRUSTED_ENDPOINTS]
    connector_id = group_id = task_id = state = None
    model_id = config.model_id
    if model_id is None:
        resp = send("create connector", "POST", "/_plugins/_ml/connectors/_create", connector_body(config.service_url, config.api_key))
        connector_id = _id(resp, "connector_id", "create connector")
        if config.model_group:
            resp = send("register model group", "POST", "/_plugins/_ml/model_groups/_register", model_group_body(config.model_group))
            group_id = _id(resp, "model_group_id", "register model group")
        resp = send("register model", "POST", "/_plugins/_ml/models/_register",
                    register_model_body(connector_id, name=config.model_name, model_group_id=group_id))
        model_id = resp.get("model_id") if isinstance(resp, Mapping) else None
        if not model_id:  # older clusters answer with a task only
            task = _wait_task(send, "register model", _id(resp, "task_id", "register model"), timeout_s=task_timeout_s, poll_s=poll_s, sleep=sleep, clock=clock)
            model_id = _id(task, "model_id", "register model")
        resp = send("deploy model", "POST", f"/_plugins/_ml/models/{quote(model_id, safe='')}/_deploy")
        task_id, state = _id(resp, "task_id", "deploy model"), str(resp.get("status", ""))
        if state != "COMPLETED":
            state = str(_wait_task(send, "deploy model", task_id, timeout_s=task_timeout_s, poll_s=poll_s, sleep=sleep, clock=clock)["state"])
    path = pipeline_path(config.pipeline_name)
    send("create search pipeline", "PUT", path,
         rerank_pipeline_body(model_id, document_fields=config.document_fields, first_stage=config.first_stage,
                              weights=config.weights, has_image=config.has_image, fail_open=config.fail_open,
                              opensearch_version=config.opensearch_version))
    log.info("search pipeline %s reranks with model %s", config.pipeline_name, model_id)
    return PipelineSetup(config.pipeline_name, model_id, connector_id, group_id, task_id, state, tuple(trusted),
                         f"/<index>/_search?search_pipeline={config.pipeline_name}")


# --------------------------------------------------------------------------- the plugin path
PLUGIN_NAME = "fusionrank"


@dataclass(frozen=True)
class PluginPipelineConfig:
    """What :func:`setup_plugin_pipeline` creates: one search pipeline whose ``fusionrank_rerank`` processor
    (fusionrank's OpenSearch plugin) calls ``{service_url}/rerank``. ``api_key`` "" : a service without auth."""

    service_url: str
    api_key: str = field(default="", repr=False)
    pipeline_name: str = DEFAULT_PIPELINE
    first_stage: FirstStage = "min-max"
    weights: Mapping[str, float] | None = None
    has_image: bool = False
    budget_ms: int = DEFAULT_BUDGET_MS
    opensearch_version: str = DEFAULT_OPENSEARCH_VERSION

    def body(self) -> dict[str, Any]:
        return fusionrank_pipeline_body(self.service_url, self.api_key or None, first_stage=self.first_stage, weights=self.weights,
                                        has_image=self.has_image, budget_ms=self.budget_ms, opensearch_version=self.opensearch_version)

    def __post_init__(self) -> None:
        _check_name(self.pipeline_name, "pipeline name")
        self.body()  # fail early on a bad URL, budget, first stage or weights


def plugin_planned_steps(config: PluginPipelineConfig) -> list[Step]:
    """The requests of :func:`setup_plugin_pipeline` (``--dry-run``; print with :func:`redacted_steps`)."""
    return [Step("check the fusionrank plugin", "GET", "/_nodes/plugins", "nodes.info"),
            Step("create search pipeline", "PUT", pipeline_path(config.pipeline_name), "search_pipeline.put", config.body())]


def nodes_without_plugin(nodes_info: Mapping[str, Any], plugin: str = PLUGIN_NAME) -> list[str]:
    """Names of the nodes of a ``GET /_nodes/plugins`` answer that do not have ``plugin`` installed (pure)."""
    nodes = nodes_info.get("nodes") if isinstance(nodes_info, Mapping) else None
    if not isinstance(nodes, Mapping) or not nodes:
        raise EngineError(f"the cluster's GET /_nodes/plugins answer lists no nodes: {str(nodes_info)[:300]}")
    return [str(n.get("name", nid)) for nid, n in nodes.items() if plugin not in {p.get("name") for p in n.get("plugins", [])}]


def setup_plugin_pipeline(client: Any, config: PluginPipelineConfig, *, display_url: str = "the cluster") -> PipelineSetup:
    """Check that every node has fusionrank's plugin, then ``PUT`` the pipeline. EngineError names the step; a
    node without the plugin is a ConfigError saying how to install it."""
    send = _Sender(client, display_url, [config.api_key])
    missing = nodes_without_plugin(send("check the fusionrank plugin", "GET", "/_nodes/plugins"))
    if missing:
        raise ConfigError(f"fusionrank's OpenSearch plugin is not installed on {len(missing)} node(s) ({', '.join(missing[:5])}): build it with "
                          "`mvn -B package` in rerank/opensearch_plugin and install target/fusionrank-opensearch-*.zip on every node "
                          "(bin/opensearch-plugin install file:///path/to/the.zip, then restart), or use --processor ml-rerank")
    send("create search pipeline", "PUT", pipeline_path(config.pipeline_name), config.body())
    log.info("search pipeline %s reranks with the fusionrank plugin's processor", config.pipeline_name)
    return PipelineSetup(config.pipeline_name, "", None, None, None, None, (), f"/<index>/_search?search_pipeline={config.pipeline_name}")


def _id(resp: Any, key: str, step: str) -> str:
    value = resp.get(key) if isinstance(resp, Mapping) else None
    if not isinstance(value, str) or not value:
        raise EngineError(f"step {step!r}: the cluster's answer has no {key}: {str(resp)[:300]}")
    return value


__all__ = [
    "DEFAULT_DOCUMENT_FIELDS",
    "PLUGIN_PROCESSOR",
    "PluginPipelineConfig",
    "fusionrank_pipeline_body",
    "fusionrank_processor",
    "nodes_without_plugin",
    "plugin_planned_steps",
    "setup_plugin_pipeline",
    "FIRST_STAGES",
    "PipelineConfig",
    "PipelineSetup",
    "Step",
    "cluster_settings_body",
    "connector_body",
    "java_regex_literal",
    "model_group_body",
    "planned_steps",
    "redacted_steps",
    "register_model_body",
    "rerank_pipeline_body",
    "rerank_processor",
    "rerank_search_body",
    "service_base_url",
    "setup_search_pipeline",
    "trusted_endpoint_regex",
]

"""The recording fake OpenSearch node, extended with the ML Commons, search-pipeline and cluster-settings
endpoints that ``fusionrank opensearch setup-pipeline`` uses (answers shaped as OpenSearch 2.x answers, checked
against the spec's response schemas by the base class)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.contract.opensearch_fake import FakeOpenSearchServer, error_body

TRUSTED = "plugins.ml_commons.trusted_connector_endpoints_regex"
#: a few of ML Commons' default trusted endpoints (the real list is longer)
DEFAULT_TRUSTED = ["^https://api\\.openai\\.com/.*$", "^https://api\\.cohere\\.ai/.*$", "^https://bedrock-runtime\\..*[a-z0-9-]\\.amazonaws\\.com/.*$"]
KNOWN_PRE = {"connector.pre_process.cohere.rerank", "connector.pre_process.cohere.embedding", "connector.pre_process.default.rerank"}
KNOWN_POST = {"connector.post_process.cohere.rerank", "connector.post_process.cohere.embedding", "connector.post_process.default.rerank"}


def _new_id() -> str:
    return uuid.uuid4().hex[:20]


@dataclass
class FakeMLOpenSearchServer(FakeOpenSearchServer):
    persistent: dict[str, Any] = field(default_factory=dict)
    connectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, list[str]] = field(default_factory=dict)  # task id -> states still to report (last one sticks)
    task_models: dict[str, str] = field(default_factory=dict)
    #: register answers with model_id (2.12+) or with a task only (older clusters)
    register_returns_model_id: bool = True
    #: status of the deploy answer; anything but COMPLETED makes the client poll the task
    deploy_status: str = "COMPLETED"
    #: states the deploy task reports on successive GETs
    deploy_task_states: list[str] = field(default_factory=lambda: ["COMPLETED"])

    def _trusted(self) -> list[str]:
        return self.persistent.get(TRUSTED, DEFAULT_TRUSTED)

    # ------------------------------------------------------------------ cluster settings
    def _op_cluster_get_settings(self, method, segs, params, body):
        out: dict[str, Any] = {"persistent": dict(self.persistent), "transient": {}}
        if str(params.get("include_defaults", "")).lower() == "true":
            out["defaults"] = {TRUSTED: DEFAULT_TRUSTED, "plugins.ml_commons.only_run_on_ml_node": "true"}
        return 200, out

    def _op_cluster_put_settings(self, method, segs, params, body):
        b = json.loads(body)
        for key, value in (b.get("persistent") or {}).items():
            if not key.startswith(("plugins.ml_commons.", "cluster.", "search.")):
                return 400, error_body(400, "illegal_argument_exception", f"persistent setting [{key}], not recognized")
            self.persistent[key] = value
        return 200, {"acknowledged": True, "persistent": b.get("persistent") or {}, "transient": {}}

    # ------------------------------------------------------------------ ML Commons
    def _op_ml_create_connector(self, method, segs, params, body):
        b = json.loads(body)
        for action in b["actions"]:
            url = action["url"]
            if not any(re.fullmatch(p, url) for p in self._trusted()):
                return 400, error_body(400, "illegal_argument_exception", f"Connector URL is not matching the trusted connector endpoint regex, URL is: {url}")
            if action.get("pre_process_function", next(iter(KNOWN_PRE))) not in KNOWN_PRE:
                return 400, error_body(400, "illegal_argument_exception", f"Invalid pre process function: {action['pre_process_function']}")
            if action.get("post_process_function", next(iter(KNOWN_POST))) not in KNOWN_POST:
                return 400, error_body(400, "illegal_argument_exception", f"Invalid post process function: {action['post_process_function']}")
        if not b.get("credential"):
            return 400, error_body(400, "illegal_argument_exception", "Connector credential is null or empty list")
        cid = _new_id()
        self.connectors[cid] = b
        return 200, {"connector_id": cid}

    def _op_ml_register_model_group(self, method, segs, params, body):
        b = json.loads(body)
        if any(g["name"] == b["name"] for g in self.model_groups.values()):
            return 400, error_body(400, "illegal_argument_exception", "The name you provided is already being used by a model group with ID: x.")
        gid = _new_id()
        self.model_groups[gid] = b
        return 200, {"model_group_id": gid, "status": "CREATED"}

    def _op_ml_register_model(self, method, segs, params, body):
        b = json.loads(body)
        if b.get("function_name", "").lower() == "remote" and b.get("connector_id") not in self.connectors:
            return 404, error_body(404, "status_exception", "Failed to find connector")
        if b.get("model_group_id") and b["model_group_id"] not in self.model_groups:
            return 404, error_body(404, "status_exception", "Failed to find model group")
        mid, tid = _new_id(), _new_id()
        self.models[mid] = {**b, "model_state": "REGISTERED"}
        self.tasks[tid] = ["COMPLETED"]
        self.task_models[tid] = mid
        out = {"task_id": tid, "status": "CREATED"}
        if self.register_returns_model_id:
            out["model_id"] = mid
        return 200, out

    def _op_ml_deploy_model(self, method, segs, params, body):
        mid = segs[3]
        if mid not in self.models:
            return 404, error_body(404, "status_exception", "Failed to find model")
        tid = _new_id()
        self.models[mid]["model_state"] = "DEPLOYED"
        self.tasks[tid] = list(self.deploy_task_states)
        self.task_models[tid] = mid
        return 200, {"task_id": tid, "task_type": "DEPLOY_MODEL", "status": self.deploy_status}

    def _op_ml_get_task(self, method, segs, params, body):
        tid = segs[-1]
        if tid not in self.tasks:
            return 404, error_body(404, "status_exception", "Failed to find task")
        states = self.tasks[tid]
        state = states.pop(0) if len(states) > 1 else states[0]
        out = {"task_id": tid, "model_id": self.task_models[tid], "state": state, "function_name": "REMOTE", "is_async": True}
        if state == "FAILED":
            out["error"] = "simulated deploy failure"
        return 200, out

    # ------------------------------------------------------------------ search pipelines
    def _op_search_pipeline_put(self, method, segs, params, body):
        self.pipelines[segs[-1]] = json.loads(body)
        return 200, {"acknowledged": True}

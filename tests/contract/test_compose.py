"""docker-compose.yml describes the production-like stack (Docker cannot run here, so its structure is checked)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from workers.settings import Settings

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _ports(service: dict) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_the_stack_has_its_five_services_and_named_volumes(compose):
    assert set(compose["services"]) == {"opensearch", "redis", "postgres", "worker", "api"}
    used = {v.split(":", 1)[0] for s in compose["services"].values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert used <= set(compose["volumes"]) and {"opensearch-data", "postgres-data"} <= used


def test_opensearch_is_a_single_node_with_the_knn_plugin_and_a_health_check(compose):
    os_ = compose["services"]["opensearch"]
    image, _, tag = os_["image"].partition(":")
    assert image == "opensearchproject/opensearch"  # the official image bundles the k-NN plugin
    major, minor = (int(x) for x in tag.split(".")[:2])
    assert (major, minor) >= (2, 9), "efficient filtering in faiss knn queries needs OpenSearch 2.9+"
    env = _env(os_)
    assert env["discovery.type"] == "single-node"
    assert env.get("DISABLE_SECURITY_PLUGIN") == "true" or env.get("OPENSEARCH_INITIAL_ADMIN_PASSWORD"), "security off or an admin password"
    assert re.search(r"-Xms(\d+[mg]) -Xmx\1", env["OPENSEARCH_JAVA_OPTS"]), "fixed heap"
    assert "127.0.0.1:9200:9200" in _ports(os_)
    assert any(v.endswith(":/usr/share/opensearch/data") for v in os_["volumes"])
    check = " ".join(os_["healthcheck"]["test"])
    assert "_cluster/health" in check and "9200" in check and os_["healthcheck"]["retries"] >= 10


def test_redis_and_postgres_are_healthchecked_and_postgres_holds_the_fusionrank_db(compose):
    redis, pg = compose["services"]["redis"], compose["services"]["postgres"]
    assert redis["image"].startswith("redis:") and "redis-cli" in redis["healthcheck"]["test"] and "127.0.0.1:6379:6379" in _ports(redis)
    env = _env(pg)
    assert pg["image"].startswith("postgres:") and env["POSTGRES_DB"] == "fusionrank" and env["POSTGRES_PASSWORD"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"]) and "127.0.0.1:5432:5432" in _ports(pg)


@pytest.mark.parametrize("name", ["worker", "api"])
def test_app_services_use_real_settings_and_wait_for_healthy_dependencies(compose, name):
    svc = compose["services"][name]
    assert svc["build"] == "." and svc["profiles"] == ["app"]  # the image comes from the repo (Dockerfile: later issue)
    assert {k: v["condition"] for k, v in svc["depends_on"].items()} == dict.fromkeys(("opensearch", "redis", "postgres"), "service_healthy")
    env = _env(svc)
    known = {f"FUSIONRANK_{f.upper()}" for f in Settings.model_fields}
    assert set(env) <= known, f"not settings fields: {sorted(set(env) - known)}"
    assert env["FUSIONRANK_ENGINE"] == "opensearch" and env["FUSIONRANK_OPENSEARCH_URL"] == "http://opensearch:9200"
    assert env["FUSIONRANK_BROKER_URL"].startswith("redis://redis:6379/")
    assert re.fullmatch(r"postgresql\+psycopg://fusionrank:.+@postgres:5432/fusionrank", env["FUSIONRANK_SQL_URL"])


def test_the_worker_command_names_the_real_celery_app(compose):
    cmd = compose["services"]["worker"]["command"]
    assert cmd[:2] == ["celery", "-A"] and importlib.util.find_spec(cmd[2]) is not None and "worker" in cmd

"""docker-compose.yml describes the production-like stack and workers/Dockerfile its image. Docker cannot run here,
so the file is validated against the official Compose Specification JSON schema (the copy check-jsonschema
vendors) and its structure is checked against the project: settings names, the CLI commands it runs, volumes,
health checks and dependencies."""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "workers" / "Dockerfile"
APP_SERVICES = ("worker", "api")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_schema():
    import jsonschema

    try:
        text = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    except ModuleNotFoundError:
        pytest.skip("the Compose Specification schema ships with check-jsonschema (pip install 'fusionrank[test]')")
    schema = json.loads(text)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _ports(service: dict) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def _errors(validator, doc) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


# --------------------------------------------------------------------------- the official schema
def test_the_file_conforms_to_the_compose_specification(compose, compose_schema):
    assert _errors(compose_schema, compose) == []


@pytest.mark.parametrize(
    ("where", "value", "expect"),
    [
        (("services", "api", "healthcheck", "intervall"), "15s", "intervall"),
        (("services", "api", "depends_on", "redis", "condition"), "service_ready", "service_ready"),
        (("services", "api", "restart"), ["always"], "restart"),
        (("services", "worker", "build", "dockerfiles"), "x", "dockerfiles"),
    ],
)
def test_the_schema_check_catches_mistakes(compose, compose_schema, where, value, expect):
    broken = copy.deepcopy(compose)
    node = broken
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    errors = _errors(compose_schema, broken)
    assert errors and any(expect in e for e in errors), errors


# --------------------------------------------------------------------------- structure
def test_the_stack_has_its_five_services_and_named_volumes(compose):
    assert set(compose["services"]) == {"opensearch", "redis", "postgres", "worker", "api"}
    used = {v.split(":", 1)[0] for s in compose["services"].values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert used == set(compose["volumes"]), "every named volume declared, every declared volume used"
    assert {"opensearch-data", "postgres-data", "redis-data", "fusionrank-data"} <= used


def test_every_service_is_healthchecked_and_dependencies_exist(compose):
    services = compose["services"]
    for name, svc in services.items():
        check = svc.get("healthcheck")
        assert check and check["test"] and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        assert check.get("retries", 3) >= 3, name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services and dep != name, f"{name} depends on unknown service {dep}"
            assert cond["condition"] in ("service_healthy", "service_started", "service_completed_successfully")


def test_opensearch_is_a_single_node_with_the_knn_plugin_and_a_health_check(compose):
    os_ = compose["services"]["opensearch"]
    image, _, tag = os_["image"].partition(":")
    assert image == "opensearchproject/opensearch"  # the official image bundles the k-NN, ML Commons and neural-search plugins
    major, minor = (int(x) for x in tag.split(".")[:2])
    assert (major, minor) >= (2, 15), "efficient knn filtering needs 2.9; the rerank pipeline's private-IP connector setting needs 2.15"
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


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_build_the_image_use_real_settings_and_wait_for_healthy_dependencies(compose, name):
    svc = compose["services"][name]
    assert "profiles" not in svc, "the Dockerfile exists: the app services start with `docker compose up`"
    assert svc["build"] == {"context": ".", "dockerfile": "workers/Dockerfile"} and (ROOT / svc["build"]["dockerfile"]).is_file()
    assert {k: v["condition"] for k, v in svc["depends_on"].items()} == dict.fromkeys(("opensearch", "redis", "postgres"), "service_healthy")
    env = _env(svc)
    known = {f"FUSIONRANK_{f.upper()}" for f in Settings.model_fields}
    assert set(env) <= known, f"not settings fields: {sorted(set(env) - known)}"
    assert env["FUSIONRANK_ENGINE"] == "opensearch" and env["FUSIONRANK_OPENSEARCH_URL"] == "http://opensearch:9200"
    assert env["FUSIONRANK_BROKER_URL"].startswith("redis://redis:6379/")
    assert re.fullmatch(r"postgresql\+psycopg://fusionrank:.+@postgres:5432/fusionrank", env["FUSIONRANK_SQL_URL"])
    assert "fusionrank-data:/data" in svc["volumes"] and env["FUSIONRANK_DATA_DIR"] == "/data"


def test_the_api_requires_both_keys_and_checks_readiness_with_python(compose):
    api = compose["services"]["api"]
    env = _env(api)
    for var in ("FUSIONRANK_API_KEY", "FUSIONRANK_ADMIN_API_KEY"):
        assert re.fullmatch(r"\$\{" + var + r":\?[^}]+\}", env[var]), f"{var} must use the required-variable syntax, got {env[var]!r}"
    assert "127.0.0.1:8000:8000" in _ports(api)
    test = api["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and "/readyz" in test[3] and ":8000" in test[3]
    compile(test[3], "<healthcheck>", "exec")  # the check is valid Python
    assert "curl" not in " ".join(test), "the slim image has no curl"
    for name in ("worker", "opensearch", "redis", "postgres"):
        assert "FUSIONRANK_API_KEY" not in _env(compose["services"][name]), f"{name} does not need the API key"


def test_the_worker_runs_the_real_celery_app_and_is_pinged(compose):
    worker = compose["services"]["worker"]
    argv = worker["entrypoint"] + worker["command"]
    assert argv[:2] == ["celery", "-A"] and importlib.util.find_spec(argv[2]) is not None and "worker" in argv
    check = " ".join(worker["healthcheck"]["test"])
    assert f"celery -A {argv[2]} inspect ping" in check and "$$HOSTNAME" in check  # $$: the container's variable, not compose's


def test_the_api_command_is_the_real_fusionrank_serve_command(compose):
    import typer.main

    from workers.cli import app

    api = compose["services"]["api"]
    assert "entrypoint" not in api, "the api runs the image's `fusionrank` entrypoint"
    argv = api["command"]
    cmd = typer.main.get_command(app)
    assert argv[0] in ("serve",) and "fusionrank" not in argv
    serve = cmd.commands.get(argv[0])
    if serve is None:
        pytest.skip("`fusionrank serve` is not registered yet (workers/commands/serve.py arrives with the HTTP service)")
    known = {o for p in serve.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    options = [a for a in argv[1:] if a.startswith("--")]
    assert set(options) <= known, f"unknown serve options {sorted(set(options) - known)}"
    assert argv[argv.index("--port") + 1] == "8000" and argv[argv.index("--host") + 1] == "0.0.0.0"


# --------------------------------------------------------------------------- the image
def test_the_dockerfile_builds_a_non_root_image_with_the_fusionrank_entrypoint():
    text = DOCKERFILE.read_text()
    instructions = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert json.loads(next(l for l in instructions if l.startswith("ENTRYPOINT")).removeprefix("ENTRYPOINT")) == ["fusionrank"]
    users = [l.split()[1] for l in instructions if l.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    assert re.search(r"useradd\b.*\b" + re.escape(users[-1]) + r"\b", text)
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text), "the project itself is pip-installed"
    # what the image copies is what the package needs (pyproject's readme included, or pip install fails)
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {l.split()[1] for l in instructions if l.startswith("COPY ")}
    assert {"pyproject.toml", project["project"]["readme"]} <= copied
    packages = {p.rstrip("*").rstrip(".") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert project["project"]["scripts"]["fusionrank"] == "workers.cli:main"


def test_the_build_context_ignore_file_keeps_the_venv_out():
    lines = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [l.strip() for l in lines if l.strip() and not l.startswith("#")]
    assert ignore[0] == "**" and "!pyproject.toml" in ignore  # deny everything, then allow what the image copies
    assert not any(p.startswith("!.venv") or p.startswith("!.git") for p in ignore)

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from indexing.engines import ENGINES, create_engine
from indexing.errors import ConfigError, UnknownNameError
from indexing.registry import Registry
from workers.cli import app
from workers.settings import load_settings, redact_url

runner = CliRunner()


def test_registry_unknown_name_lists_valid_ones():
    r: Registry[int] = Registry("fusion strategy")
    r.register("concat")(lambda: 1)
    r.register("attention")(lambda: 2)
    assert r.create("concat") == 1
    with pytest.raises(UnknownNameError) as e:
        r.get("gated")
    assert str(e.value) == "unknown fusion strategy 'gated'; valid fusion strategys: attention, concat"


def test_unknown_engine_is_a_project_error_naming_the_valid_engines(monkeypatch):
    with pytest.raises(UnknownNameError, match="valid engines: local, opensearch"):
        create_engine("elastic")
    monkeypatch.setenv("FUSIONRANK_ENGINE", "solr")
    with pytest.raises(ConfigError, match="unknown engine 'solr'; valid engines: local, opensearch"):
        load_settings()
    assert ENGINES.names() == ["local", "opensearch"]


def test_settings_from_env_and_secrets_redacted(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSIONRANK_ENGINE", "opensearch")
    monkeypatch.setenv("FUSIONRANK_OPENSEARCH_USER", "admin")
    monkeypatch.setenv("FUSIONRANK_OPENSEARCH_PASSWORD", "s3cr3t-Pw")
    monkeypatch.setenv("FUSIONRANK_BROKER_URL", "redis://:brokerpw@127.0.0.1:6379/0")
    monkeypatch.setenv("FUSIONRANK_SQL_URL", "postgresql+psycopg://app:dbpw@db/fusionrank")
    monkeypatch.setenv("FUSIONRANK_API_KEY", "key-123")
    s = load_settings()
    assert s.engine == "opensearch" and s.opensearch_kwargs()["http_auth"] == ("admin", "s3cr3t-Pw")
    shown = json.dumps(s.redacted())
    for secret in ("s3cr3t-Pw", "brokerpw", "dbpw", "key-123"):
        assert secret not in shown
    assert s.redacted()["broker_url"] == "redis://:**********@127.0.0.1:6379/0"
    assert s.redacted()["sql_url"] == "postgresql+psycopg://app:**********@db/fusionrank"


def test_default_sql_url_is_sqlite_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONRANK_DATA_DIR", str(tmp_path))
    assert load_settings().effective_sql_url == f"sqlite:///{tmp_path}/history.sqlite3"


def test_redact_url_keeps_user_and_host():
    assert redact_url("amqp://guest:guest@localhost:5672//") == "amqp://guest:**********@localhost:5672//"
    assert redact_url("http://localhost:9200") == "http://localhost:9200"


def test_config_command_prints_redacted_json(monkeypatch):
    monkeypatch.setenv("FUSIONRANK_OPENSEARCH_PASSWORD", "hunter2-very-secret")
    res = runner.invoke(app, ["config"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["engine"] == "local" and cfg["opensearch_password"] == "**********"
    assert "hunter2-very-secret" not in res.output


def test_every_command_has_help():
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    names = [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]
    assert {"config", "index", "worker", "bench"} <= set(names)
    for name in names:
        res = runner.invoke(app, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert "Usage" in res.output


def test_console_script_turns_project_errors_into_one_line(monkeypatch):
    env = {"FUSIONRANK_ENGINE": "solr", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "workers.cli", "config"], capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert "error: invalid settings: FUSIONRANK_ENGINE: Value error, unknown engine 'solr'" in p.stderr
    assert "Traceback" not in p.stderr


def test_fashion_bench_paths_default_to_the_shared_data_and_fail_clearly_without_it(monkeypatch, tmp_path, shared_data):
    s = load_settings()
    assert s.fashion_bench() == (shared_data / "fashion" / "bench" / "catalog.csv", shared_data / "fashion")
    own = tmp_path / "shop" / "catalog.csv"
    assert s.fashion_bench(own) == (own, own.parent)
    monkeypatch.setenv("FUSIONRANK_SHARED_DATA", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="no fashion data found"):
        load_settings().fashion_bench()

"""Access settings: TLS verification to OpenSearch is on by default and turning it off warns; the
OpenSearch password never appears in `fusionrank config`, in the console script's errors, or in the
errors a real failed connection raises."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from indexing.engines.opensearch import OpenSearchEngine
from indexing.errors import EngineUnavailableError
from workers.drill.services import free_port  # a local port nothing listens on
from workers.cli import app
from workers.composition import build_engine
from workers.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
PW = "Pw-0f-the-cluster"  # set as FUSIONRANK_OPENSEARCH_PASSWORD
URL_PW = "url-Pw-42"  # embedded in FUSIONRANK_OPENSEARCH_URL
LOGGER = "indexing.engines.opensearch"


def _opensearch_env(monkeypatch, url: str) -> None:
    monkeypatch.setenv("FUSIONRANK_ENGINE", "opensearch")
    monkeypatch.setenv("FUSIONRANK_OPENSEARCH_URL", url)
    monkeypatch.setenv("FUSIONRANK_OPENSEARCH_USER", "admin")
    monkeypatch.setenv("FUSIONRANK_OPENSEARCH_PASSWORD", PW)
    monkeypatch.setenv("FUSIONRANK_OPENSEARCH_TIMEOUT_S", "2")


def test_tls_verification_is_on_by_default_and_reaches_the_client(monkeypatch, caplog):
    _opensearch_env(monkeypatch, "https://search.example:9200")
    s = load_settings()
    assert s.opensearch_verify_certs is True and s.opensearch_kwargs()["verify_certs"] is True
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        eng = build_engine(s)
    assert not [r for r in caplog.records if r.name == LOGGER]
    pool = eng.client.transport.get_connection().pool  # urllib3: certificates are checked
    assert pool.cert_reqs == "CERT_REQUIRED"


def test_turning_verification_off_through_settings_warns_without_the_password(monkeypatch, caplog):
    _opensearch_env(monkeypatch, f"https://admin:{URL_PW}@search.example:9200")
    monkeypatch.setenv("FUSIONRANK_OPENSEARCH_VERIFY_CERTS", "false")
    s = load_settings()
    assert s.opensearch_verify_certs is False
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        eng = build_engine(s)
    assert eng.client.transport.get_connection().pool.cert_reqs == "CERT_NONE"
    (rec,) = [r for r in caplog.records if r.name == LOGGER]
    msg = rec.getMessage()
    assert rec.levelno == logging.WARNING and "TLS certificate verification is OFF" in msg and "search.example:9200" in msg
    assert URL_PW not in msg and PW not in msg


def test_config_command_hides_every_form_of_the_password(monkeypatch):
    _opensearch_env(monkeypatch, f"https://admin:{URL_PW}@search.example:9200")
    monkeypatch.setenv("FUSIONRANK_SQL_URL", "postgresql+psycopg://app:sql-Pw-7@db/fusionrank")
    res = CliRunner().invoke(app, ["config"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["opensearch_password"] == "**********" and cfg["opensearch_user"] == "admin"
    assert cfg["opensearch_url"] == "https://admin:**********@search.example:9200"
    assert cfg["opensearch_verify_certs"] is True
    for secret in (PW, URL_PW, "sql-Pw-7"):
        assert secret not in res.output


def test_failed_connection_errors_name_the_host_not_the_password(monkeypatch):
    port = free_port()
    _opensearch_env(monkeypatch, f"http://admin:{URL_PW}@127.0.0.1:{port}")
    eng = build_engine(load_settings())
    for call in (lambda: eng.bm25_search("products", "shoes"), lambda: eng.get("products", ["1"])):
        with pytest.raises(EngineUnavailableError) as e:
            call()
        text = f"{e.value} {e.value!r} {e.value.__cause__!r} {e.value.__context__!r}"
        assert f"127.0.0.1:{port}" in str(e.value) and "Connection refused" in str(e.value)
        assert PW not in text and URL_PW not in text
    # http_auth given as a "user:password" string is scrubbed too
    eng2 = OpenSearchEngine(f"http://127.0.0.1:{port}", http_auth=f"admin:{PW}", timeout_s=2)
    with pytest.raises(EngineUnavailableError) as e:
        eng2.bm25_search("products", "shoes")
    assert PW not in str(e.value)


def test_console_script_errors_do_not_print_the_password(monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")}
    env.update(FUSIONRANK_OPENSEARCH_PASSWORD=PW, FUSIONRANK_OPENSEARCH_URL=f"https://admin:{URL_PW}@h:9200",
               FUSIONRANK_OPENSEARCH_TIMEOUT_S="not-a-number", FUSIONRANK_DATA_DIR=os.environ["FUSIONRANK_DATA_DIR"])
    p = subprocess.run([sys.executable, "-m", "workers.cli", "config"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert p.returncode == 2 and "FUSIONRANK_OPENSEARCH_TIMEOUT_S" in p.stderr and "Traceback" not in p.stderr
    assert PW not in p.stderr + p.stdout and URL_PW not in p.stderr + p.stdout


def test_settings_repr_does_not_show_url_passwords(monkeypatch):
    _opensearch_env(monkeypatch, f"https://admin:{URL_PW}@search.example:9200")
    s = load_settings()
    assert PW not in repr(s) and PW not in str(s)
    assert URL_PW not in repr(s) and URL_PW not in str(s)

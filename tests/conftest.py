from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.services import ensure

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FUSIONRANK_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads the developer's own data dir or FUSIONRANK_* settings by accident."""
    for k in list(os.environ):
        if k.startswith("FUSIONRANK_") and k != "FUSIONRANK_SHARED_DATA":
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("FUSIONRANK_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    monkeypatch.setenv("FUSIONRANK_SHARED_DATA", str(SHARED_DATA))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "fashion").is_dir():
        pytest.fail(f"the shared data folder {SHARED_DATA} is missing (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def redis_url() -> str:
    svc = ensure("redis")
    return f"redis://{svc.host}:{svc.port}"


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    svc = ensure("rabbitmq")
    return f"amqp://guest:guest@{svc.host}:{svc.port}//"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    svc = ensure("postgres")
    return f"postgresql+psycopg://postgres@{svc.host}:{svc.port}/test"

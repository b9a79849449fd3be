from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


@dataclass(frozen=True)
class OpenSearchNode:
    """The cluster the ``opensearch`` tests talk to, and the HNSW engine their indices must use on it."""

    url: str
    hnsw_engine: str
    external: bool

    def engine(self, **kwargs):
        from indexing.engines.opensearch import OpenSearchEngine

        if self.external:
            kwargs.setdefault("verify_certs", os.environ.get("OPENSEARCH_VERIFY_CERTS", "true").lower() != "false")
            kwargs.setdefault("ca_certs", os.environ.get("OPENSEARCH_CA_CERTS") or None)
        kwargs.setdefault("timeout_s", 60.0)
        return OpenSearchEngine(self.url, **kwargs)


@pytest.fixture(scope="session")
def opensearch_node(tmp_path_factory) -> Iterator[OpenSearchNode]:
    """A real OpenSearch 2.19.1 node for the whole session (``workers/devnode.py``: built from Maven Central
    artifacts, 1 GB heap, single-node, data in a temp dir, stopped at the end; its log is kept as
    ``test-output/opensearch-node.log``). ``OPENSEARCH_URL`` points the suite at an external cluster instead
    (``OPENSEARCH_HNSW_ENGINE``: the HNSW engine to create indices with there, default faiss)."""
    url = os.environ.get("OPENSEARCH_URL")
    if url:
        yield OpenSearchNode(url, os.environ.get("OPENSEARCH_HNSW_ENGINE", "faiss"), external=True)
        return
    from workers import devnode

    home = tmp_path_factory.mktemp("opensearch-node")
    node = devnode.start(home)
    try:
        # Maven Central's k-NN zip has no native libraries: faiss and nmslib cannot run on this node
        yield OpenSearchNode(node.url, "lucene", external=False)
    finally:
        node.stop()
        out = REPO / "test-output"
        out.mkdir(exist_ok=True)
        shutil.copyfile(node.log_path, out / "opensearch-node.log")

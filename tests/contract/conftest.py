"""Fixtures for the OpenSearch contract tests: the loaded API spec, a fake node at the connection boundary,
and an ``OpenSearchEngine`` whose requests go to that node (see ``opensearch_fake.py``); ``live``: an engine on the
session's real node with a fresh index-name prefix, whose indices are deleted afterwards."""

from __future__ import annotations

import uuid

import pytest

from indexing.engines.opensearch import OpenSearchEngine
from indexing.opensearch_spec import OpenSearchSpec, load_spec
from tests.contract.opensearch_fake import FakeOpenSearchServer


@pytest.fixture(scope="session")
def spec() -> OpenSearchSpec:
    return load_spec()


@pytest.fixture
def server(spec: OpenSearchSpec) -> FakeOpenSearchServer:
    return FakeOpenSearchServer(spec)


@pytest.fixture
def engine(server: FakeOpenSearchServer) -> OpenSearchEngine:
    eng = OpenSearchEngine(client=server.client(), bulk_initial_backoff_s=0.001, bulk_max_backoff_s=0.01)
    yield eng
    eng.close()


@pytest.fixture
def live(opensearch_node):
    """(engine on the real node, a unique index-name prefix); every index under the prefix is deleted afterwards."""
    eng = opensearch_node.engine(bulk_initial_backoff_s=0.2)
    prefix = f"fr-live-{uuid.uuid4().hex[:8]}-"
    yield eng, prefix
    for name in eng.list_indices(prefix):
        eng.delete_index(name)
    eng.close()


def put_pipeline(eng, pipelines: list[str], body: dict, prefix: str = "fr-test") -> str:
    """PUT a search pipeline under a fresh name on the node and remember it in ``pipelines`` (the fixture deletes them)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    eng.client.transport.perform_request("PUT", f"/_search/pipeline/{name}", body=body)
    pipelines.append(name)
    return name

"""Fixtures for the OpenSearch contract tests: the loaded API spec, a fake node at the connection boundary,
and an ``OpenSearchEngine`` whose requests go to that node (see ``opensearch_fake.py``)."""

from __future__ import annotations

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

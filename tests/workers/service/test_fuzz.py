"""Schema fuzzing: schemathesis generates requests from the app's own OpenAPI schema and calls the app in
process (ASGI); no response may be a 5xx, and every response must conform to the schema (status code
documented, content type, body schema). Bounded: 30 examples per operation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance

from tests.workers.service.world import ADMIN_KEY, build_world

pytestmark = pytest.mark.slow

#: routes of the search page (workers/service/page.py, fuzzed by its own tests) and /admin/reindex (it queues a
#: Celery task on the broker: tested against real Redis in test_app.py instead)
NOT_HERE = ("/admin/reindex", "/v1/users", "/v1/products/{product_id}/image", "/", "/static")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    w = build_world(tmp_path_factory.mktemp("fuzz-world"))
    yield w.app()
    w.store.close()


def test_no_5xx_and_responses_conform(fuzz_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    ops = [op for op in (r.ok() for r in schema.get_all_operations()) if not op.path.startswith(NOT_HERE[-1]) and op.path not in NOT_HERE]
    tried = []
    for op in ops:
        calls = []

        @given(case=op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            # the admin key passes every endpoint's auth (it is accepted as an API key too)
            resp = case.call_and_validate(headers={"X-API-Key": ADMIN_KEY}, checks=CHECKS)
            calls.append(resp.status_code)

        run()
        tried.append((op.label, len(calls)))
        assert calls, f"{op.label}: no request was made"
    labels = {label for label, _ in tried}
    assert {"POST /v1/rerank", "POST /rerank", "POST /search", "POST /events", "GET /metrics"} <= labels, tried

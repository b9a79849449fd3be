"""The HTTP rerank service (FastAPI + uvicorn): ``fusionrank serve``.

Modules: :mod:`~workers.service.state` (what the app serves: engine, reranker, history; loaded once),
:mod:`~workers.service.auth` (API keys), :mod:`~workers.service.schemas` (request/response bodies),
:mod:`~workers.service.metrics` (Prometheus, one registry per app), :mod:`~workers.service.app`
(``create_app`` and the endpoints), :mod:`~workers.bench.serve` (``fusionrank bench serve``).
The contract is the OpenAPI schema the app serves at ``/openapi.json``.

Nothing heavy is imported here: ``from workers.service.app import create_app`` pulls FastAPI in.
"""

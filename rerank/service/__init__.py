"""The HTTP rerank service (FastAPI + uvicorn): ``fusionrank serve``.

Modules: :mod:`~rerank.service.state` (what the app serves: engine, reranker, history; loaded once),
:mod:`~rerank.service.auth` (API keys), :mod:`~rerank.service.schemas` (request/response bodies),
:mod:`~rerank.service.metrics` (Prometheus, one registry per app), :mod:`~rerank.service.app`
(``create_app`` and the endpoints), :mod:`~rerank.service.bench` (``fusionrank bench serve``).
The contract is the OpenAPI schema the app serves at ``/openapi.json``.

Nothing heavy is imported here: ``from rerank.service.app import create_app`` pulls FastAPI in.
"""

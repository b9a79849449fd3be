"""OpenSearch request bodies for hybrid retrieval, as pure functions (contract-tested against the spec).

Two ways to run the first stage on OpenSearch:

1. **One request**: a ``hybrid`` query (BM25 ``multi_match`` + ``knn`` on ``text_vec`` [+ ``knn`` on
   ``image_vec``]) searched through a search pipeline whose ``normalization-processor`` does min-max
   normalization and a weighted ``arithmetic_mean`` (:func:`normalization_pipeline_body`), or whose
   ``score-ranker-processor`` does RRF (:func:`rrf_pipeline_body`). ``PUT /_search/pipeline/<id>`` once,
   then ``POST /<index>/_search?search_pipeline=<id>`` with :func:`hybrid_search_body`. Cheapest in
   round trips, but the response carries only the fused score: per-list scores and ranks are gone.
2. **Separate requests fused client-side**: :func:`list_search_bodies` (one ``_search`` body per list,
   the same bodies ``OpenSearchEngine`` sends), then :func:`first_stage_from_responses` +
   :func:`rerank.retrieval.retriever.fuse_first_stage`. Every first-stage signal survives (the fusion model needs
   them), and the fused order equals the pipeline's (min-max: ``missing="zero"``, the default, is what 2.19's
   ``arithmetic_mean`` does with a document a sub-query did not return; RRF: the same rank constant).

The sub-query order of the hybrid query is :func:`hybrid_list_order`; pipeline weights follow it.

What OpenSearch 2.19 does with these bodies, checked on a real 2.19.1 node (``tests/contract/test_hybrid_live.py``):

- The hybrid body leaves ``track_total_hits`` at its default: neural-search's ``rerank`` response processor
  starts by reading the total hit count and throws a NullPointerException when it is absent.
- ``pagination_depth`` = ``per_list``: without it each sub-query returns only ``size`` hits, so the pool the
  pipeline fuses shrinks with ``size`` and is not the client-side fusion's ``per_list``.
- ``arithmetic_mean`` counts a document a sub-query did not return as 0 in that sub-query (``missing="zero"``
  of :func:`rerank.retrieval.fusion.minmax`), not as absent from the mean.
- ``normalization-processor`` without ``weights`` averages with equal weights over however many sub-queries
  come (2 or 3): one pipeline serves text-only and photo queries. Explicit weights fix the count, and 2.19
  rejects a query with another number of sub-queries.
- 2.19's ``score-ranker-processor`` reads RRF's ``rank_constant`` from ``combination.parameters``; a
  ``combination.rank_constant`` (the form the API specification documents, read from 3.1 on) is silently
  ignored and becomes 60. :func:`rrf_pipeline_body` writes the form the target version reads.
- kNN scores come back translated (innerproduct: ``1 + ip`` for ip >= 0, ``1 / (1 - ip)`` below);
  :func:`first_stage_from_responses` turns them back into similarities, as ``OpenSearchEngine.knn_search``
  does, so the model reads the same numbers on either engine.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.engines.base import Filters, Hit, check_size
from indexing.errors import ConfigError
from rerank.retrieval.fusion import RRF_RANK_CONSTANT, check_weights
from rerank.retrieval.retriever import BM25, KNN_IMAGE, KNN_TEXT, FirstStage


def _vector(v: Sequence[float] | np.ndarray, what: str) -> list[float]:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
        raise ConfigError(f"{what} must be a non-empty 1-d vector of finite numbers, got shape {a.shape}")
    return [float(x) for x in a]


def _engine_bodies():
    from indexing.engines.opensearch import OpenSearchEngine, format_filters

    return OpenSearchEngine, format_filters


def hybrid_list_order(*, has_text: bool = True, has_image: bool = False) -> list[str]:
    """Names of the hybrid query's sub-queries, in order (pipeline weights follow this order)."""
    out = [BM25, KNN_TEXT] if has_text else []
    if has_image:
        out.append(KNN_IMAGE)
    if not out:
        raise ConfigError("a hybrid query needs a query text or a query image")
    return out


def list_search_bodies(
    query: str,
    *,
    text_vector: Sequence[float] | np.ndarray | None,
    image_vector: Sequence[float] | np.ndarray | None = None,
    per_list: int = 200,
    fields: Mapping[str, float] | None = None,
    filters: Filters | None = None,
    source: bool | Sequence[str] = False,
) -> dict[str, dict[str, Any]]:
    """One ``_search`` body per list (``bm25``, ``knn_text``, ``knn_image``), for client-side fusion."""
    engine, _ = _engine_bodies()
    k = check_size(per_list, "per_list")
    out: dict[str, dict[str, Any]] = {}
    if query.strip():
        out[BM25] = engine.bm25_body(query, size=k, fields=fields, filters=filters, source=source)
    if text_vector is not None:
        out[KNN_TEXT] = engine.knn_body(F.TEXT_VEC, np.asarray(_vector(text_vector, "text_vector")), k=k, filters=filters, source=source)
    if image_vector is not None:
        out[KNN_IMAGE] = engine.knn_body(F.IMAGE_VEC, np.asarray(_vector(image_vector, "image_vector")), k=k, filters=filters, source=source)
    if not out:
        raise ConfigError("nothing to search: give a query text, a text vector or an image vector")
    return out


def hybrid_search_body(
    query: str,
    *,
    text_vector: Sequence[float] | np.ndarray,
    image_vector: Sequence[float] | np.ndarray | None = None,
    size: int = 200,
    per_list: int = 200,
    fields: Mapping[str, float] | None = None,
    filters: Filters | None = None,
    source: bool | Sequence[str] = False,
) -> dict[str, Any]:
    """The ``_search`` body of the one-request path: a ``hybrid`` query over the lists of
    :func:`hybrid_list_order`; filters go inside every sub-query (works on every version with ``hybrid``;
    the top-level ``hybrid.filter`` needs 3.0). Search it with ``search_pipeline=<pipeline id>``."""
    if not query.strip():
        raise ConfigError("the hybrid query needs a query text (use the knn list bodies for an image-only query)")
    n = check_size(size, "size")
    bodies = list_search_bodies(query, text_vector=text_vector, image_vector=image_vector, per_list=per_list, fields=fields, filters=filters)
    order = hybrid_list_order(has_text=True, has_image=image_vector is not None)
    engine, _ = _engine_bodies()
    # no "track_total_hits": false here: the rerank response processor reads the total (module doc)
    return {
        "size": n,
        "query": {"hybrid": {"queries": [bodies[name]["query"] for name in order], "pagination_depth": check_size(per_list, "per_list")}},
        "_source": engine.bm25_body(query, size=1, source=source)["_source"],  # the engine's own _source rule
    }


def normalization_pipeline_body(
    weights: Mapping[str, float] | None = None,
    *,
    has_image: bool = False,
    description: str = "fusionrank hybrid retrieval: min-max normalization, weighted arithmetic mean",
) -> dict[str, Any]:
    """``PUT /_search/pipeline/<id>`` body: ``normalization-processor`` with ``min_max`` and
    ``arithmetic_mean``. ``weights`` per list name (summing to 1), ordered as the hybrid sub-queries of a query
    with (``has_image``) or without a photo: such a pipeline takes only queries with that many sub-queries.
    ``None``: no weights, equal weights over whatever sub-queries a query has (text-only and photo queries alike)."""
    combination: dict[str, Any] = {"technique": "arithmetic_mean"}
    if weights is not None:
        order = hybrid_list_order(has_text=True, has_image=has_image)
        w = check_weights(order, weights)
        combination["parameters"] = {"weights": [w[n] for n in order]}
    return {
        "description": description,
        "phase_results_processors": [{"normalization-processor": {"normalization": {"technique": "min_max"}, "combination": combination}}],
    }


def _version(v: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(v, str):
        try:
            return tuple(int(x) for x in v.split("-")[0].split(".")[:3])
        except ValueError:
            raise ConfigError(f"not an OpenSearch version: {v!r}") from None
    return tuple(int(x) for x in v)


#: the OpenSearch version the bodies are written for unless told (the test node's and docker-compose's)
DEFAULT_OPENSEARCH_VERSION = "2.19.1"


def rrf_pipeline_body(*, rank_constant: int = RRF_RANK_CONSTANT, opensearch_version: str | Sequence[int] = DEFAULT_OPENSEARCH_VERSION,
                      description: str = "fusionrank hybrid retrieval: reciprocal rank fusion") -> dict[str, Any]:
    """``PUT /_search/pipeline/<id>`` body: ``score-ranker-processor`` with ``rrf`` (OpenSearch >= 2.19). The rank
    constant goes where ``opensearch_version`` reads it: ``combination.parameters.rank_constant`` before 3.1
    (2.19 ignores ``combination.rank_constant``), ``combination.rank_constant`` from 3.1 on."""
    if isinstance(rank_constant, bool) or not isinstance(rank_constant, int) or rank_constant < 1:
        raise ConfigError(f"rank_constant must be an integer >= 1, got {rank_constant!r}")
    v = _version(opensearch_version)
    if v < (2, 19):
        raise ConfigError(f"the score-ranker-processor (RRF) needs OpenSearch 2.19 or later; the cluster runs {'.'.join(map(str, v))}")
    combination: dict[str, Any] = {"technique": "rrf"}
    if v < (3, 1):
        combination["parameters"] = {"rank_constant": rank_constant}
    else:
        combination["rank_constant"] = rank_constant
    return {"description": description, "phase_results_processors": [{"score-ranker-processor": {"combination": combination}}]}


def hits_from_response(response: Mapping[str, Any]) -> tuple[Hit, ...]:
    """``hits.hits`` of a ``_search`` response as :class:`Hit` s (``_source`` kept when present)."""
    try:
        raw = response["hits"]["hits"]
    except (KeyError, TypeError):
        raise ConfigError("not an OpenSearch search response: no hits.hits") from None
    out = []
    for h in raw:
        score = h.get("_score")
        out.append(Hit(str(h["_id"]), float(score) if score is not None else 0.0, h.get("_source")))
    return tuple(out)


def first_stage_from_responses(query: str, responses: Mapping[str, Mapping[str, Any]], *, user_id: str | None = None,
                               knn_space: str = "innerproduct") -> FirstStage:
    """The raw lists of the separate-requests path, ready for :func:`rerank.retrieval.retriever.fuse_first_stage`; the kNN
    lists' scores turned back into similarities of ``knn_space`` (the space of the index's vector fields)."""
    from indexing.engines.opensearch import knn_similarity

    unknown = sorted(set(responses) - {BM25, KNN_TEXT, KNN_IMAGE})
    if unknown:
        raise ConfigError(f"unknown list names {unknown}; valid: {BM25}, {KNN_TEXT}, {KNN_IMAGE}")
    lists = {name: hits_from_response(r) for name, r in responses.items()}
    for name in (KNN_TEXT, KNN_IMAGE):
        if name in lists:
            lists[name] = tuple(Hit(h.id, knn_similarity(knn_space, h.score), h.source) for h in lists[name])
    skipped = {n: "no request sent for this list" for n in (BM25, KNN_TEXT, KNN_IMAGE) if n not in lists}
    return FirstStage(query, lists, skipped, user_id)


__all__ = [
    "DEFAULT_OPENSEARCH_VERSION",
    "first_stage_from_responses",
    "hits_from_response",
    "hybrid_list_order",
    "hybrid_search_body",
    "list_search_bodies",
    "normalization_pipeline_body",
    "rrf_pipeline_body",
]

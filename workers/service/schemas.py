"""Request and response bodies of the HTTP service (pydantic; they make the OpenAPI schema at ``/openapi.json``).

Responses are rendered directly as JSON by the endpoints (no per-response pydantic pass: 100 hits with
explanations would cost milliseconds); the models here document them, and the schema-fuzz test checks that
real responses conform.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_QUERY_CHARS = 4096
MAX_ID_CHARS = 256

#: the diversity of a /rerank or /search call: a lambda in [0, 1] or "auto" (rerank.diversity)
DiversityField = Optional[Union[Annotated[float, Field(ge=0.0, le=1.0)], Literal["auto"]]]
_DIVERSITY_DOC = ('the diversity step (MMR over the text and aligned photo vectors): a lambda in [0, 1] (0: the model\'s order) '
                  'or "auto" (strong for a vague query from a shopper without history, weak when the query names attributes or the '
                  'history is strong); null: the index\'s default (FUSIONRANK_DIVERSITY)')


def _check_diversity(v: Any) -> Any:
    """The range error of :func:`rerank.diversity.parse_diversity` (422 naming the allowed range) before pydantic's own."""
    if v is None:
        return None
    from indexing.errors import ConfigError
    from rerank.diversity import parse_diversity

    try:
        return parse_diversity(v)
    except ConfigError as e:
        raise ValueError(str(e)) from None


class ErrorResponse(BaseModel):
    detail: str = Field(..., description="what is wrong with the request, or why it cannot be served")


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready", "loading", "failed"]
    model_version: Optional[str] = None
    detail: Optional[str] = None


class FusionrankBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    degraded: Optional[str] = Field(None, description="null, or why the call failed open to the first-stage order")
    model_version: Optional[str] = None
    diversity: Optional[dict[str, Any]] = Field(None, description="/rerank and /search: the diversity lambda that applied and why "
                                                                  "(lambda, requested, source, reason, applied; with auto: qualifiers, "
                                                                  "attributes, history_strength, history_events)")
    unknown_ids: Optional[list[str]] = Field(None, description="/rerank: ids of given hits the index does not have (scored without vectors)")
    serving: Optional[dict[str, Any]] = Field(None, description="what the model artifact serves: policy 'model' (the trained model) or "
                                                                "'safe_choice' (the first-stage signal's order, when training could "
                                                                "not show the model beats it), the signal and why; null for noop")
    query_id: Optional[str] = Field(None, description="/rerank and /search: the UBI query id of this answer (the caller's, else a new "
                                                      "one); send the shopper's events with it to POST /events")
    explore: Optional[dict[str, Any]] = Field(None, description="/rerank and /search, only on an answer that explores "
                                                                "(FUSIONRANK_EXPLORE_SHARE): from_position, depth and how many "
                                                                "positions show a product drawn from lower in the model's order; "
                                                                "each hit's rank stays the model's")


_QUERY_ID_DOC = ("UBI query id of this search (at most 100 characters; default: the response's ext.ubi.query_id for /rerank, else a new "
                 "one); the answer carries it and the service records what it served under it")


# ----------------------------------------------------------------------------- Cohere rerank (/v1/rerank)
class CohereDocument(BaseModel):
    text: str = Field(..., max_length=100_000)
    id: Optional[str] = Field(None, min_length=1, max_length=MAX_ID_CHARS, description="product id: its indexed vectors are used")


class CohereRerankRequest(BaseModel):
    """What OpenSearch ML Commons' ``connector.pre_process.cohere.rerank`` sends (query, documents, top_n), plus
    the optional fusionrank fields ``user_id`` (personalization) and ``product_ids`` (one per document)."""

    query: str = Field(..., max_length=MAX_QUERY_CHARS)
    documents: list[Union[str, CohereDocument]]
    top_n: Optional[int] = Field(None, ge=1, description="keep the best top_n results (default: all)")
    model: Optional[str] = Field(None, max_length=256, description="accepted and ignored (the served model answers)")
    return_documents: bool = False
    user_id: Optional[str] = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    product_ids: Optional[list[Optional[str]]] = Field(None, description="product id of each document (same length as documents)")


class CohereResultDocument(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int = Field(..., ge=0, description="position of the document in the request")
    relevance_score: float = Field(..., ge=0.0, le=1.0)
    document: Optional[CohereResultDocument] = None


class CohereMeta(BaseModel):
    api_version: dict[str, str]


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: CohereMeta
    fusionrank: FusionrankBlock


# ----------------------------------------------------------------------------- OpenSearch-shaped (/rerank)
class RerankRequest(BaseModel):
    """Give either ``response`` (a whole OpenSearch search response) or ``hits`` (a list of ``{_id, _score, _source?}``)."""

    query: str = Field(..., max_length=MAX_QUERY_CHARS)
    response: Optional[dict[str, Any]] = Field(None, description="an OpenSearch search response (hits.hits is reranked)")
    hits: Optional[list[dict[str, Any]]] = Field(None, description="first-stage hits: {_id, _score, _source?}")
    user_id: Optional[str] = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    top_k: Optional[int] = Field(None, ge=1, le=10_000)
    image: Optional[str] = Field(None, description="query image, base64 (optionally a data: URL)")
    diversity: DiversityField = Field(None, description=_DIVERSITY_DOC)
    query_id: Optional[str] = Field(None, min_length=1, max_length=100, description=_QUERY_ID_DOC)
    client_id: Optional[str] = Field(None, min_length=1, max_length=100, description="UBI client id (the shopper's browser or app), recorded with the search")

    _diversity = field_validator("diversity", mode="before")(_check_diversity)


class RerankHits(BaseModel):
    model_config = ConfigDict(extra="allow")
    hits: list[dict[str, Any]]
    max_score: Optional[float] = None


class RerankResponse(BaseModel):
    """The given OpenSearch response (or ``{"hits": {"hits": [...]}}`` for a list of hits), reordered, with
    ``_score`` the model score, ``_previous_score`` the first-stage one and ``_explanation`` per hit."""

    model_config = ConfigDict(extra="allow")
    hits: RerankHits
    fusionrank: FusionrankBlock


# ----------------------------------------------------------------------------- /search
class RangeModel(BaseModel):
    gte: Optional[float] = None
    lte: Optional[float] = None
    gt: Optional[float] = None
    lt: Optional[float] = None


class FiltersModel(BaseModel):
    terms: dict[str, Union[str, list[str]]] = Field(default_factory=dict, description='e.g. {"gender": ["Men", "Unisex"]}')
    ranges: dict[str, RangeModel] = Field(default_factory=dict, description='e.g. {"price": {"lte": 50}}')
    include_completed: bool = Field(False, description="terms on colour / article_type / gender / usage also match values "
                                                       "completed from the product photo (products-v4 index)")


class SearchRequest(BaseModel):
    query: str = Field("", max_length=MAX_QUERY_CHARS)
    user_id: Optional[str] = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    size: int = Field(10, ge=1, le=100)
    filters: Optional[FiltersModel] = None
    image: Optional[str] = Field(None, description="query image, base64 (optionally a data: URL)")
    diversity: DiversityField = Field(None, description=_DIVERSITY_DOC)
    query_id: Optional[str] = Field(None, min_length=1, max_length=100, description=_QUERY_ID_DOC)
    client_id: Optional[str] = Field(None, min_length=1, max_length=100, description="UBI client id (the shopper's browser or app), recorded with the search")
    ext: Optional[dict[str, Any]] = Field(None, description="as in an OpenSearch request: ext.ubi.query_id / ext.ubi.client_id")

    _diversity = field_validator("diversity", mode="before")(_check_diversity)


class SearchHit(BaseModel):
    id: str
    score: float
    rank: int
    previous_rank: int
    previous_score: float
    source: dict[str, Any]
    explanation: dict[str, Any]


class SearchResponse(BaseModel):
    query_id: str = Field(..., description="the UBI query id of this answer (also in fusionrank.query_id)")
    hits: list[SearchHit]
    fusionrank: FusionrankBlock


# ----------------------------------------------------------------------------- /events
class EventsRequest(BaseModel):
    events: list[dict[str, Any]] = Field(
        ..., description="each {event_id?, user_id, product_id, type: view|click|add_to_cart|purchase, ts?}, or a UBI 1.3 event "
                         "({action_name, query_id, client_id, timestamp, event_attributes: {object: {object_id}, position: {ordinal}}}: "
                         "stored in the UBI log; with a user_id, clicks, carts and purchases also feed that user's history); bad events "
                         "are rejected one by one"
    )


class EventError(BaseModel):
    row: int
    reason: str


class EventsResponse(BaseModel):
    stored: int
    duplicates: int
    rejected: int
    errors: list[EventError]


# ----------------------------------------------------------------------------- admin
class ReloadResponse(BaseModel):
    status: Literal["reloaded"]
    model_version: Optional[str] = None


class ReindexRequest(BaseModel):
    mapping: Optional[str] = Field(None, max_length=200)
    text_model: Optional[str] = Field(None, max_length=200)
    text_backend: Optional[Literal["torch", "onnx-int8", "onnx-q8"]] = None
    image_model: Optional[str] = Field(None, max_length=200)
    images_root: Optional[str] = Field(None, max_length=4096)
    batch_size: int = Field(256, ge=1, le=10_000)


class ReindexAccepted(BaseModel):
    status: Literal["queued"]
    task_id: str
    job_id: str

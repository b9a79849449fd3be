"""Hybrid first-stage retrieval: BM25 + kNN(text_vec) + kNN(image_vec), fused into the top N candidates.

:class:`Retriever` runs the lists on any :class:`~indexing.engines.base.SearchEngine` (LocalEngine or
OpenSearchEngine; on OpenSearch the single-request hybrid variant lives in
:mod:`rerank.retrieval.opensearch_bodies`) and keeps every first-stage signal of every candidate: each list's raw
score, rank and missing flag, beside the fused score. Fusion itself is :mod:`rerank.retrieval.fusion` (pure).

Which lists run for a query:

* ``bm25``: a multi_match over the weighted text fields (``indexing.fields.BM25_FIELDS`` by default);
  skipped for an empty query text.
* ``knn_text``: the encoded query text against ``text_vec``; skipped for an empty query text.
* ``knn_image``: a query image (encoded by the image encoder) against ``image_vec``; for a text query
  only when a text-to-image alignment is given (``query_to_image_space``: text vector -> image-space
  vector; the fusion issue trains one). Otherwise it is skipped, and the reason is recorded.

A skipped list is reported in :attr:`CandidateSet.skipped` and every candidate carries it as missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.engines.base import Filters, Hit, SearchEngine, check_size
from indexing.errors import ConfigError
from rerank.retrieval.fusion import FUSION_METHODS, FusedDoc, ListSignal, fuse
from rerank.limits import check_query_text

log = logging.getLogger(__name__)

BM25 = "bm25"
KNN_TEXT = "knn_text"
KNN_IMAGE = "knn_image"
LISTS = (BM25, KNN_TEXT, KNN_IMAGE)
DEFAULT_TOP_N = 200

#: text vector (query space) -> image-space vector of the index's ``image_vec`` field
QueryToImageSpace = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RetrievalConfig:
    """How candidates are gathered and fused."""

    lists: tuple[str, ...] = LISTS
    fusion: str = "rrf"
    weights: Mapping[str, float] | None = None  # per list; minmax: must sum to 1 over the lists that ran
    top_n: int = DEFAULT_TOP_N  # fused candidates kept
    per_list: int = DEFAULT_TOP_N  # hits asked from each list
    bm25_fields: Mapping[str, float] = field(default_factory=lambda: dict(F.BM25_FIELDS))
    fusion_options: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"missing": "zero"} or {"rank_constant": 60}

    def __post_init__(self) -> None:
        unknown = [n for n in self.lists if n not in LISTS]
        if unknown or not self.lists:
            raise ConfigError(f"unknown retrieval lists {unknown or '(none)'}; valid lists: {', '.join(LISTS)}")
        if self.fusion not in FUSION_METHODS:
            FUSION_METHODS.get(self.fusion)  # raises UnknownNameError listing the methods
        check_size(self.top_n, "top_n")
        check_size(self.per_list, "per_list")


@dataclass(frozen=True)
class Candidate:
    """One first-stage candidate with every signal: fused score/rank and, per list, raw score, rank, missing."""

    id: str
    score: float  # fused score
    rank: int  # 1-based fused rank
    signals: Mapping[str, ListSignal]
    source: Mapping[str, Any] | None = None

    def list_score(self, name: str) -> float | None:
        s = self.signals.get(name)
        return None if s is None else s.score

    def missing(self, name: str) -> bool:
        s = self.signals.get(name)
        return s is None or s.missing


@dataclass(frozen=True)
class FirstStage:
    """The raw lists of one query, before fusion (the harness fuses them several ways)."""

    query: str
    lists: Mapping[str, tuple[Hit, ...]]  # lists that ran, in engine order
    skipped: Mapping[str, str]  # list -> why it did not run
    user_id: str | None = None


@dataclass(frozen=True)
class CandidateSet:
    query: str
    candidates: tuple[Candidate, ...]
    lists: tuple[str, ...]  # the lists that ran
    skipped: Mapping[str, str]
    fusion: str
    user_id: str | None = None

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.candidates]


def fuse_first_stage(
    stage: FirstStage,
    *,
    method: str = "rrf",
    lists: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    top_n: int | None = DEFAULT_TOP_N,
    sources: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> CandidateSet:
    """Fuse (a subset of) a query's lists into candidates; lists asked for but skipped stay missing.

    Pure: no engine call. ``weights`` name only lists that ran; for ``minmax`` they are renormalized to
    sum to 1 over those lists (so a skipped image list does not silently shrink every score).
    """
    names = [n for n in (lists or LISTS) if n in stage.lists]
    skipped = {n: stage.skipped.get(n, "not requested") for n in (lists or LISTS) if n not in stage.lists}
    if not names:
        return CandidateSet(stage.query, (), (), skipped, method, stage.user_id)
    w = None
    if weights is not None:
        ran = {n: float(weights[n]) for n in names if n in weights}
        total = sum(ran.values())
        if total <= 0:
            raise ConfigError(f"weights {dict(weights)} give no weight to the lists that ran ({', '.join(names)})")
        w = {n: ran.get(n, 0.0) / total for n in names}
    fused: list[FusedDoc] = fuse(method, {n: stage.lists[n] for n in names}, weights=w, top_n=top_n, **options)
    every = tuple(lists or LISTS)
    cands = tuple(
        Candidate(
            d.id,
            d.score,
            d.rank,
            {n: d.signals.get(n, ListSignal.absent()) for n in every},
            sources.get(d.id) if sources else None,
        )
        for d in fused
    )
    return CandidateSet(stage.query, cands, tuple(names), skipped, method, stage.user_id)


class Retriever:
    """First-stage retrieval over one index (or alias) of a search engine.

    ``text_encoder`` needs ``.encode(list[str]) -> (n, dim)``; ``image_encoder`` (optional) the same for
    images. Encoders are passed in (library code does not read settings or load models itself).
    """

    def __init__(
        self,
        engine: SearchEngine,
        index: str,
        *,
        text_encoder: Any | None,
        image_encoder: Any | None = None,
        query_to_image_space: QueryToImageSpace | None = None,
        config: RetrievalConfig | None = None,
    ):
        self.engine, self.index = engine, index
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.query_to_image_space = query_to_image_space
        self.config = config or RetrievalConfig()

    # -------------------------------------------------------------- encoding
    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors for many texts at once (the harness encodes a whole query set in one call)."""
        if self.text_encoder is None:
            raise ConfigError("this retriever has no text encoder; kNN on text_vec needs one")
        return np.asarray(self.text_encoder.encode(list(texts)), dtype=np.float32)

    # -------------------------------------------------------------- lists
    def first_stage(
        self,
        query: str,
        *,
        query_vector: np.ndarray | None = None,
        query_image: Any | None = None,
        filters: Filters | None = None,
        user_id: str | None = None,
        per_list: int | None = None,
        lists: Sequence[str] | None = None,
    ) -> FirstStage:
        """Run every requested list; returns the raw hits and why any list was skipped."""
        text = check_query_text(query)  # ConfigError: not a string, NUL, longer than MAX_QUERY_CHARS
        if not text and query_image is None:
            raise ConfigError("empty query: give a query text or a query image")
        k = check_size(self.config.per_list if per_list is None else per_list, "per_list")
        want = tuple(lists or self.config.lists)
        out: dict[str, tuple[Hit, ...]] = {}
        skipped: dict[str, str] = {}
        if BM25 in want:
            if text:
                out[BM25] = tuple(self.engine.bm25_search(self.index, text, size=k, fields=self.config.bm25_fields, filters=filters))
            else:
                skipped[BM25] = "no query text"
        qvec = None
        if KNN_TEXT in want or (KNN_IMAGE in want and query_image is None and self.query_to_image_space is not None):
            if text:
                qvec = query_vector if query_vector is not None else self.encode_queries([text])[0]
        if KNN_TEXT in want:
            if qvec is not None:
                out[KNN_TEXT] = tuple(self.engine.knn_search(self.index, F.TEXT_VEC, qvec, k=k, filters=filters))
            else:
                skipped[KNN_TEXT] = "no query text"
        if KNN_IMAGE in want:
            ivec, why = self._image_query(query_image, qvec)
            if ivec is not None:
                out[KNN_IMAGE] = tuple(self.engine.knn_search(self.index, F.IMAGE_VEC, ivec, k=k, filters=filters))
            else:
                skipped[KNN_IMAGE] = why
        return FirstStage(query, out, skipped, user_id)

    def _image_query(self, query_image: Any | None, qvec: np.ndarray | None) -> tuple[np.ndarray | None, str]:
        if query_image is not None:
            if self.image_encoder is None:
                return None, "a query image was given but this retriever has no image encoder"
            return np.asarray(self.image_encoder.encode([query_image]), dtype=np.float32)[0], ""
        if self.query_to_image_space is None:
            return None, "text query and no text-to-image alignment (query_to_image_space) configured"
        if qvec is None:
            return None, "no query text"
        return np.asarray(self.query_to_image_space(np.asarray(qvec, dtype=np.float32)), dtype=np.float32), ""

    # -------------------------------------------------------------- the one call
    def retrieve(
        self,
        query: str,
        *,
        query_image: Any | None = None,
        filters: Filters | None = None,
        user_id: str | None = None,
        top_n: int | None = None,
        query_vector: np.ndarray | None = None,
        with_source: bool = False,
    ) -> CandidateSet:
        """Candidates for one query: every configured list, fused, top N, with all first-stage signals."""
        cfg = self.config
        stage = self.first_stage(query, query_vector=query_vector, query_image=query_image, filters=filters, user_id=user_id)
        n = check_size(cfg.top_n if top_n is None else top_n, "top_n")
        cs = fuse_first_stage(stage, method=cfg.fusion, lists=cfg.lists, weights=cfg.weights, top_n=n, **dict(cfg.fusion_options))
        if with_source and cs.candidates:
            docs = self.engine.get(self.index, cs.ids)
            cs = CandidateSet(
                cs.query,
                tuple(Candidate(c.id, c.score, c.rank, c.signals, docs.get(c.id)) for c in cs.candidates),
                cs.lists,
                cs.skipped,
                cs.fusion,
                cs.user_id,
            )
        return cs


__all__ = [
    "BM25",
    "Candidate",
    "CandidateSet",
    "DEFAULT_TOP_N",
    "FirstStage",
    "KNN_IMAGE",
    "KNN_TEXT",
    "LISTS",
    "QueryToImageSpace",
    "RetrievalConfig",
    "Retriever",
    "fuse_first_stage",
]

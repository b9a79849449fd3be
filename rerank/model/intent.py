"""Query intent bounds taste: what the query names outranks what the shopper's history prefers.

A shopper who types "heels" wants heels, in her colours: the history may reorder the heels, it must not lift a
pair of sandals in her favourite colour above them. The fusion ranker alone does not guarantee that (on the simulated
shoppers it put a product of another type first for about one query in eight). This module adds a **bound** applied to
the model's scores, in the rerank call, in the harness and in the training verdict alike:

* **What the query names.** For each attribute of :data:`INTENT_ATTRIBUTES` (product type, colour, gender, usage) the
  vocabulary is the catalog's own values (the training index's documents), their text vectors from the same text
  encoder as the query (no word lists). The query names value ``v`` of attribute ``A`` when ``v`` is the nearest name
  (``cos(q, name_v)``, the *strength*) and the strength is at least ``min_strength``.
* **Whether a product agrees.** The product's value (:func:`product_attribute`: the catalog field today; the one
  place where a photo-predicted value can fill a gap later) agrees when its name is within ``margin`` of the
  query's nearest name (``gap = strength - cos(q, name_product) <= margin``, so "sneakers" accepts both casual and
  sports shoes when both are that near); a product without a value, or with a value the vocabulary does not know,
  neither agrees nor disagrees.
* **The bound.** A product's *tier* is the number of bounded attributes (``bound``; by default the product type only,
  see below) the query names and the product contradicts. The served order is by tier, then by the model's score:
  ``bounded = score - tier * (max - min + 1)`` over the request, so within a tier the model (and the history) decides,
  and no score lifts a product across tiers.

Only the product type bounds by default: measured on the fashion dev queries with all-MiniLM-L6-v2 (the named value is
the one every grade-2 product shares), the nearest type name is the right one for 97% of 300 queries and 99% of the
1,073 simulated shoppers' queries, while the nearest gender (0.95 where named, but indistinguishable by strength from
queries that name none) and usage (0.40) are too unreliable to bound a ranking, and colour strength overlaps between
queries that name a colour and shoppers' queries that name none (0.43-0.68 against up to 0.47): a bound there would
overrule the taste the shopper never contradicted. All four are still shown in each hit's explanation (``intent``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.errors import ConfigError, DimensionError, ModelArtifactError

log = logging.getLogger(__name__)

INTENT_VERSION = 1
#: the attributes a query can name, in this order
INTENT_ATTRIBUTES: tuple[str, ...] = (F.ARTICLE_TYPE, F.COLOUR, F.GENDER, F.USAGE)
#: where an attribute value came from
CATALOG = "catalog"


def product_attribute(doc: Mapping[str, Any] | None, name: str) -> tuple[str | None, str | None, float]:
    """``(value, source, confidence)`` of a product's attribute ``name``: the one reader of attribute values for the
    intent bound. The catalog field where it has one (``source`` ``"catalog"``, confidence 1.0), else the value
    indexing completed from the photo (``products-v4``: ``source`` ``"photo"`` with the head's confidence, see
    :func:`indexing.photo_attributes.attribute_value`); ``(None, None, 0.0)`` when the product has neither."""
    if not doc:
        return None, None, 0.0
    v = doc.get(name)
    if isinstance(v, str) and v.strip():
        return v.strip(), CATALOG, 1.0
    if doc.get(F.COMPLETED_ATTRIBUTES):
        from indexing.photo_attributes import attribute_value

        got = attribute_value(doc, name)
        if got.value is not None:
            return str(got.value).strip(), got.source, float(got.confidence)
    return None, None, 0.0


def photo_fields() -> list[str]:
    """The fields :func:`product_attribute` reads beyond the catalog's (a ``products-v4`` index has them)."""
    from indexing.photo_attributes import PHOTO_FIELDS

    return [F.COMPLETED_ATTRIBUTES, *(f for pair in PHOTO_FIELDS.values() for f in pair)]


@dataclass(frozen=True)
class IntentConfig:
    min_count: int = 1  # a value needs this many products to enter the vocabulary
    min_strength: float = 0.5  # cos(query, nearest name) from which the query names the attribute (and a bound applies)
    show_strength: float = 0.42  # from which the explanation shows the attribute (the colour names' q10 on the dev queries naming one: 0.43)
    margin: float = 0.1  # a product's value agrees within this cosine of the nearest name
    min_confidence: float = 0.5  # a value read with less confidence (a photo prediction) neither agrees nor disagrees
    bound: tuple[str, ...] = (F.ARTICLE_TYPE,)  # the attributes whose contradiction moves a product down a tier

    def __post_init__(self) -> None:
        object.__setattr__(self, "bound", tuple(self.bound))
        bad = [a for a in self.bound if a not in INTENT_ATTRIBUTES]
        if bad:
            raise ConfigError(f"intent bound attributes {bad} are not intent attributes; valid: {', '.join(INTENT_ATTRIBUTES)}")
        if self.min_count < 1 or not -1.0 <= self.show_strength <= self.min_strength <= 1.0 or self.margin < 0 or not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError(f"bad intent config {self}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bound"] = list(self.bound)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IntentConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class QueryIntent:
    """What one query names: per attribute ``(nearest name, strength, named)``, whether the explanation shows it, and
    the cosines to every name."""

    names: Mapping[str, str]
    strengths: Mapping[str, float]
    named: Mapping[str, bool]
    shown: Mapping[str, bool]
    sims: Mapping[str, np.ndarray]


@dataclass(frozen=True, eq=False)
class IntentAssessment:
    """The bound for one request's candidates (row order): ``tiers`` (n,) int, and ``explain(i)`` per candidate."""

    query: QueryIntent
    tiers: np.ndarray
    values: Mapping[str, Sequence[tuple[str | None, str | None, float]]]
    gaps: Mapping[str, np.ndarray]  # nan where the product's value is unknown
    bound: tuple[str, ...]
    margin: float

    def explain(self, i: int, model_score: float | None = None) -> dict[str, Any]:
        """The hit's ``intent`` block: its tier, its model score (before the bound) and, per attribute the query names,
        the named value, the product's value with its source and confidence, whether it agrees (None: unknown) and
        whether the attribute bounds the order (``bounds``: a bounded attribute the query names at ``min_strength``)."""
        attrs = {}
        for a, shown in self.query.shown.items():
            if not shown:
                continue
            value, source, conf = self.values[a][i]
            gap = self.gaps[a][i]
            attrs[a] = {"query": self.query.names[a], "strength": round(float(self.query.strengths[a]), 4), "product": value, "source": source,
                        "confidence": round(float(conf), 4), "agrees": None if np.isnan(gap) else bool(gap <= self.margin),
                        "bounds": a in self.bound and bool(self.query.named[a])}
        out: dict[str, Any] = {"tier": int(self.tiers[i]), "attributes": attrs}
        if model_score is not None:
            out["model_score"] = round(float(model_score), 6)
        return out

    def explain_all(self, model_scores: Sequence[float] | np.ndarray) -> list[dict[str, Any]]:
        """``[self.explain(i, model_scores[i]) for i in range(n)]``, the same dicts, built per attribute instead of per
        candidate (the rerank call explains every candidate)."""
        n = len(self.tiers)
        shown = [a for a, v in self.query.shown.items() if v]
        cols = []
        for a in shown:
            head = {"query": self.query.names[a], "strength": round(float(self.query.strengths[a]), 4)}
            bounds = a in self.bound and bool(self.query.named[a])
            g = self.gaps[a]
            agrees = np.where(np.isnan(g), None, g <= self.margin).tolist()
            cols.append([{**head, "product": v, "source": src, "confidence": round(float(c), 4), "agrees": ag, "bounds": bounds}
                         for (v, src, c), ag in zip(self.values[a], agrees)])
        ms = np.round(np.asarray(model_scores, dtype=np.float64), 6).tolist()
        tiers = self.tiers.tolist()
        return [{"tier": tiers[i], "attributes": {a: col[i] for a, col in zip(shown, cols)}, "model_score": ms[i]} for i in range(n)]


def bound_scores(scores: Sequence[float] | np.ndarray, tiers: np.ndarray) -> np.ndarray:
    """``score - tier * (max - min + 1)``: the order by tier first, then by score (ties as the scores tie). Pure."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(tiers, dtype=np.float64)
    if s.shape != t.shape:
        raise DimensionError(f"{s.shape} scores and {t.shape} tiers")
    if not len(s) or not t.any():
        return s.copy()
    return s - t * (float(s.max() - s.min()) + 1.0)


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class IntentModel:
    """Per attribute, the catalog's values and their text vectors; :meth:`assess` gives a request's tiers."""

    def __init__(self, vocabularies: Mapping[str, tuple[Sequence[str], np.ndarray]], config: IntentConfig = IntentConfig(), *,
                 report: Mapping[str, Any] | None = None):
        self.config = config
        self.names: dict[str, tuple[str, ...]] = {}
        self.vecs: dict[str, np.ndarray] = {}
        self._index: dict[str, dict[str, int]] = {}
        dims = set()
        for a, (names, vecs) in vocabularies.items():
            if a not in INTENT_ATTRIBUTES:
                raise ModelArtifactError(f"intent attribute {a!r} is not one of {', '.join(INTENT_ATTRIBUTES)}")
            v = np.asarray(vecs, dtype=np.float32)
            if v.ndim != 2 or v.shape[0] != len(names) or not len(names):
                raise ModelArtifactError(f"intent vocabulary of {a}: {len(names)} names and vectors of shape {v.shape}")
            self.names[a] = tuple(str(n) for n in names)
            self.vecs[a] = _norm(v)
            self._index[a] = {n.strip().lower(): i for i, n in enumerate(self.names[a])}
            dims.add(v.shape[1])
        if len(dims) > 1:
            raise ModelArtifactError(f"intent name vectors of different dimensions {sorted(dims)}")
        self.text_dim = dims.pop() if dims else 0
        self.report = dict(report or {})

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(a for a in INTENT_ATTRIBUTES if a in self.names)

    def vocabulary(self, attribute: str) -> Mapping[str, int]:
        """``{lower-cased name: position}`` of ``attribute``'s values (empty when the catalog had none)."""
        return self._index.get(attribute, {})

    def query_intent(self, query_vec: np.ndarray) -> QueryIntent:
        q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.text_dim:
            raise DimensionError(f"query vector has dimension {q.shape[0]}, the intent names' text space is {self.text_dim}")
        qn = _norm(q)
        names, strengths, named, shown, sims = {}, {}, {}, {}, {}
        for a in self.attributes:
            s = self.vecs[a] @ qn
            j = int(np.argmax(s))
            names[a], strengths[a], sims[a] = self.names[a][j], float(s[j]), s
            named[a] = bool(s[j] >= self.config.min_strength)
            shown[a] = bool(s[j] >= self.config.show_strength)
        return QueryIntent(names, strengths, named, shown, sims)

    def assess(self, query_vec: np.ndarray, docs: Sequence[Mapping[str, Any] | None]) -> IntentAssessment:
        """The tiers of ``docs`` (the candidates' documents, row order; None = unknown product) for this query."""
        qi = self.query_intent(query_vec)
        n = len(docs)
        tiers = np.zeros(n, dtype=np.int64)
        values: dict[str, list[tuple[str | None, str | None, float]]] = {}
        gaps: dict[str, np.ndarray] = {}
        cfg = self.config
        for a in self.attributes:
            g = np.full(n, np.nan)
            gaps[a] = g
            if not qi.shown[a]:  # not shown, so not named either: nothing to bound or show, no value read
                values[a] = ()
                continue
            vals = [product_attribute(d, a) for d in docs]
            values[a] = vals
            idx = self._index[a]
            at = np.array([idx.get(v.lower(), -1) if v is not None and conf >= cfg.min_confidence else -1 for v, _src, conf in vals], dtype=np.intp)
            known = at >= 0
            g[known] = qi.strengths[a] - qi.sims[a][at[known]].astype(np.float64)
            if a in cfg.bound and qi.named[a]:
                tiers += (g > cfg.margin)  # nan compares False: unknown values stay in their tier
        return IntentAssessment(qi, tiers, values, gaps, cfg.bound, cfg.margin)

    # -- persistence (inside the ranker artifact)
    def meta(self) -> dict[str, Any]:
        return {"version": INTENT_VERSION, "config": self.config.to_dict(), "names": {a: list(v) for a, v in self.names.items()},
                "text_dim": self.text_dim, "report": self.report}

    def tensors(self) -> dict[str, np.ndarray]:
        return {f"{a}.name_vecs": v for a, v in self.vecs.items()}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], tensors: Mapping[str, Any]) -> "IntentModel":
        if meta.get("version") != INTENT_VERSION:
            raise ModelArtifactError(f"intent block format version {meta.get('version')!r}; this code reads {INTENT_VERSION}")
        vocab = {}
        for a, names in (meta.get("names") or {}).items():
            t = tensors.get(f"{a}.name_vecs")
            if t is None:
                raise ModelArtifactError(f"intent tensor {a}.name_vecs is missing")
            vocab[a] = (names, np.asarray(t.numpy() if hasattr(t, "numpy") else t, dtype=np.float32))
        model = cls(vocab, IntentConfig.from_dict(meta.get("config") or {}), report=meta.get("report"))
        if vocab and int(meta.get("text_dim", model.text_dim)) != model.text_dim:
            raise ModelArtifactError(f"intent block says text_dim {meta.get('text_dim')}, its name vectors have {model.text_dim}")
        return model


def intent_vocabularies(docs: Iterable[Mapping[str, Any] | None], min_count: int = 1) -> dict[str, list[str]]:
    """Per attribute, the values of ``docs`` (read by :func:`product_attribute`, catalog values only) with at least
    ``min_count`` products, by count (first spelling seen of each, case-insensitive); attributes without values left out."""
    counts: dict[str, Counter[str]] = {a: Counter() for a in INTENT_ATTRIBUTES}
    spelled: dict[str, dict[str, str]] = {a: {} for a in INTENT_ATTRIBUTES}
    for d in docs:
        for a in INTENT_ATTRIBUTES:
            v, src, _ = product_attribute(d, a)
            if v is None or src != CATALOG:
                continue
            k = v.lower()
            spelled[a].setdefault(k, v)
            counts[a][k] += 1
    out = {}
    for a in INTENT_ATTRIBUTES:
        names = [spelled[a][k] for k, c in sorted(counts[a].items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
        if names:
            out[a] = names
    return out


def build_intent_model(docs: Iterable[Mapping[str, Any] | None], *, text_encoder: Any, config: IntentConfig = IntentConfig()) -> IntentModel | None:
    """The intent model of a catalog (its documents' attribute values, their names encoded by ``text_encoder``);
    None when no document has a value of any intent attribute (a catalog of titles only, e.g. Home Depot)."""
    vocab = intent_vocabularies(docs, config.min_count)
    if not vocab:
        log.info("no intent model: the catalog has no %s values", ", ".join(INTENT_ATTRIBUTES))
        return None
    vecs = {a: (names, np.asarray(text_encoder.encode([n.lower() for n in names]), dtype=np.float32)) for a, names in vocab.items()}
    report = {"values": {a: len(n) for a, n in vocab.items()}, "bound": list(config.bound)}
    log.info("intent model: %s", report)
    return IntentModel(vecs, config, report=report)


__all__ = [
    "CATALOG",
    "INTENT_ATTRIBUTES",
    "IntentAssessment",
    "IntentConfig",
    "IntentModel",
    "QueryIntent",
    "bound_scores",
    "build_intent_model",
    "intent_vocabularies",
    "product_attribute",
]

"""Query-to-attribute agreement: whether a product has the colour, type, gender and usage the query names.

The fusion ranker reads the query and the product as vectors; a product whose title lacks its colour (half of the
fashion benchmark's catalog) cannot show "black" there, while indexing may have read it off the photo
(:mod:`indexing.photo_attributes`: ``products-v4`` documents carry the completed value and the head's confidence).
These inputs hand the ranker, per attribute of :data:`rerank.model.intent.INTENT_ATTRIBUTES`, what the query names
and whether the product agrees, with where the product's value came from:

* **What the query names** is the intent model's reading (:meth:`rerank.model.intent.IntentModel.query_intent`: the
  catalog's own value names encoded by the query's text encoder; nothing is duplicated here): the *strength*
  ``max_v cos(q, name_v)`` says how strongly the query names the attribute at all.
* **The product's value** is :func:`rerank.model.intent.product_attribute`'s: the catalog field where there is one
  (``catalog``), else the value indexing completed from the photo (``photo``, with the head's confidence).
* **Agreement** of a known value ``v``: ``exp(-max(0, strength - cos(q, name_v)) / margin)``, 1 when ``v`` is the
  name nearest the query and falling off with the cosine gap at the intent model's margin (a value whose name is
  almost as near as the nearest one still mostly agrees). A value the vocabulary does not know, or a photo value below the intent model's
  ``min_confidence``, counts as unknown.

Per attribute the five columns of :data:`PER_ATTRIBUTE`: ``query_strength``, ``catalog_known``,
``catalog_agreement``, ``photo_confidence`` and ``photo_agreement`` (0 where the product's value does not come from
that source): the model learns how far to trust a photo's value against the catalog's. The feature spec's
``attributes`` names the sources read (``("catalog", "photo")``; ``"prediction"`` added also reads the photo's prediction
where indexing did not complete it, into the same photo columns; the ``fusion_no_image`` ablation reads
``("catalog",)``, so its photo columns stay 0 and the comparison isolates what the photo adds). The columns follow
the first-stage signals (and the colour head's columns); an artifact trained before them has ``attributes`` empty and
builds the same inputs as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from indexing.errors import ConfigError, DimensionError
from rerank.model.intent import CATALOG, INTENT_ATTRIBUTES, product_attribute

#: where a product's attribute value may come from: the catalog, the value indexing completed from the photo, and (opt-in)
#: the photo's prediction where indexing did not complete (below the completion threshold; its confidence says how sure)
PHOTO = "photo"
PREDICTION = "prediction"
ATTRIBUTE_SOURCES: tuple[str, ...] = (CATALOG, PHOTO, PREDICTION)
#: the columns per attribute, in this order
PER_ATTRIBUTE: tuple[str, ...] = ("query_strength", "catalog_known", "catalog_agreement", "photo_confidence", "photo_agreement")
#: every column, attribute by attribute (INTENT_ATTRIBUTES order)
ATTRIBUTE_MATCH_FEATURES: tuple[str, ...] = tuple(f"{a}_{p}" for a in INTENT_ATTRIBUTES for p in PER_ATTRIBUTE)

_NONE, _CATALOG, _PHOTO = 0, 1, 2


def check_sources(sources: Sequence[str]) -> tuple[str, ...]:
    """``sources`` as a tuple; :class:`ConfigError` naming the valid ones for an unknown source or one without ``catalog``."""
    out = tuple(sources)
    bad = [s for s in out if s not in ATTRIBUTE_SOURCES]
    if bad:
        raise ConfigError(f"unknown attribute value sources {bad}; valid: {', '.join(ATTRIBUTE_SOURCES)}")
    if out and CATALOG not in out:
        raise ConfigError(f"attribute value sources {list(out)} lack {CATALOG!r} (the photo's value only fills the catalog's gaps)")
    if PREDICTION in out and PHOTO not in out:
        raise ConfigError(f"attribute value sources {list(out)}: {PREDICTION!r} goes with {PHOTO!r}")
    return out


@dataclass(frozen=True, eq=False)
class ProductValues:
    """The query-independent half: per attribute, each candidate's value as an index into the intent vocabulary
    (-1: unknown), its source (0 none, 1 catalog, 2 photo) and confidence."""

    at: Mapping[str, np.ndarray]
    source: Mapping[str, np.ndarray]
    confidence: Mapping[str, np.ndarray]
    n: int


def product_values(intent: Any, docs: Sequence[Mapping[str, Any] | None], sources: Sequence[str]) -> ProductValues:
    """Each document's value of every intent attribute (:func:`rerank.model.intent.product_attribute`), kept only from
    ``sources``; a value the intent vocabulary lacks or a photo value below ``intent.config.min_confidence`` is unknown."""
    sources = check_sources(sources)
    n = len(docs)
    use_photo = PHOTO in sources
    use_prediction = PREDICTION in sources
    min_conf = float(intent.config.min_confidence)
    at, src, conf = {}, {}, {}
    for a in INTENT_ATTRIBUTES:
        idx = intent.vocabulary(a)
        ai = np.full(n, -1, dtype=np.intp)
        si = np.zeros(n, dtype=np.int8)
        ci = np.zeros(n, dtype=np.float32)
        if idx:
            for i, d in enumerate(docs):
                v, s, c = product_attribute(d, a)
                if v is None and use_prediction and d:
                    v, s, c = _prediction(d, a)
                if v is None:
                    continue
                if s == CATALOG:
                    kind = _CATALOG
                elif use_photo and c >= min_conf:
                    kind = _PHOTO
                else:
                    continue
                j = idx.get(v.lower(), -1)
                if j < 0:
                    continue
                ai[i], si[i], ci[i] = j, kind, c
        at[a], src[a], conf[a] = ai, si, ci
    return ProductValues(at, src, conf, n)


def _prediction(doc: Mapping[str, Any], attribute: str) -> tuple[str | None, str | None, float]:
    """The photo's predicted value of ``attribute`` stored by indexing (products-v4 ``photo_*`` fields), completed or
    not: ``(value, "photo", confidence)``, or ``(None, None, 0.0)``."""
    from indexing.photo_attributes import PHOTO_FIELDS

    vf, cf = PHOTO_FIELDS.get(attribute, (None, None))
    v = doc.get(vf) if vf else None
    if not isinstance(v, str) or not v.strip():
        return None, None, 0.0
    try:
        return v.strip(), PHOTO, float(doc.get(cf) or 0.0)
    except (TypeError, ValueError):
        return None, None, 0.0


def match_features(intent: Any, query_vec: np.ndarray, values: ProductValues) -> np.ndarray:
    """``(n, len(ATTRIBUTE_MATCH_FEATURES))`` float32: the columns of the module doc for this query. Pure."""
    q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
    if q.shape[0] != intent.text_dim:
        raise DimensionError(f"query vector has dimension {q.shape[0]}, the intent names' text space is {intent.text_dim}")
    qi = intent.query_intent(q)
    margin = max(float(intent.config.margin), 1e-6)
    out = np.zeros((values.n, len(ATTRIBUTE_MATCH_FEATURES)), dtype=np.float32)
    k = len(PER_ATTRIBUTE)
    for j, a in enumerate(INTENT_ATTRIBUTES):
        if a not in qi.sims:
            continue  # the training catalog had no value of it: the columns stay 0
        col = j * k
        strength = float(qi.strengths[a])
        out[:, col] = strength
        at, src = values.at[a], values.source[a]
        known = at >= 0
        agreement = np.zeros(values.n, dtype=np.float32)
        if known.any():
            gap = np.maximum(strength - qi.sims[a][at[known]].astype(np.float64), 0.0)
            agreement[known] = np.exp(-gap / margin)
        cat = src == _CATALOG
        photo = src == _PHOTO
        out[cat, col + 1] = 1.0
        out[cat, col + 2] = agreement[cat]
        out[photo, col + 3] = values.confidence[a][photo]
        out[photo, col + 4] = agreement[photo]
    return out


__all__ = ["ATTRIBUTE_MATCH_FEATURES", "ATTRIBUTE_SOURCES", "PER_ATTRIBUTE", "PHOTO", "PREDICTION", "ProductValues", "check_sources", "match_features", "product_values"]

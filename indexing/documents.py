"""Product -> the text the encoder embeds, a content hash, and the index document (pure functions).

The document holds only keys named in :mod:`indexing.fields` (the mapping is ``dynamic: strict``).
A product without an image is indexed without ``image_vec`` / ``image_model_id`` and with
``has_image: false``: a missing modality, not a dropped product. A re-run skips a product whose content
hash and model ids are unchanged (:func:`is_unchanged`).
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from typing import Any, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.catalog import Product
from indexing.errors import DimensionError

#: bump when the hashed content changes meaning (forces a rewrite of every document)
CONTENT_HASH_VERSION = 1
#: product fields copied into the document when present
DOC_FIELDS = (
    F.TITLE,
    F.DESCRIPTION,
    F.BRAND,
    F.CATEGORY,
    F.ATTRIBUTES,
    F.ARTICLE_TYPE,
    F.COLOUR,
    F.GENDER,
    F.USAGE,
    F.SEASON,
    F.YEAR,
    F.PRICE,
    F.RATING,
    F.POPULARITY,
)


def product_text(product: Product) -> str:
    """What the text encoder embeds: title, brand (unless the title names it), category path, attributes."""
    f = product.fields
    title = f.get(F.TITLE, "")
    parts = [title]
    brand = f.get(F.BRAND)
    if brand and brand.casefold() not in title.casefold():
        parts.append(brand)
    for name in (F.CATEGORY, F.ATTRIBUTES):
        if f.get(name):
            parts.append(f[name])
    return ". ".join(p for p in parts if p)


def _canonical(v: Any) -> Any:
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"non-finite number {v!r} in product fields")
        return float(v)
    return v


def content_hash(product: Product, image_digest: str | None) -> str:
    """sha256 (hex) over the product's normalized fields, its image reference and the image bytes' digest."""
    payload = {
        "v": CONTENT_HASH_VERSION,
        "id": product.id,
        "fields": {k: _canonical(product.fields[k]) for k in sorted(product.fields)},
        "image": product.image,
        "image_sha256": image_digest,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _vector(v: Sequence[float] | np.ndarray, name: str) -> list[float]:
    a = np.asarray(v, dtype=np.float32)
    if a.ndim != 1 or a.size == 0:
        raise DimensionError(f"{name} must be a non-empty 1-d vector, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DimensionError(f"{name} has non-finite values")
    return [float(x) for x in a]


def _epoch_seconds(t: int | float | datetime) -> int:
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValueError("indexed_at datetime must be timezone-aware")
        return int(t.timestamp())
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"indexed_at must be epoch seconds or an aware datetime, got {t!r}")
    return int(t)


def build_document(
    product: Product,
    *,
    text_vec: Sequence[float] | np.ndarray,
    image_vec: Sequence[float] | np.ndarray | None,
    text_model_id: str,
    image_model_id: str | None,
    content_hash: str,
    indexed_at: int | float | datetime,
    image_colour: Sequence[float] | np.ndarray | None = None,
    attribute_fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The index document of ``product`` (``_id`` is ``product.id``; keys from :mod:`indexing.fields` only).

    ``image_colour`` is the photo's colour descriptor (:func:`indexing.photo_colour.colour_descriptor`), given
    only for indexes whose mapping has the field (products-v3 and later); it needs an image vector.
    ``attribute_fields``: the photo attribute fields (:func:`indexing.photo_attributes.attribute_document_fields`),
    only for products-v4 and later."""
    if not text_model_id:
        raise ValueError("text_model_id is required")
    if (image_vec is None) != (image_model_id is None):
        raise ValueError("image_vec and image_model_id go together: give both or neither")
    if image_colour is not None and image_vec is None:
        raise ValueError("image_colour describes the photo: it needs image_vec")
    doc: dict[str, Any] = {F.ID: product.id}
    for name in DOC_FIELDS:
        if name in product.fields:
            doc[name] = product.fields[name]
    if product.image:
        doc[F.IMAGE] = product.image
    doc[F.HAS_IMAGE] = image_vec is not None
    doc[F.TEXT_VEC] = _vector(text_vec, F.TEXT_VEC)
    doc[F.TEXT_MODEL_ID] = text_model_id
    if image_vec is not None:
        doc[F.IMAGE_VEC] = _vector(image_vec, F.IMAGE_VEC)
        doc[F.IMAGE_MODEL_ID] = image_model_id
        if image_colour is not None:
            doc[F.IMAGE_COLOUR] = _vector(image_colour, F.IMAGE_COLOUR)
    if attribute_fields:
        doc.update(attribute_fields)
    doc[F.CONTENT_HASH] = content_hash
    doc[F.INDEXED_AT] = _epoch_seconds(indexed_at)
    return doc


def is_unchanged(
    existing_source: Mapping[str, Any] | None,
    content_hash: str,
    text_model_id: str,
    image_model_id: str | None,
    attribute_model_id: str | None = None,
) -> bool:
    """True when the stored document has this content hash and these model ids (nothing to re-encode or rewrite).
    ``attribute_model_id`` is compared only when given (an index with photo attributes and a configured model).

    ``image_model_id`` is None for a product without an image; a stored document that has an image vector
    then counts as changed (the image went away), and vice versa.
    """
    if not existing_source:
        return False
    return (
        existing_source.get(F.CONTENT_HASH) == content_hash
        and existing_source.get(F.TEXT_MODEL_ID) == text_model_id
        and existing_source.get(F.IMAGE_MODEL_ID) == image_model_id
        and (attribute_model_id is None or existing_source.get(F.ATTRIBUTE_MODEL_ID) == attribute_model_id)
    )


__all__ = ["build_document", "content_hash", "is_unchanged", "product_text", "DOC_FIELDS"]

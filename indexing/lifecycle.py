"""Index generations behind an alias: naming, creation from a mapping, and the dimension check.

An alias (``products``) points at one concrete generation (``products-20261123T171500``). Indexing
writes through the alias; the admin reindex tasks create a new generation, fill it and swap the alias.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Mapping

import mappings
from indexing import fields as F
from indexing.engines.base import SearchEngine
from indexing.errors import IndexNotFoundError, MappingError

log = logging.getLogger(__name__)
_GEN = re.compile(r"^(?P<alias>.+)-(?P<ts>\d{8}t\d{6}(?:\d{3})?)$")


def generation_name(alias: str, now: float | None = None) -> str:
    """``<alias>-<UTC timestamp>``, lowercase (OpenSearch index names must be lowercase)."""
    t = time.time() if now is None else now
    ms = int((t - int(t)) * 1000)
    return f"{alias}-{time.strftime('%Y%m%dt%H%M%S', time.gmtime(t))}{ms:03d}"


def is_generation_of(index: str, alias: str) -> bool:
    m = _GEN.match(index)
    return bool(m and m["alias"] == alias)


def load_body(mapping: str, *, text_dim: int, image_dim: int, hnsw_engine: str | None = None) -> dict[str, Any]:
    """The mapping file ``mapping`` filled with the encoders' dimensions; file problems become MappingError."""
    try:
        return mappings.load_mapping(mapping, text_dim=text_dim, image_dim=image_dim, hnsw_engine=hnsw_engine)
    except mappings.MappingFileError as e:
        raise MappingError(str(e)) from None


def check_dims(index: str, mapping_body: Mapping[str, Any], *, text_dim: int, image_dim: int) -> None:
    """Refuse an index whose ``knn_vector`` dimensions disagree with the configured encoders."""
    dims = mappings.vector_dims(dict(mapping_body))
    want = {F.TEXT_VEC: text_dim, F.IMAGE_VEC: image_dim}
    for field, d in want.items():
        have = dims.get(field)
        if have is None:
            raise MappingError(f"index {index!r} has no knn_vector field {field!r}; it was not created from a fusionrank mapping")
        if have != d:
            raise MappingError(
                f"index {index!r} stores {field} with dimension {have}, but the configured encoder produces {d}; "
                f"index into a new generation (fusionrank reindex start) or configure the encoder the index was built with"
            )


def stores_image_colour(mapping_body: Mapping[str, Any], index: str = "the index") -> bool:
    """True when a mapping has the photo colour descriptor field ``image_colour`` (products-v3 and later).

    Indexing and reindexing write the descriptor only into such indexes (older mappings are ``dynamic: strict``
    and would reject it); a field of another dimension than this code's descriptor is a MappingError."""
    from indexing.photo_colour import DIM

    spec = mappings.properties(dict(mapping_body)).get(F.IMAGE_COLOUR)
    if spec is None:
        return False
    if spec.get("type") != "knn_vector" or int(spec.get("dimension", -1)) != DIM:
        raise MappingError(f"{index} maps {F.IMAGE_COLOUR!r} as {spec.get('type')} of dimension {spec.get('dimension')}; "
                           f"this code writes a knn_vector of dimension {DIM} (mappings/products-v3.json)")
    return True


def stores_photo_attributes(mapping_body: Mapping[str, Any]) -> bool:
    """True when a mapping has the photo attribute fields (products-v4 and later): indexing then writes
    ``effective_*`` attributes for every product and the photo's predictions where an attribute model is configured."""
    props = mappings.properties(dict(mapping_body))
    return F.COMPLETED_ATTRIBUTES in props and all(f in props for f in F.EFFECTIVE_FIELDS.values())


def ensure_alias(
    engine: SearchEngine, alias: str, mapping: str, *, text_dim: int, image_dim: int, hnsw_engine: str | None = None
) -> str:
    """Return the generation behind ``alias``, creating a first generation from ``mapping`` when there is none.

    An existing generation is checked against the encoders' dimensions (MappingError on mismatch).
    """
    try:
        current = engine.get_alias(alias)
    except IndexNotFoundError:
        current = []
    if current:
        index = current[0]
        check_dims(index, engine.get_mapping(index), text_dim=text_dim, image_dim=image_dim)
        return index
    body = load_body(mapping, text_dim=text_dim, image_dim=image_dim, hnsw_engine=hnsw_engine)
    index = generation_name(alias)
    engine.create_index(index, body)
    engine.swap_alias(alias, index)
    log.info("created index generation %s from %s and pointed alias %s at it", index, mapping, alias)
    return index

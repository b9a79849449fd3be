"""Versioned index definitions (``products-v1.json``, ...) and the one function that loads them.

The JSON files are data; :func:`load_mapping` fills the ``knn_vector`` dimensions from the configured
encoders and can switch the HNSW engine (``faiss`` by default, ``lucene`` allowed).
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Any

PLACEHOLDERS = {"${text_dim}": "text_dim", "${image_dim}": "image_dim"}
#: the mapping new indexes are created from (products-v3: v1 plus the photo colour descriptor ``image_colour``)
DEFAULT_MAPPING = "products-v3"
HNSW_ENGINES = ("faiss", "lucene")
#: space types each HNSW engine accepts for our normalized vectors
SPACE_TYPES = {"faiss": ("innerproduct", "l2"), "lucene": ("cosinesimil", "innerproduct", "l2")}


class MappingFileError(ValueError):
    """A mapping file is missing or malformed (indexing maps this onto its MappingError)."""


def available() -> list[str]:
    """Names of the mapping files shipped in this package, e.g. ``["products-v1"]``."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


@lru_cache(maxsize=None)
def _raw(name: str) -> str:
    f = resources.files(__name__) / f"{name}.json"
    if not f.is_file():
        raise MappingFileError(f"no mapping named {name!r}; available mappings: {', '.join(available())}")
    return f.read_text(encoding="utf-8")


def load_mapping(name: str = DEFAULT_MAPPING, *, text_dim: int, image_dim: int, hnsw_engine: str | None = None) -> dict[str, Any]:
    """Return the index body (``settings`` + ``mappings``) of mapping ``name`` with vector dimensions filled.

    ``hnsw_engine`` overrides the file's HNSW engine (``faiss`` or ``lucene``).
    """
    for label, dim in (("text_dim", text_dim), ("image_dim", image_dim)):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise MappingFileError(f"{label} must be a positive integer, got {dim!r}")
    if hnsw_engine is not None and hnsw_engine not in HNSW_ENGINES:
        raise MappingFileError(f"unknown HNSW engine {hnsw_engine!r}; valid: {', '.join(HNSW_ENGINES)}")
    try:
        body = json.loads(_raw(name))
    except json.JSONDecodeError as e:
        raise MappingFileError(f"mapping {name!r} is not valid JSON: {e}") from None
    body.pop("_comment", None)
    dims = {"text_dim": text_dim, "image_dim": image_dim}
    props = body.get("mappings", {}).get("properties")
    if not isinstance(props, dict):
        raise MappingFileError(f"mapping {name!r} has no mappings.properties object")
    for field, spec in props.items():
        if spec.get("type") != "knn_vector":
            continue
        dim = spec.get("dimension")
        if isinstance(dim, str):
            if dim not in PLACEHOLDERS:
                raise MappingFileError(f"mapping {name!r}: field {field!r} has unknown dimension placeholder {dim!r}")
            spec["dimension"] = dims[PLACEHOLDERS[dim]]
        method = spec.setdefault("method", {})
        if hnsw_engine is not None and method.get("engine") != hnsw_engine:
            method["engine"] = hnsw_engine
            if method.get("space_type") not in SPACE_TYPES[hnsw_engine]:
                method["space_type"] = SPACE_TYPES[hnsw_engine][0]
    return body


def properties(body: dict[str, Any]) -> dict[str, Any]:
    """The field properties of a mapping in any of the shapes engines return it in:
    an index body ``{"mappings": {"properties": ...}}``, a bare ``{"properties": ...}``, or OpenSearch's
    ``GET /<index>/_mapping`` answer ``{"<index>": {"mappings": {"properties": ...}}}``."""
    if "properties" in body:
        return body["properties"]
    if "mappings" in body:
        return body["mappings"].get("properties", {})
    if len(body) == 1:
        (inner,) = body.values()
        if isinstance(inner, dict):
            return properties(inner)
    return {}


def vector_dims(body: dict[str, Any]) -> dict[str, int]:
    """``{field: dimension}`` of every ``knn_vector`` field in a mapping (any shape :func:`properties` takes)."""
    return {f: int(s["dimension"]) for f, s in properties(body).items() if s.get("type") == "knn_vector"}


def copy_mapping(body: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(body)

"""The small protocol both search engines implement, and the value types they exchange.

``OpenSearchEngine`` (opensearch-py) and ``LocalEngine`` (tantivy + numpy, embedded) implement
:class:`SearchEngine`; one test suite runs against both wherever the behaviour is meant to agree.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from indexing.errors import ConfigError


# --------------------------------------------------------------------------- JSON documents
JSON_ATOMS = (str, int, float, bool, type(None))


def copy_json(x: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, tuples, str/number/bool/None leaves), several times faster
    than :func:`copy.deepcopy` on hit sources (the reranker's responses, LocalEngine's source cache); anything
    else inside is handed to ``copy.deepcopy``."""
    t = type(x)
    if t in JSON_ATOMS:
        return x
    if t is dict:
        return {k: (v if type(v) in JSON_ATOMS else copy_json(v)) for k, v in x.items()}
    if t is list:
        return [v if type(v) in JSON_ATOMS else copy_json(v) for v in x]
    if t is tuple:
        return tuple(v if type(v) in JSON_ATOMS else copy_json(v) for v in x)
    return copy.deepcopy(x)


def array_getter(engine: Any) -> Callable[..., dict[str, dict[str, Any]]]:
    """``engine.get_arrays`` when the engine offers it (:class:`LocalEngine`: vectors as numpy rows, no list
    round trip) *and* it comes from the same class as its ``get``; otherwise ``engine.get``.

    The second condition keeps wrappers honest: a subclass or instance that overrides ``get`` (to count
    calls or inject faults) is read through that ``get``, never around it; wrappers that delegate other
    attributes with ``__getattr__`` define no ``get_arrays`` on their class and get ``get`` too."""

    def owner(name: str) -> Any:
        return next((k for k in type(engine).__mro__ if name in vars(k)), None)

    inst = getattr(engine, "__dict__", {})
    fast = owner("get_arrays")
    if fast is not None and fast is owner("get") and "get" not in inst and "get_arrays" not in inst:
        return engine.get_arrays
    return engine.get


# --------------------------------------------------------------------------- filters
@dataclass(frozen=True)
class Range:
    """A numeric range on one field; ``None`` bounds are open."""

    gte: float | None = None
    lte: float | None = None
    gt: float | None = None
    lt: float | None = None

    def contains(self, v: float | None) -> bool:
        if v is None:
            return False
        return not (
            (self.gte is not None and v < self.gte)
            or (self.lte is not None and v > self.lte)
            or (self.gt is not None and v <= self.gt)
            or (self.lt is not None and v >= self.lt)
        )

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("gte", self.gte), ("lte", self.lte), ("gt", self.gt), ("lt", self.lt)) if v is not None}


@dataclass(frozen=True)
class Filters:
    """Conjunction of exact-term filters on keyword fields and ranges on numeric fields.

    ``terms={"gender": ["Men", "Unisex"], "colour": "Black"}``: each field must match one of its values.
    ``ranges={"price": Range(lte=50)}``.
    """

    terms: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    ranges: Mapping[str, Range] = field(default_factory=dict)
    #: terms on catalog attributes (colour, article_type, gender, usage) also match values completed from the photo
    #: (the ``effective_*`` fields of a products-v4 index, :mod:`indexing.photo_attributes`)
    include_completed: bool = False

    def is_empty(self) -> bool:
        return not self.terms and not self.ranges

    def resolved(self) -> "Filters":
        """The filter the engines run: with ``include_completed``, terms on an attribute field are moved onto its
        ``effective_*`` field (the catalog's value, else the photo-completed one)."""
        if not self.include_completed:
            return self
        from indexing.fields import EFFECTIVE_FIELDS

        terms: dict[str, str | Sequence[str]] = {}
        for f, v in self.terms.items():
            target = EFFECTIVE_FIELDS.get(f, f)
            if target in terms:
                raise ConfigError(f"filters name both {f!r} and {target!r}; with include_completed give one of them")
            terms[target] = v
        return Filters(terms=terms, ranges=dict(self.ranges))

    def term_values(self) -> dict[str, list[str]]:
        return {f: ([v] if isinstance(v, (str, int, float)) else [str(x) for x in v]) for f, v in self.terms.items()}

    def matches(self, source: Mapping[str, Any]) -> bool:
        """Reference semantics, used by the LocalEngine and by tests."""
        if self.include_completed:
            return self.resolved().matches(source)
        for f, vals in self.term_values().items():
            if str(source.get(f)) not in {str(v) for v in vals}:
                return False
        for f, r in self.ranges.items():
            v = source.get(f)
            try:
                v = float(v) if v is not None else None
            except (TypeError, ValueError):
                return False
            if not r.contains(v):
                return False
        return True


# --------------------------------------------------------------------------- hits and bulk
@dataclass(frozen=True)
class Hit:
    """One search result: document id, engine score, and the stored source (``None`` when not requested)."""

    id: str
    score: float
    source: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class BulkAction:
    """Index (full replace, i.e. upsert by ``_id``) or delete one document."""

    op: Literal["index", "delete"]
    id: str
    doc: Mapping[str, Any] | None = None

    @staticmethod
    def index(id: str, doc: Mapping[str, Any]) -> "BulkAction":
        return BulkAction("index", str(id), doc)

    @staticmethod
    def delete(id: str) -> "BulkAction":
        return BulkAction("delete", str(id))


@dataclass(frozen=True)
class BulkItemResult:
    id: str
    op: str
    ok: bool
    status: int
    error: str | None = None


@dataclass(frozen=True)
class BulkSummary:
    """What one bulk call did: per-item failures with id and reason; the rest was written."""

    succeeded: int
    failed: tuple[BulkItemResult, ...]
    retried: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


# --------------------------------------------------------------------------- protocol
@runtime_checkable
class SearchEngine(Protocol):
    """Operations fusionrank needs from a search engine. ``index`` arguments accept an alias too."""

    name: str

    # lifecycle
    def create_index(self, index: str, body: Mapping[str, Any]) -> None: ...
    def delete_index(self, index: str) -> None: ...
    def index_exists(self, index: str) -> bool: ...
    def list_indices(self, prefix: str) -> list[str]: ...
    def get_mapping(self, index: str) -> dict[str, Any]: ...
    def refresh(self, index: str) -> None: ...
    def count(self, index: str) -> int: ...

    # aliases
    def get_alias(self, alias: str) -> list[str]: ...
    def swap_alias(self, alias: str, index: str) -> list[str]:
        """Point ``alias`` at ``index`` alone, atomically; returns the indices it pointed at before."""
        ...

    # documents
    def bulk(
        self,
        index: str,
        actions: Iterable[BulkAction],
        *,
        chunk_size: int = 500,
        max_chunk_bytes: int = 10 * 1024 * 1024,
        refresh: bool = False,
    ) -> BulkSummary: ...
    def get(self, index: str, ids: Sequence[str], *, fields: Sequence[str] | None = None) -> dict[str, dict[str, Any]]: ...
    def iter_documents(self, index: str, *, batch_size: int = 1000) -> Iterator[dict[str, Any]]: ...
    def iter_documents_by_id(self, index: str, *, after: str | None = None, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every document whose product id sorts strictly after ``after`` (all with None), in ascending product id
        order (Python's ``str`` order, which is the keyword's byte order). Unlike :meth:`iter_documents`, whose order
        an engine may change between two calls (OpenSearch's ``_doc`` order changes when segments merge), this order
        depends on the ids alone, so the last id seen is a cursor a later call can go on from. Each document's
        ``product_id`` must equal its id (the key must be unique); one that lacks it or differs raises
        :class:`~indexing.errors.EngineError`."""
        ...

    # search
    def bm25_search(
        self,
        index: str,
        query: str,
        *,
        size: int = 100,
        fields: Mapping[str, float] | None = None,
        filters: Filters | None = None,
        source: bool | Sequence[str] = False,
    ) -> list[Hit]: ...
    def knn_search(
        self,
        index: str,
        field: str,
        vector: Sequence[float] | np.ndarray,
        *,
        k: int = 100,
        filters: Filters | None = None,
        source: bool | Sequence[str] = False,
    ) -> list[Hit]: ...

    def close(self) -> None: ...


def as_query_vector(vector: Sequence[float] | np.ndarray, dim: int, field: str) -> np.ndarray:
    """Validate a query vector against a field's dimension (shared by both engines)."""
    from indexing.errors import DimensionError

    v = np.asarray(vector, dtype=np.float32)
    if v.ndim != 1 or v.shape[0] != dim:
        raise DimensionError(f"query vector for {field!r} has shape {tuple(v.shape)}, the mapping says dimension {dim}")
    if not np.all(np.isfinite(v)):
        raise DimensionError(f"query vector for {field!r} contains NaN or infinity")
    return v


def check_size(size: int, what: str = "size", limit: int = 10_000) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size > limit:
        raise ConfigError(f"{what} must be an integer in 0..{limit}, got {size!r}")
    return size

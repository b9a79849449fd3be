"""User profiles for ranking: the last K interacted products, weighted, joined with their vectors, cached.

What a profile holds (the choice made here):

- the user's newest ``scan_events`` events (default ``4 * k``) are read from SQL, newest first;
- they are grouped by product: each product appears once, with its **strongest event** — the event of
  the largest weight ``event_weight[type] * 0.5 ** (age_s / half_life_s)`` (defaults: view 1, click 2,
  add_to_cart 4, purchase 8; half-life 14 days) — whose type, age and weight the item carries;
- products are ordered by their most recent interaction (newest first, ties by product id) and the
  first ``k`` (default 50) are kept;
- the products' text and image vectors come from a :class:`VectorSource` (the search engine through
  :class:`EngineVectorSource`); a missing vector is a zero row with ``False`` in the modality's mask.

An unknown user (or one with no events) gets an empty profile (cold start), not an error.

Cache: :class:`ProfileService` keeps hot profiles in an LRU with a TTL. An event recorded through the
service invalidates that user's entry as soon as its batch commits, so the next profile read sees it.
Across processes (several API workers, a separate importer), the cache is invalidated only by its TTL
(default 60 s): cross-process freshness is bounded by ``ttl_s``. A process that learns of new events
by other means (a message bus) can call :meth:`ProfileService.invalidate`. Ages in a cached profile are
measured at ``as_of`` (when it was built), so they lag by at most ``ttl_s`` — small against a half-life
of days.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from indexing import fields
from indexing.engines.base import array_getter
from indexing.errors import ConfigError, DimensionError
from rerank.history.ingest import IngestSummary, import_events_file, record_events
from rerank.history.models import EVENT_TYPES
from rerank.history.store import HistoryStore

log = logging.getLogger(__name__)

DEFAULT_EVENT_WEIGHTS: Mapping[str, float] = MappingProxyType({"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0})
DEFAULT_K = 50
DEFAULT_HALF_LIFE_S = 14 * 86_400.0


@dataclass(frozen=True)
class ProfileConfig:
    """How a profile is built. ``scan_events`` bounds the SQL read (default ``4 * k``)."""

    k: int = DEFAULT_K
    half_life_s: float = DEFAULT_HALF_LIFE_S
    event_weights: Mapping[str, float] = field(default_factory=lambda: DEFAULT_EVENT_WEIGHTS)
    scan_events: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= 10_000:
            raise ConfigError(f"profile k must be an integer in 1..10000, got {self.k!r}")
        if not self.half_life_s > 0:
            raise ConfigError(f"profile half_life_s must be > 0, got {self.half_life_s!r}")
        unknown = set(self.event_weights) - set(EVENT_TYPES)
        missing = set(EVENT_TYPES) - set(self.event_weights)
        if unknown or missing:
            raise ConfigError(
                f"event_weights must give one weight per event type {list(EVENT_TYPES)}; "
                f"unknown: {sorted(unknown)}, missing: {sorted(missing)}"
            )
        if any(not (w >= 0) for w in self.event_weights.values()):
            raise ConfigError(f"event weights must be >= 0, got {dict(self.event_weights)}")
        object.__setattr__(self, "event_weights", MappingProxyType({k: float(v) for k, v in self.event_weights.items()}))
        if self.scan_events is not None and self.scan_events < self.k:
            raise ConfigError(f"scan_events ({self.scan_events}) must be >= k ({self.k})")

    @property
    def scan_limit(self) -> int:
        return self.scan_events if self.scan_events is not None else 4 * self.k


@dataclass(frozen=True)
class ProfileItem:
    """One product of a profile: its strongest event, that event's age (seconds) and weight."""

    product_id: str
    event: str
    age_s: float
    weight: float


@dataclass(frozen=True, eq=False)
class UserProfile:
    """A user's recent products, in order (newest first), with their vectors.

    ``text_vecs`` is ``(len(items), text_dim)`` float32 and ``image_vecs`` ``(len(items), image_dim)``;
    a product without a vector has a zero row and ``False`` in ``text_mask`` / ``image_mask``. The
    arrays are read-only (profiles are shared through the cache). ``as_of``: the epoch second ages are
    measured from. ``memo``: what readers derive from the profile's products and keep with it while it is
    cached (e.g. the reranker's reading of their categorical fields); per key, filled once (a dict's item
    assignment is atomic, and two threads filling the same key store the same value).
    """

    user_id: str
    items: tuple[ProfileItem, ...]
    text_vecs: np.ndarray
    text_mask: np.ndarray
    image_vecs: np.ndarray
    image_mask: np.ndarray
    as_of: float
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def is_empty(self) -> bool:
        return not self.items

    @property
    def product_ids(self) -> tuple[str, ...]:
        return tuple(i.product_id for i in self.items)

    @property
    def weights(self) -> np.ndarray:
        return np.array([i.weight for i in self.items], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.items)


# --------------------------------------------------------------------------- pure profile building
def profile_items(events: Iterable[tuple[str, str, float]], config: ProfileConfig, now: float) -> tuple[ProfileItem, ...]:
    """Group ``(product_id, type, epoch_s)`` events into the profile's items (see the module doc).

    Pure: the same events, config and ``now`` give the same items. Events in the future (tolerated by
    ingestion up to a day) count as age 0.
    """
    weights, half_life = config.event_weights, config.half_life_s
    latest: dict[str, float] = {}
    best: dict[str, tuple[float, float, str]] = {}  # product -> (weight, age, type)
    for product_id, etype, ts in events:
        age = max(0.0, now - ts)
        w = weights[etype] * 0.5 ** (age / half_life)
        if product_id not in latest or ts > latest[product_id]:
            latest[product_id] = ts
        cur = best.get(product_id)
        # the larger weight wins; at equal weight the newer (then the higher-intent) event
        if cur is None or (w, -age, EVENT_TYPES.index(etype)) > (cur[0], -cur[1], EVENT_TYPES.index(cur[2])):
            best[product_id] = (w, age, etype)
    order = sorted(latest, key=lambda p: (-latest[p], p))[: config.k]
    return tuple(ProfileItem(p, best[p][2], best[p][1], best[p][0]) for p in order)


# --------------------------------------------------------------------------- vectors
@runtime_checkable
class VectorSource(Protocol):
    """Where profile vectors come from: ``get_vectors(ids) -> {id: (text_vec | None, image_vec | None)}``.

    Ids the source does not know are left out of the answer (or map to ``(None, None)``).
    """

    text_dim: int
    image_dim: int

    def get_vectors(self, ids: Sequence[str]) -> Mapping[str, tuple[np.ndarray | None, np.ndarray | None]]: ...


def _as_vec(v: Any, dim: int, what: str) -> np.ndarray | None:
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float32)
    if a.shape != (dim,):
        raise DimensionError(f"{what} has shape {tuple(a.shape)}, expected ({dim},)")
    return a


class InMemoryVectorSource:
    """Vectors held in memory: ``{product_id: (text_vec | None, image_vec | None)}`` (tests, benchmarks, demos)."""

    def __init__(self, vectors: Mapping[str, tuple[Any, Any]], *, text_dim: int, image_dim: int):
        self.text_dim, self.image_dim = int(text_dim), int(image_dim)
        self._vectors = {
            str(pid): (_as_vec(t, self.text_dim, f"text vector of {pid!r}"), _as_vec(i, self.image_dim, f"image vector of {pid!r}"))
            for pid, (t, i) in vectors.items()
        }

    def get_vectors(self, ids: Sequence[str]) -> dict[str, tuple[np.ndarray | None, np.ndarray | None]]:
        vs = self._vectors
        return {i: vs[i] for i in ids if i in vs}

    def __len__(self) -> int:
        return len(self._vectors)


class EngineVectorSource:
    """Product vectors read from a search engine (``LocalEngine`` or ``OpenSearchEngine``) by id.

    ``engine.get(index, ids, fields=[fields.TEXT_VEC, fields.IMAGE_VEC])``; a document without an image
    vector gives ``None`` for it. Dimensions are given, or read from the index mapping.
    """

    def __init__(self, engine: Any, index: str, *, text_dim: int | None = None, image_dim: int | None = None):
        self.engine, self.index = engine, index
        if text_dim is None or image_dim is None:
            from mappings import vector_dims

            dims = vector_dims(engine.get_mapping(index))
            text_dim = dims.get(fields.TEXT_VEC) if text_dim is None else text_dim
            image_dim = dims.get(fields.IMAGE_VEC) if image_dim is None else image_dim
        if text_dim is None or image_dim is None:
            raise ConfigError(
                f"index {index!r} has no {fields.TEXT_VEC}/{fields.IMAGE_VEC} knn_vector dimension in its mapping; "
                "pass text_dim= and image_dim="
            )
        self.text_dim, self.image_dim = int(text_dim), int(image_dim)

    def get_vectors(self, ids: Sequence[str]) -> dict[str, tuple[np.ndarray | None, np.ndarray | None]]:
        if not ids:
            return {}
        getter = array_getter(self.engine)
        docs = getter(self.index, list(ids), fields=[fields.TEXT_VEC, fields.IMAGE_VEC])
        return {
            pid: (
                _as_vec(doc.get(fields.TEXT_VEC), self.text_dim, f"{fields.TEXT_VEC} of {pid!r}"),
                _as_vec(doc.get(fields.IMAGE_VEC), self.image_dim, f"{fields.IMAGE_VEC} of {pid!r}"),
            )
            for pid, doc in docs.items()
        }


def join_vectors(
    items: Sequence[ProfileItem], source: VectorSource | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(text_vecs, text_mask, image_vecs, image_mask)`` for the items, in their order (read-only arrays)."""
    n = len(items)
    td, idim = (source.text_dim, source.image_dim) if source is not None else (0, 0)
    text = np.zeros((n, td), dtype=np.float32)
    image = np.zeros((n, idim), dtype=np.float32)
    tmask = np.zeros(n, dtype=bool)
    imask = np.zeros(n, dtype=bool)
    if source is not None and n:
        found = source.get_vectors([i.product_id for i in items])
        for row, item in enumerate(items):
            t, im = found.get(item.product_id, (None, None))
            if t is not None:
                text[row] = t
                tmask[row] = True
            if im is not None:
                image[row] = im
                imask[row] = True
    for a in (text, tmask, image, imask):
        a.flags.writeable = False
    return text, tmask, image, imask


def build_profile(
    store: HistoryStore,
    user_id: str,
    vectors: VectorSource | None = None,
    config: ProfileConfig = ProfileConfig(),
    *,
    now: float | None = None,
) -> UserProfile:
    """Build a profile from SQL (no cache). ``now``: epoch seconds ages are measured from (default: now)."""
    now = time.time() if now is None else float(now)
    items = profile_items(store.recent_events(user_id, config.scan_limit), config, now)
    text, tmask, image, imask = join_vectors(items, vectors)
    return UserProfile(user_id, items, text, tmask, image, imask, now)


# --------------------------------------------------------------------------- cache + service
@dataclass(frozen=True)
class CacheInfo:
    hits: int
    misses: int
    invalidations: int
    size: int
    max_size: int
    ttl_s: float


class ProfileService:
    """Profiles with an LRU + TTL cache in front of SQL, and the write path that keeps it fresh.

    ``get_profile(user_id)`` answers from the cache when it can (warm) and builds from SQL otherwise
    (cold). ``record_events`` / ``import_file`` store events and invalidate the users that got new
    ones as each batch commits. A profile being built while its user is invalidated is not cached
    (a per-user invalidation sequence guards the race). Thread-safe. ``clock`` (epoch seconds) is
    used for ages and for the TTL; tests may pass their own.
    """

    def __init__(
        self,
        store: HistoryStore,
        vectors: VectorSource | None = None,
        *,
        config: ProfileConfig = ProfileConfig(),
        cache_size: int = 10_000,
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ):
        if cache_size < 0:
            raise ConfigError(f"cache_size must be >= 0, got {cache_size}")
        if not ttl_s >= 0:
            raise ConfigError(f"ttl_s must be >= 0, got {ttl_s}")
        self.store, self.vectors, self.config = store, vectors, config
        self.cache_size, self.ttl_s, self.clock = cache_size, float(ttl_s), clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[float, UserProfile]] = OrderedDict()  # user -> (expires_at, profile)
        self._seq = 0  # bumped by every invalidation
        self._invalidated: OrderedDict[str, int] = OrderedDict()  # user -> seq of their last invalidation
        self._invalidated_floor = 0  # highest seq forgotten from _invalidated
        self._hits = self._misses = self._invalidations = 0

    # -- reads
    def get_profile(self, user_id: str) -> UserProfile:
        """The user's profile (empty for an unknown user), from the cache when fresh."""
        now = self.clock()
        with self._lock:
            entry = self._cache.get(user_id)
            if entry is not None and entry[0] > now:
                self._cache.move_to_end(user_id)
                self._hits += 1
                return entry[1]
            if entry is not None:
                del self._cache[user_id]
            self._misses += 1
            started = self._seq
        profile = build_profile(self.store, user_id, self.vectors, self.config, now=now)
        if self.cache_size and self.ttl_s > 0:
            with self._lock:
                if started >= self._invalidated_floor and self._invalidated.get(user_id, 0) <= started:
                    self._cache[user_id] = (now + self.ttl_s, profile)
                    self._cache.move_to_end(user_id)
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        return profile

    # -- writes (these invalidate)
    def record_events(self, events: Iterable[Mapping[str, Any]], **kwargs: Any) -> IngestSummary:
        """:func:`~rerank.history.ingest.record_events` + invalidation of the users that got new events.

        The function the HTTP endpoint calls: the next :meth:`get_profile` of those users sees the events.
        """
        return record_events(self.store, events, on_stored=self.invalidate_many, **kwargs)

    def import_file(self, path: str | Path, **kwargs: Any) -> IngestSummary:
        """:func:`~rerank.history.ingest.import_events_file` + invalidation, batch by batch."""
        return import_events_file(self.store, path, on_stored=self.invalidate_many, **kwargs)

    def invalidate(self, user_id: str) -> None:
        self.invalidate_many((user_id,))

    def invalidate_many(self, user_ids: Iterable[str]) -> None:
        with self._lock:
            for u in user_ids:
                self._seq += 1
                self._invalidations += 1
                self._cache.pop(u, None)
                self._invalidated[u] = self._seq
                self._invalidated.move_to_end(u)
            limit = max(1024, 2 * self.cache_size)
            while len(self._invalidated) > limit:
                _, seq = self._invalidated.popitem(last=False)
                self._invalidated_floor = max(self._invalidated_floor, seq)

    def clear(self) -> None:
        """Drop every cached profile."""
        with self._lock:
            self._cache.clear()

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, self._invalidations, len(self._cache), self.cache_size, self.ttl_s)

"""The user-history store: SQL events (SQLite embedded, PostgreSQL in production), ingestion and profiles.

Typical use::

    from rerank.history import HistoryStore, ProfileService, EngineVectorSource, upgrade

    upgrade(url)                                   # once (``fusionrank db upgrade``)
    store = HistoryStore(url)                      # NotMigratedError if the schema is behind
    service = ProfileService(store, EngineVectorSource(engine, "products"))
    service.record_events([{"user_id": "u1", "product_id": "42", "event": "click", "timestamp": 1767225653}])
    profile = service.get_profile("u1")            # last K products, weights, vectors; cached

See :mod:`rerank.history.ingest` (validation, idempotency) and :mod:`rerank.history.profiles`
(weighting, cache and invalidation).
"""

from rerank.history.ingest import (
    IngestSummary,
    ValidEvent,
    derive_event_id,
    import_events_file,
    iter_event_file,
    parse_timestamp,
    record_events,
    validate_event,
)
from rerank.history.models import EVENT_TYPES, Event, User
from rerank.history.profiles import (
    DEFAULT_EVENT_WEIGHTS,
    CacheInfo,
    EngineVectorSource,
    InMemoryVectorSource,
    ProfileConfig,
    ProfileItem,
    ProfileService,
    UserProfile,
    VectorSource,
    build_profile,
    profile_items,
)
from rerank.history.store import (
    HistoryStore,
    current_revision,
    downgrade,
    head_revision,
    normalize_url,
    upgrade,
    with_search_path,
)

__all__ = [
    "EVENT_TYPES",
    "DEFAULT_EVENT_WEIGHTS",
    "CacheInfo",
    "EngineVectorSource",
    "Event",
    "HistoryStore",
    "InMemoryVectorSource",
    "IngestSummary",
    "ProfileConfig",
    "ProfileItem",
    "ProfileService",
    "User",
    "UserProfile",
    "ValidEvent",
    "VectorSource",
    "build_profile",
    "current_revision",
    "derive_event_id",
    "downgrade",
    "head_revision",
    "import_events_file",
    "iter_event_file",
    "normalize_url",
    "parse_timestamp",
    "profile_items",
    "record_events",
    "upgrade",
    "validate_event",
    "with_search_path",
]

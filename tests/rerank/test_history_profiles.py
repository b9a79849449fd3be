"""Profiles: ordering and weights (pure), vectors and masks, cold start, the cache and its invalidation."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from indexing.errors import ConfigError, DimensionError
from rerank.history.profiles import (
    EngineVectorSource,
    InMemoryVectorSource,
    ProfileConfig,
    ProfileItem,
    ProfileService,
    VectorSource,
    build_profile,
    join_vectors,
    profile_items,
)
from rerank.history.store import HistoryStore
from tests.rerank import history_support

# the shared fixtures (each test runs on SQLite and on PostgreSQL)
db_url = history_support.db_url
store = history_support.store

DAY = 86_400.0
NOW = datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp()


def ev(user: str, product: str, event: str, days_ago: float) -> dict:
    return {"user_id": user, "product_id": product, "event": event, "timestamp": NOW - days_ago * DAY}


class Clock:
    def __init__(self, t: float = NOW):
        self.t = t

    def __call__(self) -> float:
        return self.t


def vectors(ids: list[str], *, no_image: set[str] = frozenset(), td: int = 4, idim: int = 3) -> InMemoryVectorSource:
    rng = np.random.default_rng(0)
    return InMemoryVectorSource(
        {p: (rng.standard_normal(td), None if p in no_image else rng.standard_normal(idim)) for p in ids},
        text_dim=td,
        image_dim=idim,
    )


# --------------------------------------------------------------------------- pure
def test_items_are_products_newest_first_with_their_strongest_event() -> None:
    events = [  # newest first, as the store returns them
        ("shoe", "view", NOW - 1 * DAY),
        ("bag", "click", NOW - 2 * DAY),
        ("shoe", "purchase", NOW - 10 * DAY),
        ("hat", "view", NOW - 3 * DAY),
        ("bag", "view", NOW - 2 * DAY),
        ("shoe", "view", NOW - 40 * DAY),
    ]
    items = profile_items(events, ProfileConfig(), NOW)
    assert [i.product_id for i in items] == ["shoe", "bag", "hat"]
    shoe, bag, hat = items
    # the purchase 10 days ago (8 * 0.5**(10/14) = 4.88) beats the view yesterday (0.95)
    assert shoe.event == "purchase" and shoe.age_s == pytest.approx(10 * DAY)
    assert shoe.weight == pytest.approx(8 * 0.5 ** (10 / 14))
    assert bag.event == "click" and bag.weight == pytest.approx(2 * 0.5 ** (2 / 14))
    assert hat.weight == pytest.approx(0.5 ** (3 / 14))


def test_weights_follow_event_type_and_half_life() -> None:
    cfg = ProfileConfig(half_life_s=7 * DAY, event_weights={"view": 1, "click": 3, "add_to_cart": 5, "purchase": 10})
    items = {i.product_id: i for i in profile_items([("a", "click", NOW), ("b", "click", NOW - 7 * DAY), ("c", "purchase", NOW - 14 * DAY)], cfg, NOW)}
    assert items["a"].weight == pytest.approx(3.0)
    assert items["b"].weight == pytest.approx(1.5)  # one half-life
    assert items["c"].weight == pytest.approx(2.5)  # two half-lives
    # an event stamped slightly in the future (tolerated by ingestion) counts as age 0, not as a boost
    (f,) = profile_items([("f", "view", NOW + 3600)], cfg, NOW)
    assert f.age_s == 0 and f.weight == 1.0


def test_k_keeps_the_most_recent_products_and_ties_break_by_id() -> None:
    events = [(f"p{i:02d}", "view", NOW - i * 60) for i in range(10)] + [("b", "view", NOW - 120), ("a", "view", NOW - 120)]
    items = profile_items(sorted(events, key=lambda e: -e[2]), ProfileConfig(k=4), NOW)
    assert [i.product_id for i in items] == ["p00", "p01", "a", "b"]


def test_profile_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="k must be"):
        ProfileConfig(k=0)
    with pytest.raises(ConfigError, match="half_life_s"):
        ProfileConfig(half_life_s=0)
    with pytest.raises(ConfigError, match=r"missing: \['purchase'\]"):
        ProfileConfig(event_weights={"view": 1, "click": 2, "add_to_cart": 4})
    with pytest.raises(ConfigError, match=r"unknown: \['like'\]"):
        ProfileConfig(event_weights={"view": 1, "click": 2, "add_to_cart": 4, "purchase": 8, "like": 1})
    with pytest.raises(ConfigError, match="scan_events"):
        ProfileConfig(k=10, scan_events=5)
    assert ProfileConfig(k=10).scan_limit == 40


# --------------------------------------------------------------------------- from SQL, both databases
def test_profile_from_the_store_joins_vectors_with_masks(store: HistoryStore) -> None:
    svc = ProfileService(store, vectors(["p1", "p2", "p3"], no_image={"p2"}), clock=Clock())
    svc.record_events([ev("u1", "p1", "view", 3), ev("u1", "p2", "add_to_cart", 2), ev("u1", "p4", "click", 1), ev("u2", "p3", "view", 1)], now=datetime.fromtimestamp(NOW, timezone.utc))
    p = svc.get_profile("u1")
    assert p.product_ids == ("p4", "p2", "p1")
    assert [i.event for i in p.items] == ["click", "add_to_cart", "view"]
    assert p.weights[1] > p.weights[0] > p.weights[2]  # cart (4) > click (2) > view (1), all recent
    assert p.text_vecs.shape == (3, 4) and p.image_vecs.shape == (3, 3)
    assert p.text_mask.tolist() == [False, True, True]  # p4 is not in the vector source
    assert p.image_mask.tolist() == [False, False, True]  # p2 has no image
    assert not p.image_vecs[1].any() and not p.text_vecs[0].any()  # masked rows are zeros
    np.testing.assert_array_equal(p.text_vecs[2], svc.vectors.get_vectors(["p1"])["p1"][0])
    assert not p.text_vecs.flags.writeable  # shared through the cache
    assert p.as_of == NOW


def test_unknown_user_gets_an_empty_profile(store: HistoryStore) -> None:
    p = ProfileService(store, vectors(["p1"])).get_profile("nobody")
    assert p.is_empty and len(p) == 0 and p.items == ()
    assert p.text_vecs.shape == (0, 4) and p.image_vecs.shape == (0, 3) and p.image_mask.shape == (0,)
    q = build_profile(store, "nobody")  # no vector source at all: zero-width vectors
    assert q.is_empty and q.text_vecs.shape == (0, 0)


def test_a_new_event_invalidates_the_cached_profile_at_once(store: HistoryStore) -> None:
    clock = Clock()
    svc = ProfileService(store, vectors(["p1", "p2"]), ttl_s=3600, clock=clock)
    svc.record_events([ev("u1", "p1", "view", 1)])
    first = svc.get_profile("u1")
    assert svc.get_profile("u1") is first  # warm: from the cache
    assert svc.cache_info().hits == 1

    svc.record_events([ev("u1", "p2", "purchase", 0)])  # e.g. the HTTP endpoint
    fresh = svc.get_profile("u1")
    assert fresh.product_ids == ("p2", "p1") and fresh.items[0].event == "purchase"

    # a duplicate stores nothing and leaves the cached profile alone
    assert svc.record_events([ev("u1", "p2", "purchase", 0)]).duplicates == 1
    assert svc.get_profile("u1") is fresh


def test_events_written_elsewhere_show_up_after_the_ttl(store: HistoryStore, db_url: str) -> None:
    """Another process's writes do not reach this cache: its freshness is bounded by the TTL."""
    from rerank.history.ingest import record_events

    clock = Clock()
    svc = ProfileService(store, None, ttl_s=60, clock=clock)
    svc.record_events([ev("u1", "p1", "view", 1)])
    assert svc.get_profile("u1").product_ids == ("p1",)
    with HistoryStore(db_url) as other:  # as another process would
        record_events(other, [ev("u1", "p2", "click", 0)])
    assert svc.get_profile("u1").product_ids == ("p1",)  # stale, within the TTL
    clock.t += 61
    assert svc.get_profile("u1").product_ids == ("p2", "p1")
    svc.record_events([ev("u2", "p1", "view", 1)])
    svc.invalidate("u1")  # what a cross-process notifier would call
    assert svc.cache_info().invalidations == 3


def test_a_profile_built_while_its_user_is_invalidated_is_not_cached(store: HistoryStore) -> None:
    class InvalidatingSource(InMemoryVectorSource):
        """Simulates a write landing while the profile is being built (between the SQL read and the cache)."""

        service: ProfileService | None = None

        def get_vectors(self, ids):  # noqa: ANN001, ANN201
            if self.service is not None:
                self.service.invalidate("u1")
                self.service = None
            return super().get_vectors(ids)

    src = InvalidatingSource({"p1": (np.ones(2), None)}, text_dim=2, image_dim=2)
    svc = ProfileService(store, src, ttl_s=3600)
    svc.record_events([ev("u1", "p1", "view", 1)])
    src.service = svc
    svc.get_profile("u1")
    assert svc.cache_info().size == 0  # the possibly stale profile was not kept
    svc.get_profile("u1")
    assert svc.cache_info().size == 1


def test_cache_is_lru_bounded_and_thread_safe(store: HistoryStore) -> None:
    svc = ProfileService(store, None, cache_size=2, ttl_s=3600)
    svc.record_events([ev(f"u{i}", "p1", "view", 1) for i in range(3)])
    a = svc.get_profile("u0")
    svc.get_profile("u1")
    assert svc.get_profile("u0") is a  # u0 is now the most recent
    svc.get_profile("u2")  # evicts u1
    assert svc.cache_info().size == 2
    misses = svc.cache_info().misses
    svc.get_profile("u0")
    assert svc.cache_info().misses == misses
    svc.get_profile("u1")
    assert svc.cache_info().misses == misses + 1

    errors: list[BaseException] = []

    def hammer(n: int) -> None:
        try:
            for i in range(60):
                svc.get_profile(f"u{(i + n) % 3}")
                if i % 10 == 0:
                    svc.record_events([ev(f"u{n % 3}", f"x{n}-{i}", "click", 0)])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # after the storm, every profile agrees with SQL
    for u in ("u0", "u1", "u2"):
        assert svc.get_profile(u).product_ids == build_profile(store, u).product_ids


def test_in_memory_source_checks_dimensions() -> None:
    with pytest.raises(DimensionError, match=r"text vector of 'p1' has shape \(3,\), expected \(4,\)"):
        InMemoryVectorSource({"p1": (np.ones(3), None)}, text_dim=4, image_dim=2)


def test_engine_vector_source_over_the_local_engine(tmp_path: Path) -> None:
    from indexing.engines import local
    from indexing import fields
    from indexing.engines import BulkAction
    from mappings import load_mapping

    engine = local.LocalEngine(path=tmp_path / "engine")
    engine.create_index("products-test", load_mapping("products-v1", text_dim=4, image_dim=3))
    docs = {
        "p1": {fields.ID: "p1", fields.TITLE: "red shoe", fields.TEXT_VEC: [1, 0, 0, 0], fields.IMAGE_VEC: [0, 1, 0]},
        "p2": {fields.ID: "p2", fields.TITLE: "bag", fields.TEXT_VEC: [0, 1, 0, 0]},
    }
    engine.bulk("products-test", [BulkAction.index(k, v) for k, v in docs.items()], refresh=True)
    src = EngineVectorSource(engine, "products-test")
    assert (src.text_dim, src.image_dim) == (4, 3)
    got = src.get_vectors(["p1", "p2", "p3"])
    assert set(got) == {"p1", "p2"}
    np.testing.assert_allclose(got["p1"][0], [1, 0, 0, 0])
    np.testing.assert_allclose(got["p1"][1], [0, 1, 0])
    assert got["p2"][1] is None
    assert isinstance(src, VectorSource)
    items = (ProfileItem("p2", "view", 0.0, 1.0), ProfileItem("p1", "click", 0.0, 2.0), ProfileItem("p3", "view", 0.0, 1.0))
    text, tmask, image, imask = join_vectors(items, src)
    assert tmask.tolist() == [True, True, False] and imask.tolist() == [False, True, False]
    engine.close()

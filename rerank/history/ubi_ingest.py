"""Import of UBI 1.3 search logs into the history store (migration 0004), idempotently.

``import_ubi(store, records)`` takes ``(source, line, record)`` triples (from files:
:func:`rerank.history.ubi.iter_records`; from a cluster: :func:`iter_opensearch_records`) and stores,
in batches of ``batch_size`` (the searches, their shown lists and the events of a batch in one transaction; the
history rows ``batch_size`` at a time; bulk writes):

- each search into ``ubi_queries`` and what it showed, position by position, into ``ubi_shown``;
- every valid event into ``ubi_events`` (its id derived from its content, so re-importing stores
  nothing twice);
- events with a ``user_id`` whose action is a history event (view, click, add_to_cart, purchase) and
  that name a product also into ``events`` (same id), so they feed that user's profile as the CSV
  events do.

Bad input never stops an import: a malformed line is rejected with its source, line number and
reason (and counted); an event whose ``query_id`` is neither in this import nor in the store is stored
and counted as orphaned (the click models leave it out); an event without a position is stored and
counted (not used for position bias); a timestamp more than a day ahead is rejected; with
``catalog_ids``, an event on a product the catalog does not have is stored, counted, and does not
feed a profile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Collection, Iterable, Iterator

from rerank.history import ubi
from rerank.history.store import HistoryStore

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 20_000
DEFAULT_MAX_ERRORS = 1000

#: positions as text, so that a shown row is three strings (the COPY fast path); the column is an integer
_POS = [str(i + 1) for i in range(10_000)]
_Q_COLS = ("query_id", "user_query", "client_id", "user_id", "application", "ts", "hits")
_S_COLS = ("query_id", "position", "product_id")
#: the ubi_events columns in the order of :class:`rerank.history.ubi.UbiEvent`'s fields (an event is its own row)
_E_COLS = ("event_id", "action_name", "ts", "query_id", "object_id", "position", "client_id", "user_id", "session_id", "application")


@dataclass
class UbiSummary:
    queries_stored: int = 0
    queries_duplicate: int = 0
    events_stored: int = 0
    events_duplicate: int = 0
    history_events_stored: int = 0
    rejected: int = 0
    orphaned: int = 0
    without_position: int = 0
    unknown_products: int = 0
    errors: list[tuple[str, int, str]] = field(default_factory=list)
    max_errors: int = DEFAULT_MAX_ERRORS

    def reject(self, source: str, line: int, reason: str) -> None:
        self.rejected += 1
        if len(self.errors) < self.max_errors:
            self.errors.append((source, line, reason))

    def to_dict(self, max_errors: int = 100) -> dict[str, Any]:
        return {
            "queries_stored": self.queries_stored,
            "queries_duplicate": self.queries_duplicate,
            "events_stored": self.events_stored,
            "events_duplicate": self.events_duplicate,
            "history_events_stored": self.history_events_stored,
            "rejected": self.rejected,
            "orphaned_events": self.orphaned,
            "events_without_position": self.without_position,
            "unknown_products": self.unknown_products,
            "errors": [{"source": s, "line": n, "reason": r} for s, n, r in self.errors[:max_errors]],
        }


def import_ubi(
    store: HistoryStore,
    records: Iterable[tuple[str, int, Any]],
    *,
    catalog_ids: Collection[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_errors: int = DEFAULT_MAX_ERRORS,
    now: datetime | None = None,
    on_stored: Callable[[set[str]], None] | None = None,
    epoch_ms_timestamps: bool = False,
) -> UbiSummary:
    """Validate and store a UBI log; see the module doc. ``on_stored(user_ids)``: users whose history got
    new events (the profile cache drops them). ``epoch_ms_timestamps``: also accept numeric epoch
    milliseconds (as OpenSearch's UBI plugin stores them)."""
    now = now or datetime.now(timezone.utc)
    summary = UbiSummary(max_errors=max_errors)
    seen_queries: set[str] = set()  # query ids of this import
    q_batch: dict[str, ubi.UbiQuery] = {}
    e_batch: dict[str, ubi.UbiEvent] = {}
    texts: dict[str, str] = {}
    history_actions = ubi.HISTORY_ACTIONS

    h_batch: list[dict[str, Any]] = []  # history rows, written batch_size at a time (they land in the big events table)

    def flush_history() -> None:
        if not h_batch:
            return
        stored = store.insert_events(h_batch)
        summary.history_events_stored += len(stored)
        if on_stored is not None and stored:
            by_id = {h["event_id"]: h["user_id"] for h in h_batch}
            on_stored({by_id[i] for i in stored})
        h_batch.clear()

    def flush() -> None:
        """The batch's searches, what they showed and its events: one transaction. Their history rows wait in
        ``h_batch`` until batch_size of them are there (or the end): each transaction into the events table rewrites
        most of its index pages (random ids), so a few large ones cost less than one per batch (a re-import after a
        crash stores what is missing: every write is idempotent)."""
        if not q_batch and not e_batch:
            return
        qs, evs = list(q_batch.values()), list(e_batch.values())
        tables: list[tuple[str, tuple[str, ...], Any]] = []
        if qs:
            tables.append(("ubi_queries", _Q_COLS, [(q.query_id, q.user_query, q.client_id, q.user_id, q.application, q.ts, len(q.hit_ids)) for q in qs]))
            tables.append(("ubi_shown", _S_COLS, [(q.query_id, _POS[i], pid) for q in qs for i, pid in enumerate(q.hit_ids)]))
        hist = h_batch
        if evs:
            unknown_q = {e.query_id for e in evs} - seen_queries
            unknown_q.discard(None)  # type: ignore[arg-type]
            known = store.known_query_ids(sorted(unknown_q)) if unknown_q else set()  # searches of earlier imports
            orphaned = without_position = unknown_products = 0
            for eid, action, ts, qid, oid, pos, _cid, uid, sid, _app in evs:
                if qid is not None and qid not in seen_queries and qid not in known:
                    orphaned += 1
                if pos is None:
                    without_position += 1
                bad_product = catalog_ids is not None and oid is not None and oid not in catalog_ids
                if bad_product:
                    unknown_products += 1
                htype = history_actions.get(action)
                if htype and uid and oid and not bad_product and len(uid) <= 128 and len(oid) <= 128:
                    hist.append({"event_id": eid, "user_id": uid, "product_id": oid, "type": htype, "ts": ts, "session_id": sid,
                                 "query": texts.get(qid or "")})
            summary.orphaned += orphaned
            summary.without_position += without_position
            summary.unknown_products += unknown_products
            tables.append(("ubi_events", _E_COLS, evs))  # a UbiEvent is a row in _E_COLS's order
        counts, _ = store.insert_ubi_batch(tables)
        if qs:
            summary.queries_stored += counts[0]
            summary.queries_duplicate += len(qs) - counts[0]
        if evs:
            summary.events_stored += counts[-1]
            summary.events_duplicate += len(evs) - counts[-1]
        q_batch.clear()
        e_batch.clear()
        if len(h_batch) >= batch_size:
            flush_history()

    validate_event, validate_query, unreadable, kind_of = ubi.validate_event, ubi.validate_query, ubi.Unreadable, ubi.kind_of
    for source, line, rec in records:
        if type(rec) is not dict and isinstance(rec, unreadable):
            summary.reject(source, line, rec.reason)
            continue
        if epoch_ms_timestamps and isinstance(rec, dict) and isinstance(rec.get("timestamp"), (int, float)) and not isinstance(rec.get("timestamp"), bool):
            rec = {**rec, "timestamp": datetime.fromtimestamp(rec["timestamp"] / 1000, timezone.utc).isoformat()}
        try:
            if kind_of(rec) == "event":
                e = validate_event(rec, now=now)
                if e[0] in e_batch:
                    summary.events_duplicate += 1
                    continue
                e_batch[e[0]] = e
                if len(e_batch) >= batch_size:
                    flush()
            else:
                q = validate_query(rec, now=now)
                if q.query_id in q_batch or q.query_id in seen_queries:
                    summary.queries_duplicate += 1
                    continue
                seen_queries.add(q.query_id)
                texts[q.query_id] = q.user_query
                q_batch[q.query_id] = q
                if len(q_batch) >= batch_size:
                    flush()
        except ubi.UbiRejected as err:
            summary.reject(source, line, str(err))
    flush()
    flush_history()
    if summary.events_stored >= 10_000:
        store.analyze()
    log.info("UBI import: %s", {k: v for k, v in summary.to_dict(0).items() if k != "errors"})
    return summary


def import_ubi_path(store: HistoryStore, path: Any, **kwargs: Any) -> UbiSummary:
    """A UBI log file or folder (``.jsonl`` / ``.jsonl.gz``; queries files first)."""
    return import_ubi(store, ubi.iter_records(path), **kwargs)


def iter_opensearch_records(client: Any, *, queries_index: str = "ubi_queries", events_index: str = "ubi_events",
                            page: int = 2000) -> Iterator[tuple[str, int, Any]]:
    """``(index, n, _source)`` of every document of a cluster's UBI indices (queries first), by scroll.
    A missing index yields nothing (a cluster may have logged no events yet)."""
    from opensearchpy import helpers
    from opensearchpy.exceptions import NotFoundError

    for index in (queries_index, events_index):
        try:
            if not client.indices.exists(index=index):
                log.warning("UBI import: the cluster has no index %r", index)
                continue
            for n, hit in enumerate(helpers.scan(client, index=index, query={"query": {"match_all": {}}}, size=page, preserve_order=False), start=1):
                yield index, n, hit.get("_source", {})
        except NotFoundError:
            log.warning("UBI import: the cluster has no index %r", index)

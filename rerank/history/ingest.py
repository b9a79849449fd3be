"""Event ingestion: validation, idempotent batched writes, and the streaming bulk import of files.

Entry points:

- :func:`record_events` — events as dicts (the Python API and the function the HTTP endpoint calls);
- :func:`import_events_file` — a CSV or JSONL file (optionally ``.gz``), streamed in batches.

Both return one :class:`IngestSummary` (stored / duplicates / rejected with reasons). An event has
``user_id``, ``product_id``, ``event`` (or ``type``) in :data:`~rerank.history.models.EVENT_TYPES`,
``timestamp`` (or ``ts``: epoch seconds, ISO 8601, or a datetime; naive values are taken as UTC) and
optionally ``event_id``, ``session_id``, ``query``. A bad event is rejected with its row and reason;
the rest are stored.

Idempotency: the event id is the key (``INSERT ... ON CONFLICT DO NOTHING``). When the producer gives
no ``event_id``, it is derived from the natural key ``(user_id, product_id, event, timestamp)`` by
:func:`derive_event_id`, so re-importing the same file stores nothing twice. Two events with the same
natural key (same user, product, type and microsecond) are therefore one event. An event whose id is
stored already counts as a duplicate even if its other fields differ (the first write wins).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping

from indexing.errors import ConfigError
from rerank.history.models import EVENT_TYPES, MAX_EVENT_ID_LEN, MAX_ID_LEN, MAX_QUERY_LEN
from rerank.history.store import HistoryStore

log = logging.getLogger(__name__)

#: Events further than this in the future are rejected (clock skew up to a day is tolerated).
MAX_FUTURE = timedelta(days=1)
#: Default number of events per write transaction (large batches amortise the random index-page
#: writes of each commit; 20k validated events take about 10 MB of memory).
DEFAULT_BATCH_SIZE = 20_000
#: After storing at least this many events in one call, refresh the database's planner statistics.
ANALYZE_AFTER = 10_000
#: Default cap on the (row, reason) pairs kept in a summary; ``rejected`` always counts them all.
DEFAULT_MAX_ERRORS = 1000

_EVENT_SET = frozenset(EVENT_TYPES)
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_REQUIRED_COLUMNS = ("user_id", "product_id", "timestamp|ts", "event|type")


@dataclass(frozen=True)
class IngestSummary:
    """What one ingestion did. ``errors`` holds ``(row, reason)`` pairs (row: the file's line number,
    or the index in the list given to :func:`record_events`), at most ``max_errors`` of them;
    ``rejected`` counts every rejected event."""

    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: tuple[tuple[int, str], ...] = ()

    @property
    def total(self) -> int:
        return self.stored + self.duplicates + self.rejected

    def to_dict(self, max_errors: int = 100) -> dict[str, Any]:
        """``{"stored", "duplicates", "rejected", "errors": [{"row", "reason"}, ...]}`` with the errors capped."""
        return {
            "stored": self.stored,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "errors": [{"row": row, "reason": reason} for row, reason in self.errors[:max_errors]],
        }


@dataclass(frozen=True)
class ValidEvent:
    """A validated event, ready to store (``ts`` is an aware UTC datetime)."""

    event_id: str
    user_id: str
    product_id: str
    type: str
    ts: datetime
    session_id: str | None = None
    query: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "product_id": self.product_id,
            "type": self.type,
            "ts": self.ts,
            "session_id": self.session_id,
            "query": self.query,
        }


class EventRejected(ValueError):
    """Why one event was rejected (recorded in the summary; the batch goes on)."""


# --------------------------------------------------------------------------- validation (pure)
def derive_event_id(user_id: str, product_id: str, event_type: str, ts: datetime) -> str:
    """The deterministic id of an event given without one.

    ``sha256("<user_id>\\x1f<product_id>\\x1f<event>\\x1f<UTC epoch microseconds>")``, first 32 hex
    characters (128 bits). Same natural key, same id: re-imports are skipped as duplicates.
    """
    us = _epoch_us(ts)
    key = "\x1f".join((user_id, product_id, event_type, str(us)))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)


def _epoch_us(ts: datetime) -> int:
    return (ts - _EPOCH) // _ONE_US


def parse_timestamp(value: Any) -> datetime:
    """Epoch seconds (number or numeric string), ISO 8601 string, or datetime -> aware UTC datetime.

    Naive ISO strings and datetimes are taken as UTC. Raises :class:`EventRejected` with the reason.
    """
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    if isinstance(value, bool) or value is None:
        raise EventRejected("missing timestamp" if value is None else f"unparseable timestamp {value!r}")
    if isinstance(value, (int, float)):
        return _from_epoch(float(value), value)
    if isinstance(value, str):
        s = value.strip()
        if not s:
            raise EventRejected("missing timestamp")
        if _NUMBER.fullmatch(s):
            return _from_epoch(float(s), value)
        try:
            ts = datetime.fromisoformat(s)
        except ValueError:
            raise EventRejected(f"unparseable timestamp {value!r} (expected epoch seconds or ISO 8601)") from None
        return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)
    raise EventRejected(f"unparseable timestamp {value!r} (expected epoch seconds or ISO 8601)")


def _from_epoch(seconds: float, raw: Any) -> datetime:
    if not math.isfinite(seconds):
        raise EventRejected(f"unparseable timestamp {raw!r}")
    try:
        return _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        raise EventRejected(f"timestamp {raw!r} is out of range (epoch seconds expected, not milliseconds)") from None


def _text(raw: Mapping[str, Any], key: str, *, required: bool, max_len: int) -> str | None:
    v = raw.get(key)
    if type(v) is str:  # the common case first
        s = v.strip()
    elif v is None:
        s = ""
    elif isinstance(v, int) and not isinstance(v, bool):
        s = str(v)
    else:
        raise EventRejected(f"{key} must be a string, got {type(v).__name__}")
    if not s:
        if required:
            raise EventRejected(f"missing {key}")
        return None
    if len(s) > max_len:
        raise EventRejected(f"{key} is longer than {max_len} characters")
    return s


def validate_event(raw: Any, *, now: datetime) -> ValidEvent:
    """Check one event and normalise it; raises :class:`EventRejected` naming the problem."""
    if type(raw) is not dict and not isinstance(raw, Mapping):
        raise EventRejected(f"an event must be an object, got {type(raw).__name__}")
    user_id = _text(raw, "user_id", required=True, max_len=MAX_ID_LEN)
    product_id = _text(raw, "product_id", required=True, max_len=MAX_ID_LEN)
    etype = raw.get("event")
    if etype is None:
        etype = raw.get("type")
    if etype not in _EVENT_SET:
        if etype is None or (isinstance(etype, str) and not etype.strip()):
            raise EventRejected("missing event type")
        if not isinstance(etype, str) or etype.strip() not in _EVENT_SET:
            raise EventRejected(f"unknown event type {etype!r}; valid: {', '.join(EVENT_TYPES)}")
        etype = etype.strip()
    ts_raw = raw.get("timestamp")
    ts = parse_timestamp(raw.get("ts") if ts_raw is None else ts_raw)
    if ts > now + MAX_FUTURE:
        hint = " (epoch seconds expected, not milliseconds)" if ts > now + timedelta(days=5 * 365) else ""
        raise EventRejected(f"timestamp {ts.isoformat()} is in the future (more than {MAX_FUTURE} after {now.isoformat()}){hint}")
    session_id = _text(raw, "session_id", required=False, max_len=MAX_ID_LEN)
    query = _text(raw, "query", required=False, max_len=MAX_QUERY_LEN)
    event_id = _text(raw, "event_id", required=False, max_len=MAX_EVENT_ID_LEN)
    assert user_id is not None and product_id is not None
    if event_id is None:
        event_id = derive_event_id(user_id, product_id, etype, ts)
    return ValidEvent(event_id, user_id, product_id, etype, ts, session_id, query)


# --------------------------------------------------------------------------- batched writes
@dataclass
class _Tally:
    max_errors: int
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)

    def reject(self, row: int, reason: str) -> None:
        self.rejected += 1
        if len(self.errors) < self.max_errors:
            self.errors.append((row, reason))

    def summary(self) -> IngestSummary:
        return IngestSummary(self.stored, self.duplicates, self.rejected, tuple(self.errors))


def ingest(
    store: HistoryStore,
    numbered_events: Iterable[tuple[int, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_errors: int = DEFAULT_MAX_ERRORS,
    now: datetime | None = None,
    on_stored: Callable[[set[str]], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Validate and store ``(row, event)`` pairs in batches of ``batch_size`` (one transaction each).

    ``on_stored(user_ids)`` is called after each committed batch with the users that got new events
    (the profile cache invalidates them); ``on_batch(n)`` with the number of events handled.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    now = now or datetime.now(timezone.utc)
    tally = _Tally(max_errors)
    batch: dict[str, ValidEvent] = {}
    handled = 0

    def flush() -> None:
        nonlocal handled
        if not batch:
            return
        stored_ids = store.insert_events([e.as_row() for e in batch.values()])
        tally.stored += len(stored_ids)
        tally.duplicates += len(batch) - len(stored_ids)
        if on_stored is not None and stored_ids:
            on_stored({batch[i].user_id for i in stored_ids})
        if on_batch is not None:
            on_batch(handled)
        handled = 0
        batch.clear()

    for row, raw in numbered_events:
        handled += 1
        if isinstance(raw, _Unreadable):
            tally.reject(row, raw.reason)
            continue
        try:
            ev = validate_event(raw, now=now)
        except EventRejected as e:
            tally.reject(row, str(e))
            continue
        if ev.event_id in batch:
            tally.duplicates += 1  # the same event twice in one batch
            continue
        batch[ev.event_id] = ev
        if len(batch) >= batch_size:
            flush()
    flush()
    if tally.stored >= ANALYZE_AFTER:
        store.analyze()  # a bulk load changes the table's statistics: let the planner know now
    summary = tally.summary()
    log.info("ingested events: stored=%d duplicates=%d rejected=%d", summary.stored, summary.duplicates, summary.rejected)
    return summary


def record_events(
    store: HistoryStore,
    events: Iterable[Mapping[str, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_errors: int = DEFAULT_MAX_ERRORS,
    now: datetime | None = None,
    on_stored: Callable[[set[str]], None] | None = None,
) -> IngestSummary:
    """Validate and store events given as dicts; errors name each rejected event by its 0-based index.

    This is the function the HTTP endpoint calls (through :meth:`ProfileService.record_events`, which
    also invalidates the cached profiles of the users concerned).
    """
    return ingest(store, enumerate(events), batch_size=batch_size, max_errors=max_errors, now=now, on_stored=on_stored)


# --------------------------------------------------------------------------- files
@dataclass(frozen=True)
class _Unreadable:
    reason: str


class _CountingReader(io.RawIOBase):
    """Counts the bytes read from a binary file (for a byte-based progress bar)."""

    def __init__(self, f: BinaryIO, on_bytes: Callable[[int], None]):
        self._f, self._on_bytes = f, on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)  # type: ignore[attr-defined]
        if n:
            self._on_bytes(n)
        return n or 0


def _file_format(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".csv",):
        return "csv", gz
    if ext in (".jsonl", ".ndjson"):
        return "jsonl", gz
    raise ConfigError(f"events file {path} must end in .csv, .jsonl or .ndjson (optionally .gz)")


def iter_event_file(path: str | Path, *, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
    """Stream ``(line number, event dict)`` from a CSV (with a header) or JSONL file.

    A line that is not valid JSON, or not an object, is yielded as an unreadable record (rejected later
    with its line number). A missing file or an unknown extension raises :class:`ConfigError` at once;
    a CSV header without the required columns raises it on the first read.
    """
    path = Path(path)
    fmt, gz = _file_format(path)
    if not path.is_file():
        raise ConfigError(f"events file {path} does not exist")
    return _stream(path, fmt, gz, on_bytes)


def _stream(path: Path, fmt: str, gz: bool, on_bytes: Callable[[int], None] | None) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as raw:
        binary: BinaryIO = io.BufferedReader(_CountingReader(raw, on_bytes)) if on_bytes else raw  # type: ignore[assignment]
        if gz:
            binary = gzip.GzipFile(fileobj=binary)  # type: ignore[assignment]
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="" if fmt == "csv" else None)
        try:
            if fmt == "csv":
                yield from _iter_csv(text, path)
            else:
                yield from _iter_jsonl(text)
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
            raise ConfigError(f"cannot read events file {path}: {e}") from e


def _iter_csv(text: io.TextIOWrapper, path: Path) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(text)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in _REQUIRED_COLUMNS if not any(alt in header for alt in c.split("|"))]
    if missing:
        raise ConfigError(f"events file {path} has no column {' / '.join(missing)}; its header is {header}")
    for rec in reader:
        if None in rec:
            yield reader.line_num, _Unreadable(f"{len(header) + len(rec[None])} fields, the header has {len(header)}")  # type: ignore[index]
            continue
        yield reader.line_num, rec


def _iter_jsonl(text: io.TextIOWrapper) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, _Unreadable(f"invalid JSON: {e.msg} at column {e.colno}")
            continue
        yield n, obj if isinstance(obj, dict) else _Unreadable(f"expected a JSON object, got {type(obj).__name__}")


def import_events_file(
    store: HistoryStore,
    path: str | Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_errors: int = DEFAULT_MAX_ERRORS,
    progress: bool | None = None,
    now: datetime | None = None,
    on_stored: Callable[[set[str]], None] | None = None,
) -> IngestSummary:
    """Stream a CSV/JSONL events file into the store in batches; errors carry the file's line numbers.

    ``progress``: a byte-based progress bar on stderr; ``None`` shows it only when stderr is a TTY.
    """
    path = Path(path)
    events = iter_event_file(path)  # checks the file name and existence before anything is written
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return ingest(store, events, batch_size=batch_size, max_errors=max_errors, now=now, on_stored=on_stored)
    from tqdm import tqdm

    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"importing {path.name}", file=sys.stderr) as bar:
        return ingest(
            store,
            iter_event_file(path, on_bytes=bar.update),
            batch_size=batch_size,
            max_errors=max_errors,
            now=now,
            on_stored=on_stored,
        )

"""User Behavior Insights (UBI 1.3) search logs: reading, validation, and normalised records.

A UBI log has two kinds of record (``../shared/ubi-spec/schema-1.3.0``):

- a **query** (``query.request.schema.json``): ``user_query`` (required), ``query_id``, ``client_id``,
  ``timestamp``, ``query_response_hit_ids`` (the products shown, in order), ``query_attributes`` ...;
- an **event** (``event.schema.json``): ``action_name`` and ``timestamp`` (required), ``query_id``,
  ``client_id``, ``user_id``, ``session_id``, ``event_attributes.object.object_id`` (the product) and
  ``event_attributes.position.ordinal`` (1-based position on the result page).

Validation follows the schemas field by field (types, ``maxLength``, required keys), with two
readings stated here: the 1.3 event schema's ``action_name`` ``oneOf`` is read as ``anyOf`` (both of
its branches match every standard name, so ``oneOf`` would reject ``click`` itself), and an event
whose ``position`` is missing or has neither ``ordinal`` nor ``xy`` is **kept** (the schema requires
it) with no position: it is stored, and never used to estimate position bias. A test checks this
validator against ``jsonschema`` (Draft 2020-12) on the shipped schemas with these two changes.
The check is hand-written rather than ``jsonschema`` itself because it runs per event on imports of
hundreds of thousands of events (about 2 us an event instead of about 100 us).

Other rules: a timestamp more than a day in the future is rejected; a naive ISO timestamp is UTC
(the schema's examples include one). A query given without ``query_id`` gets a derived one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

from indexing.errors import ConfigError

#: Events and queries further than this in the future are rejected (clock skew up to a day is tolerated).
MAX_FUTURE = timedelta(days=1)
#: The standard ``action_name`` values of UBI 1.3 (others are accepted: the schema's second branch).
STANDARD_ACTIONS = ("add_to_cart", "click", "watch", "view", "purchase", "impression")
#: UBI actions that feed a user's history profile, and the history event type each becomes.
HISTORY_ACTIONS = {"view": "view", "click": "click", "add_to_cart": "add_to_cart", "purchase": "purchase"}


class UbiRejected(ValueError):
    """Why one UBI record was rejected."""


class UbiQuery(NamedTuple):  # NamedTuple: built once per record on imports of 100,000s (a frozen dataclass costs ~1 us more)
    query_id: str
    user_query: str
    ts: datetime | None
    client_id: str | None
    user_id: str | None
    application: str | None
    hit_ids: tuple[str, ...]


class UbiEvent(NamedTuple):
    event_id: str
    action: str
    ts: datetime
    query_id: str | None
    object_id: str | None
    position: int | None
    client_id: str | None
    user_id: str | None
    session_id: str | None
    application: str | None


# --------------------------------------------------------------------------- pure validation
def _opt_str(raw: Mapping[str, Any], key: str, max_len: int | None = 100) -> str | None:
    v = raw.get(key)
    if v is None:
        return None
    if type(v) is not str:
        raise UbiRejected(f"{key} must be a string, got {type(v).__name__}")
    if max_len is not None and len(v) > max_len:
        raise UbiRejected(f"{key} is longer than {max_len} characters")
    return v or None


_TS_CACHE: dict[str, datetime] = {}


def parse_ts(v: Any, *, now: datetime, required: bool) -> datetime | None:
    ts = _TS_CACHE.get(v) if type(v) is str else None  # a log repeats timestamps (a page's impressions share one)
    if ts is not None:
        if ts > now + MAX_FUTURE:
            raise UbiRejected(f"timestamp {ts.isoformat()} is in the future (more than {MAX_FUTURE} after {now.isoformat()})")
        return ts
    ts = _parse_ts(v, now=now, required=required)
    if ts is not None:
        if len(_TS_CACHE) > 100_000:
            _TS_CACHE.clear()
        _TS_CACHE[v] = ts
    return ts


def _parse_ts(v: Any, *, now: datetime, required: bool) -> datetime | None:
    if v is None:
        if required:
            raise UbiRejected("missing timestamp")
        return None
    if type(v) is not str:
        raise UbiRejected(f"timestamp must be an ISO 8601 string, got {type(v).__name__}")
    try:
        ts = datetime.fromisoformat(v.strip())
    except ValueError:
        raise UbiRejected(f"unparseable timestamp {v!r} (ISO 8601 expected)") from None
    ts = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)
    if ts > now + MAX_FUTURE:
        raise UbiRejected(f"timestamp {ts.isoformat()} is in the future (more than {MAX_FUTURE} after {now.isoformat()})")
    return ts


def _id_of(v: Any, key: str) -> str:
    if type(v) is str:
        if len(v) > 256:
            raise UbiRejected(f"{key} is longer than 256 characters")
        return v
    if type(v) is int:
        return str(v)
    raise UbiRejected(f"{key} must be a string or an integer, got {type(v).__name__}")


def derive_query_id(raw: Mapping[str, Any]) -> str:
    body = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    return "derived-" + hashlib.sha256(body.encode()).hexdigest()[:24]


def validate_query(raw: Any, *, now: datetime) -> UbiQuery:
    if type(raw) is not dict:
        raise UbiRejected(f"a query must be an object, got {type(raw).__name__}")
    uq = raw.get("user_query")
    if uq is None:
        raise UbiRejected("missing user_query")
    if type(uq) is not str:
        raise UbiRejected(f"user_query must be a string, got {type(uq).__name__}")
    qid = _opt_str(raw, "query_id")
    client = _opt_str(raw, "client_id")
    app = _opt_str(raw, "application")
    _opt_str(raw, "object_id_field")
    _opt_str(raw, "query_response_id", None)
    qa = raw.get("query_attributes")
    if qa is not None and type(qa) is not dict:
        raise UbiRejected("query_attributes must be an object")
    hits = raw.get("query_response_hit_ids")
    if hits is None:
        hit_ids: tuple[str, ...] = ()
    else:
        if type(hits) is not list:
            raise UbiRejected("query_response_hit_ids must be an array")
        for h in hits:
            if type(h) is not str:
                raise UbiRejected(f"query_response_hit_ids items must be strings, got {type(h).__name__}")
        hit_ids = tuple(hits)
    ts = parse_ts(raw.get("timestamp"), now=now, required=False)
    user = raw.get("user_id")  # not in the query schema (an additional property): the shop's user, when given
    user_id = user if type(user) is str and user else None
    return UbiQuery(qid or derive_query_id(raw), uq, ts, client, user_id, app, hit_ids)


_TS_REPR: dict[datetime, str] = {}


def derive_event_id(action: str, ts: datetime, query_id: str | None, object_id: str | None, position: int | None,
                    client_id: str | None, user_id: str | None, session_id: str | None) -> str:
    """Deterministic id of an event (UBI events carry none): the same event imported twice is one event."""
    t = _TS_REPR.get(ts)
    if t is None:  # a log repeats timestamps (a page's impressions share one): their text once
        if len(_TS_REPR) > 100_000:
            _TS_REPR.clear()
        t = _TS_REPR[ts] = repr(ts.timestamp())
    key = f"{action}\x1f{t}\x1f{query_id or ''}\x1f{object_id or ''}\x1f{'' if position is None else position}\x1f{client_id or ''}\x1f{user_id or ''}\x1f{session_id or ''}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


#: the top-level keys of an event that the fast path of :func:`validate_event` checks itself (any other key, or one of
#: these in an uncommon shape, sends the event through :func:`validate_event_checked`)
_FAST_KEYS = frozenset(("action_name", "timestamp", "query_id", "session_id", "client_id", "user_id", "application", "message_type",
                        "event_attributes"))
_FAST_ATTR_KEYS = frozenset(("object", "position"))
_FAST_OBJECT_KEYS = frozenset(("object_id", "object_id_field", "object_id_type"))
_FAST_POSITION_KEYS = frozenset(("ordinal",))


def validate_event(raw: Any, *, now: datetime) -> UbiEvent:
    """A UBI event as a :class:`UbiEvent`, or :class:`UbiRejected` with the reason.

    The common shape of an event (string fields of at most 100 characters or absent, an already seen timestamp,
    ``event_attributes`` with an ``object`` of a string ``object_id`` and an integer ``position.ordinal``) is checked
    here in a few operations; everything else (any other key, any value of another type or length, a new timestamp)
    goes through :func:`validate_event_checked`, the field-by-field check, which gives every rejection its reason.
    Both give the same answer on every record (a test compares them on mutations of every field)."""
    if type(raw) is not dict or not raw.keys() <= _FAST_KEYS:
        return validate_event_checked(raw, now=now)
    get = raw.get
    action, tsv = get("action_name"), get("timestamp")
    ts = _TS_CACHE.get(tsv) if type(tsv) is str else None
    if ts is None or type(action) is not str or len(action) > 100:
        return validate_event_checked(raw, now=now)
    if ts > now + MAX_FUTURE:
        return validate_event_checked(raw, now=now)
    qid, session, client, user, app, mtype = get("query_id"), get("session_id"), get("client_id"), get("user_id"), get("application"), get("message_type")
    if not (
        (qid is None or (type(qid) is str and len(qid) <= 100))
        and (session is None or (type(session) is str and len(session) <= 100))
        and (client is None or (type(client) is str and len(client) <= 100))
        and (user is None or (type(user) is str and len(user) <= 100))
        and (app is None or (type(app) is str and len(app) <= 100))
        and (mtype is None or (type(mtype) is str and len(mtype) <= 100))
    ):
        return validate_event_checked(raw, now=now)
    attrs = get("event_attributes")
    object_id = position = None
    if attrs is not None:
        if type(attrs) is not dict or not attrs.keys() <= _FAST_ATTR_KEYS:
            return validate_event_checked(raw, now=now)
        obj, pos = attrs.get("object"), attrs.get("position")
        if obj is not None:
            if type(obj) is not dict or not obj.keys() <= _FAST_OBJECT_KEYS:
                return validate_event_checked(raw, now=now)
            object_id, field, otype = obj.get("object_id"), obj.get("object_id_field"), obj.get("object_id_type")
            if (type(object_id) is not str or len(object_id) > 256 or (field is not None and (type(field) is not str or len(field) > 100))
                    or (otype is not None and (type(otype) is not str or len(otype) > 100))):
                return validate_event_checked(raw, now=now)
        if pos is not None:
            if type(pos) is not dict or pos.keys() != _FAST_POSITION_KEYS:
                return validate_event_checked(raw, now=now)
            position = pos["ordinal"]
            if type(position) is not int:
                return validate_event_checked(raw, now=now)
    qid, session, client, user, app = qid or None, session or None, client or None, user or None, app or None
    return UbiEvent(derive_event_id(action, ts, qid, object_id, position, client, user, session), action, ts, qid, object_id,
                    position, client, user, session, app)


def validate_event_checked(raw: Any, *, now: datetime) -> UbiEvent:
    """:func:`validate_event`, field by field: the reference check, and the one that names what is wrong."""
    if type(raw) is not dict:
        raise UbiRejected(f"an event must be an object, got {type(raw).__name__}")
    action = raw.get("action_name")
    if action is None:
        raise UbiRejected("missing action_name")
    if type(action) is not str:
        raise UbiRejected(f"action_name must be a string, got {type(action).__name__}")
    if len(action) > 100:
        raise UbiRejected("action_name is longer than 100 characters")
    ts = parse_ts(raw.get("timestamp"), now=now, required=True)
    assert ts is not None
    get = raw.get
    qid, session, client, user, app = get("query_id"), get("session_id"), get("client_id"), get("user_id"), get("application")
    # the common case in one pass: each of them absent or a short string
    ok = True
    for v in (qid, session, client, user, app, get("message_type")):
        if v is not None and (type(v) is not str or len(v) > 100):
            ok = False
            break
    if not ok:
        qid, session, client = _opt_str(raw, "query_id"), _opt_str(raw, "session_id"), _opt_str(raw, "client_id")
        user, app = _opt_str(raw, "user_id"), _opt_str(raw, "application")
        _opt_str(raw, "message_type")
    qid, session, client, user, app = qid or None, session or None, client or None, user or None, app or None
    if "message" in raw:
        _opt_str(raw, "message", 1024)
    if "user_query" in raw:
        _opt_str(raw, "user_query", None)
    attrs = raw.get("event_attributes")
    object_id: str | None = None
    position: int | None = None
    if attrs is not None:
        if type(attrs) is not dict:
            raise UbiRejected("event_attributes must be an object")
        obj = attrs.get("object")
        if obj is not None:
            if type(obj) is not dict:
                raise UbiRejected("event_attributes.object must be an object")
            if "object_id" not in obj:
                raise UbiRejected("event_attributes.object has no object_id")
            object_id = _id_of(obj["object_id"], "object_id")
            if "internal_id" in obj:
                _id_of(obj["internal_id"], "internal_id")
            for k in ("object_id_type", "object_id_field"):
                v = obj.get(k)
                if v is not None and (type(v) is not str or len(v) > 100):
                    raise UbiRejected(f"event_attributes.object.{k} must be a string of at most 100 characters")
        pos = attrs.get("position")
        if pos is not None:
            if type(pos) is not dict:
                raise UbiRejected("event_attributes.position must be an object")
            o = pos.get("ordinal")
            if o is not None:
                if type(o) is not int:
                    raise UbiRejected(f"position.ordinal must be an integer, got {type(o).__name__}")
                position = o
            xy = pos.get("xy")
            if xy is not None and (type(xy) is not dict or not all(isinstance(xy.get(k), (int, float)) and not isinstance(xy.get(k), bool) for k in ("x", "y"))):
                raise UbiRejected("position.xy must be an object with numbers x and y")
    return UbiEvent(derive_event_id(action, ts, qid, object_id, position, client, user, session), action, ts, qid, object_id,
                    position, client, user, session, app)


def kind_of(raw: Any) -> str:
    """``"event"`` for a record (a JSON object) with ``action_name``, else ``"query"`` (whose check rejects what is no
    object)."""
    return "event" if type(raw) is dict and "action_name" in raw else "query"


# --------------------------------------------------------------------------- files
@dataclass(frozen=True)
class Unreadable:
    reason: str


def ubi_files(path: str | Path) -> list[Path]:
    """The JSONL files of a UBI log: the file itself, or a folder's ``*.jsonl`` / ``*.ndjson`` (optionally
    ``.gz``), queries files first (so events find their query in the same import)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"UBI log {p} does not exist")
    files = [f for f in sorted(p.iterdir()) if f.is_file() and any(f.name.endswith(s) for s in (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz"))]
    if not files:
        raise ConfigError(f"UBI log folder {p} has no .jsonl or .jsonl.gz files")
    return sorted(files, key=lambda f: (0 if "quer" in f.name else 1, f.name))


def is_ubi_path(path: str | Path) -> bool:
    """A folder, or a JSONL file whose first record looks like UBI (``action_name`` or ``user_query``)."""
    p = Path(path)
    if p.is_dir():
        return True
    if not p.is_file() or not any(p.name.endswith(s) for s in (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return False
    for _n, rec in iter_jsonl(p):
        return isinstance(rec, dict) and ("action_name" in rec or "user_query" in rec)
    return False


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, object | Unreadable)`` for each non-blank line."""
    import orjson  # a dependency (the service renders with it); parses a UBI line ~4x faster than json

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as raw:  # type: ignore[operator]
            for n, line in enumerate(io.BufferedReader(raw, 1 << 20) if not isinstance(raw, io.BufferedReader) else raw, start=1):
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    if not line.strip():
                        continue
                    try:  # the stdlib's message names the column
                        json.loads(line)
                    except json.JSONDecodeError as e2:
                        yield n, Unreadable(f"invalid JSON: {e2.msg} at column {e2.colno}")
                    except UnicodeDecodeError:
                        yield n, Unreadable("invalid JSON: not UTF-8")
                    else:  # pragma: no cover - orjson is stricter than json (e.g. NaN)
                        yield n, Unreadable(f"invalid JSON: {e}")
                    continue
                yield n, obj if type(obj) is dict else Unreadable(f"expected a JSON object, got {type(obj).__name__}")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as e:
        raise ConfigError(f"cannot read UBI file {path}: {e}") from e


def iter_records(path: str | Path) -> Iterator[tuple[str, int, Any]]:
    """``(file name, line number, object | Unreadable)`` over every file of a UBI log."""
    for f in ubi_files(path):
        name = f.name  # a property that builds the string: once per file, not per line
        for n, rec in iter_jsonl(f):
            yield name, n, rec


def read_log(path: str | Path, *, now: datetime | None = None) -> tuple[list[UbiQuery], list[UbiEvent], list[tuple[str, int, str]]]:
    """Every valid query and event of a log (file or folder) in memory, and ``(file, line, reason)`` per bad line."""
    now = now or datetime.now(timezone.utc)
    queries: list[UbiQuery] = []
    events: list[UbiEvent] = []
    errors: list[tuple[str, int, str]] = []
    for fname, n, rec in iter_records(path):
        if isinstance(rec, Unreadable):
            errors.append((fname, n, rec.reason))
            continue
        try:
            if kind_of(rec) == "event":
                events.append(validate_event(rec, now=now))
            else:
                queries.append(validate_query(rec, now=now))
        except UbiRejected as e:
            errors.append((fname, n, str(e)))
    return queries, events, errors

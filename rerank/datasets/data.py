"""Readers for the evaluation formats of ``../shared/data``.

* queries: TSV with a header ``query_id<TAB>query<TAB>user_id`` (``user_id`` may be empty or absent).
* qrels: TREC ``query_id 0 doc_id grade`` (whitespace separated; integer or float grades).
* events: CSV ``user_id,product_id,event,timestamp`` (only the users and their products are needed
  here: the history store of ``rerank.history`` owns the real import).

A bad line becomes a :class:`LineError` (file, line number, reason) and reading goes on; a file that
cannot be read at all raises :class:`~indexing.errors.CatalogError` naming it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from indexing.errors import CatalogError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    user_id: str | None = None


@dataclass(frozen=True)
class LineError:
    path: str
    line: int
    reason: str


@dataclass(frozen=True)
class QuerySet:
    queries: tuple[Query, ...]
    errors: tuple[LineError, ...] = ()

    def by_id(self) -> dict[str, Query]:
        return {q.id: q for q in self.queries}


@dataclass(frozen=True)
class Qrels:
    """``grades[query_id][doc_id] = grade`` (raw grades; the gain mapping is applied by the metrics)."""

    grades: Mapping[str, Mapping[str, float]]
    errors: tuple[LineError, ...] = ()

    def for_query(self, query_id: str) -> Mapping[str, float]:
        return self.grades.get(query_id, {})


@dataclass(frozen=True)
class EventSet:
    """The users of an events file and the products each interacted with (in file order)."""

    products_by_user: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    events: int = 0
    errors: tuple[LineError, ...] = ()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise CatalogError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()


def _open(path: str | Path, what: str):
    p = Path(path)
    if not p.is_file():
        raise CatalogError(f"{what} file not found: {p}")
    try:
        return open(p, encoding="utf-8", newline="")
    except OSError as e:
        raise CatalogError(f"cannot read {what} file {p}: {e.strerror or e}") from None


def read_queries(path: str | Path) -> QuerySet:
    """Read a queries TSV; duplicate ids, empty ids and empty query texts are recorded as errors."""
    errors: list[LineError] = []
    out: list[Query] = []
    seen: set[str] = set()
    with _open(path, "queries") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise CatalogError(f"queries file {path} is empty")
        cols = [c.strip().lower() for c in header]
        if "query_id" not in cols or "query" not in cols:
            raise CatalogError(f"queries file {path}: header must name query_id and query (and optionally user_id), got {header}")
        i_id, i_q = cols.index("query_id"), cols.index("query")
        i_u = cols.index("user_id") if "user_id" in cols else None
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) <= max(i_id, i_q):
                errors.append(LineError(str(path), lineno, f"expected at least {max(i_id, i_q) + 1} columns, got {len(row)}"))
                continue
            qid, text = row[i_id].strip(), row[i_q].strip()
            user = row[i_u].strip() if i_u is not None and i_u < len(row) else ""
            if not qid:
                errors.append(LineError(str(path), lineno, "empty query_id"))
            elif qid in seen:
                errors.append(LineError(str(path), lineno, f"duplicate query_id {qid!r}"))
            elif not text:
                errors.append(LineError(str(path), lineno, f"query {qid!r} has an empty text"))
            else:
                seen.add(qid)
                out.append(Query(qid, text, user or None))
    if errors:
        log.warning("%s: %d bad lines (first: line %d: %s)", path, len(errors), errors[0].line, errors[0].reason)
    return QuerySet(tuple(out), tuple(errors))


def read_qrels(path: str | Path) -> Qrels:
    """Read TREC qrels (``qid iter docid grade``); a repeated (qid, docid) keeps the last grade, as trec_eval."""
    errors: list[LineError] = []
    grades: dict[str, dict[str, float]] = {}
    with _open(path, "qrels") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                errors.append(LineError(str(path), lineno, f"expected 4 columns 'query_id iter doc_id grade', got {len(parts)}"))
                continue
            qid, _, doc, g = parts
            try:
                grade = float(g)
            except ValueError:
                errors.append(LineError(str(path), lineno, f"grade {g!r} is not a number"))
                continue
            if not math.isfinite(grade):
                errors.append(LineError(str(path), lineno, f"grade {g!r} is not finite"))
                continue
            grades.setdefault(qid, {})[doc] = grade
    if errors:
        log.warning("%s: %d bad lines (first: line %d: %s)", path, len(errors), errors[0].line, errors[0].reason)
    return Qrels(grades, tuple(errors))


def read_event_users(path: str | Path) -> EventSet:
    """Users and their interacted products from an events CSV (``user_id,product_id,event,timestamp``)."""
    errors: list[LineError] = []
    by_user: dict[str, list[str]] = {}
    n = 0
    with _open(path, "events") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "user_id" not in reader.fieldnames or "product_id" not in reader.fieldnames:
            raise CatalogError(f"events file {path}: header must name user_id and product_id, got {reader.fieldnames}")
        for lineno, row in enumerate(reader, start=2):
            u, p = (row.get("user_id") or "").strip(), (row.get("product_id") or "").strip()
            if not u or not p:
                errors.append(LineError(str(path), lineno, "missing user_id or product_id"))
                continue
            by_user.setdefault(u, []).append(p)
            n += 1
    return EventSet({u: tuple(ps) for u, ps in by_user.items()}, n, tuple(errors))

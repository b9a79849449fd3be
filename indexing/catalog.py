"""Catalog readers: CSV, JSONL and Parquet files -> validated :class:`Product` records or :class:`RowError`\\ s.

A :class:`FieldMap` says which column is the id, the title, the description, the brand, the category
(several columns joined into a path ``"A > B > C"``), the attributes (several columns joined into
text), price, rating, popularity, the image reference, and which columns feed the keyword fields
(article type, colour, gender, usage, season, year). Presets: ``fashion`` and ``homedepot`` (the data in
``../shared/data``); without a map one is detected from the header (a preset when the header fits,
else a generic map that needs an id and a title column).

Rows are numbered from 0 (data rows; the CSV header and blank lines are not rows). A bad row becomes a
:class:`RowError` with its row number and a reason whose kind comes before the first ``:`` (``missing
id``, ``duplicate id``, ``text too long``, ``non-numeric price``, ``malformed JSON``, ``wrong column
count``, ``image``...), and reading goes on. Only a file that cannot be read at all raises
:class:`~indexing.errors.CatalogError`.

:func:`read_catalog` reads a row range ``[start, stop)`` (what a Celery batch does) without touching
image files; image references are only checked for their form (no path leaving the images root, no
URL scheme other than http/https). :func:`scan_catalog` is one cheap pass over the ids that counts the
rows and finds duplicate ids across the whole file, so that a job can be planned in row ranges. CSV
and JSONL readers remember byte offsets every :data:`CHECKPOINT_EVERY` rows (per process and file
version), so reading a late range after a scan seeks instead of re-parsing the file.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import sys
import threading
import unicodedata
from dataclasses import dataclass, field, fields as dc_fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from indexing import fields as F
from indexing.errors import CatalogError, ImageError, MissingDependencyError
from indexing.images import check_image_ref
from indexing.registry import Registry

log = logging.getLogger(__name__)

#: default limit on the characters of one text field (title, description, category, attributes, brand)
DEFAULT_MAX_TEXT_CHARS = 20_000
#: OpenSearch refuses document ids longer than 512 bytes
MAX_ID_BYTES = 512
#: limit on the characters of an image reference (path or URL); longer ones are a row error
MAX_IMAGE_REF_CHARS = 4096
#: the CSV/JSONL readers remember the byte offset of every N-th row
CHECKPOINT_EVERY = 1024
#: a CSV record longer than this is malformed (typically an unterminated quote swallowing the file)
MAX_RECORD_BYTES = 16 * 1024 * 1024
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
#: document fields a keyword column may feed (year is numeric: parsed as an integer)
KEYWORD_TARGETS = (F.ARTICLE_TYPE, F.COLOUR, F.GENDER, F.USAGE, F.SEASON, F.YEAR)
CATEGORY_SEP = " > "


# ----------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Product:
    """One valid catalog row. ``fields`` holds document fields (names from :mod:`indexing.fields`), only those present."""

    id: str
    row: int
    fields: dict[str, Any]
    image: str | None = None  # the reference as given (path under the images root, or URL)


@dataclass(frozen=True)
class RowError:
    """One bad row: its 0-based data-row number, its id when known, and why it was refused."""

    row: int
    id: str | None
    reason: str

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0].strip()


@dataclass(frozen=True)
class FieldMap:
    """Which catalog column feeds which document field. Column names are matched exactly."""

    id: str
    title: str
    description: str | None = None
    brand: str | None = None
    category: tuple[str, ...] = ()  # joined into "A > B > C"
    attributes: tuple[str, ...] = ()  # joined into space-separated text
    price: str | None = None
    rating: str | None = None
    popularity: str | None = None
    image: str | None = None
    keywords: tuple[tuple[str, str], ...] = ()  # (document field, column), document field in KEYWORD_TARGETS
    name: str = "custom"

    def __post_init__(self) -> None:
        for attr in ("category", "attributes"):
            v = getattr(self, attr)
            if isinstance(v, str):
                v = (v,)
            object.__setattr__(self, attr, tuple(v))
        kw = self.keywords
        if isinstance(kw, Mapping):
            kw = tuple(kw.items())
        kw = tuple((str(f), str(c)) for f, c in kw)
        for f, _ in kw:
            if f not in KEYWORD_TARGETS:
                raise CatalogError(f"field map {self.name!r}: {f!r} is not a keyword field; valid: {', '.join(KEYWORD_TARGETS)}")
        if len({f for f, _ in kw}) != len(kw):
            raise CatalogError(f"field map {self.name!r}: a keyword field is mapped twice")
        object.__setattr__(self, "keywords", kw)
        if not self.id or not self.title:
            raise CatalogError("a field map needs an id column and a title column")

    def columns(self) -> list[str]:
        """Every column this map reads, without repeats, in a stable order."""
        cols: list[str] = [self.id, self.title]
        for c in (self.description, self.brand, *self.category, *self.attributes, self.price, self.rating, self.popularity, self.image):
            if c:
                cols.append(c)
        cols.extend(c for _, c in self.keywords)
        return list(dict.fromkeys(cols))

    def missing_columns(self, header: Iterable[str]) -> list[str]:
        have = set(header)
        return [c for c in self.columns() if c not in have]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dc_fields(self)}
        d["category"], d["attributes"] = list(self.category), list(self.attributes)
        d["keywords"] = dict(self.keywords)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FieldMap":
        unknown = set(d) - {f.name for f in dc_fields(cls)}
        if unknown:
            raise CatalogError(f"unknown field map keys: {', '.join(sorted(unknown))}")
        return cls(**dict(d))


@dataclass(frozen=True)
class CatalogScan:
    """One pass over the ids: rows in the file, rows whose id appeared earlier, the field map in use."""

    rows: int
    duplicate_rows: frozenset[int]
    field_map: FieldMap
    format: str = "csv"
    missing_id_rows: frozenset[int] = field(default_factory=frozenset)


# ----------------------------------------------------------------------------------------- presets

FIELD_MAPS: Registry[FieldMap] = Registry("catalog preset")

FASHION = FieldMap(
    name="fashion",
    id="product_id",
    title="title",
    category=("master_category", "sub_category", "article_type"),
    attributes=("base_colour", "gender", "usage", "season"),
    image="image",
    keywords=(
        (F.ARTICLE_TYPE, "article_type"),
        (F.COLOUR, "base_colour"),
        (F.GENDER, "gender"),
        (F.USAGE, "usage"),
        (F.SEASON, "season"),
        (F.YEAR, "year"),
    ),
)
HOMEDEPOT = FieldMap(name="homedepot", id="product_id", title="title")
FIELD_MAPS.register("fashion")(lambda: FASHION)
FIELD_MAPS.register("homedepot")(lambda: HOMEDEPOT)

_GENERIC_CANDIDATES: dict[str, tuple[str, ...]] = {
    "id": ("product_id", "id", "sku", "item_id", "product_uid", "asin", "uid"),
    "title": ("title", "name", "product_title", "product_name"),
    "description": ("description", "product_description", "desc", "body"),
    "brand": ("brand", "manufacturer", "vendor"),
    "category": ("category", "category_path", "categories", "product_type"),
    "price": ("price", "sale_price", "list_price"),
    "rating": ("rating", "average_rating", "stars"),
    "popularity": ("popularity", "sales", "num_reviews", "review_count"),
    "image": ("image", "image_url", "image_path", "img", "picture"),
}
_GENERIC_KEYWORDS: dict[str, tuple[str, ...]] = {
    F.ARTICLE_TYPE: ("article_type",),
    F.COLOUR: ("colour", "color", "base_colour", "base_color"),
    F.GENDER: ("gender",),
    F.USAGE: ("usage",),
    F.SEASON: ("season",),
    F.YEAR: ("year",),
}


def preset_field_map(name: str) -> FieldMap:
    """The field map of preset ``name`` (``fashion``, ``homedepot``); unknown names list the valid ones."""
    return FIELD_MAPS.create(name)


def preset_names() -> list[str]:
    return FIELD_MAPS.names()


def detect_field_map(columns: Sequence[str]) -> FieldMap:
    """A preset when the header fits one, else a generic map; no id or title column is a CatalogError."""
    cols = list(columns)
    if not FASHION.missing_columns(cols):
        return FASHION
    if set(cols) == set(HOMEDEPOT.columns()):
        return HOMEDEPOT
    lower = {c.lower().strip(): c for c in cols}

    def pick(cands: tuple[str, ...]) -> str | None:
        return next((lower[c] for c in cands if c in lower), None)

    found = {k: pick(v) for k, v in _GENERIC_CANDIDATES.items()}
    if not found["id"] or not found["title"]:
        need = [k for k in ("id", "title") if not found[k]]
        raise CatalogError(
            f"cannot tell the {' and '.join(need)} column from the header {cols}; expected one of "
            + "; ".join(f"{k}: {', '.join(_GENERIC_CANDIDATES[k])}" for k in need)
            + " (or pass a field map / preset)"
        )
    kw = tuple((f, c) for f, cands in _GENERIC_KEYWORDS.items() if (c := pick(cands)))
    category = (found["category"],) if found["category"] else ()
    return FieldMap(
        name="generic",
        id=found["id"],
        title=found["title"],
        description=found["description"],
        brand=found["brand"],
        category=category,
        price=found["price"],
        rating=found["rating"],
        popularity=found["popularity"],
        image=found["image"],
        keywords=kw,
    )


# ----------------------------------------------------------------------------------------- sources

_Checkpoints = dict[tuple[str, int, int], list[int]]
_CHECKPOINTS: _Checkpoints = {}
_CK_LOCK = threading.Lock()
_SURROGATE = re.compile("[\udc80-\udcff]")


def catalog_format(path: Path | str) -> str:
    """``csv`` | ``jsonl`` | ``parquet`` from the file extension; anything else is a CatalogError."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise CatalogError(f"catalog {str(path)!r}: unsupported file type {ext or '(none)'!r}; supported: {', '.join(sorted(FORMATS))}")
    return FORMATS[ext]


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


class _LineSource:
    """Byte-offset-aware line reading shared by CSV and JSONL, with per-file checkpoints."""

    def __init__(self, path: Path):
        self.path = path
        self.key = _file_key(path)

    def checkpoints(self) -> list[int]:
        with _CK_LOCK:
            return _CHECKPOINTS.setdefault(self.key, [])

    def note(self, row: int, offset: int) -> None:
        """Remember that data row ``row`` starts at byte ``offset`` (every CHECKPOINT_EVERY-th row)."""
        if row % CHECKPOINT_EVERY:
            return
        with _CK_LOCK:
            ck = _CHECKPOINTS.setdefault(self.key, [])
            if len(ck) == row // CHECKPOINT_EVERY:
                ck.append(offset)

    def seek_point(self, start: int) -> tuple[int, int] | None:
        """``(row, offset)`` of the last checkpoint at or before ``start``, if any."""
        ck = self.checkpoints()
        if not ck:
            return None
        k = min(start // CHECKPOINT_EVERY, len(ck) - 1)
        return k * CHECKPOINT_EVERY, ck[k]


class _RecordTooLong(Exception):
    pass


class _Lines:
    """Iterate decoded lines from a byte offset, tracking offsets; a record longer than ``limit`` bytes stops it."""

    def __init__(self, f, offset: int, limit: int | None = None):
        f.seek(offset)
        self.f, self.pos, self.start, self.limit = f, offset, offset, limit
        self.record_start = offset

    def __iter__(self) -> Iterator[str]:
        for raw in self.f:
            self.start = self.pos  # offset of the line just yielded
            self.pos += len(raw)
            if self.limit is not None and self.pos - self.record_start > self.limit:
                raise _RecordTooLong(f"a record runs over {self.limit} bytes (an unterminated quote?)")
            yield raw.decode("utf-8", "surrogateescape")


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise CatalogError(f"catalog {str(path)!r} cannot be opened: {e.strerror or e}") from None


def _ensure_csv_field_limit() -> None:
    # our own max_text_chars decides what is too long; csv's 128 KiB limit would abort the whole file
    if csv.field_size_limit() < 1 << 26:
        csv.field_size_limit(min(sys.maxsize, 1 << 30))


def _csv_header(path: Path) -> tuple[list[str], int]:
    """The header fields and the byte offset of the first data row."""
    _ensure_csv_field_limit()
    with _open(path) as f:
        lines = _Lines(f, 0)
        try:
            header = next(csv.reader(iter(lines)), None)
        except csv.Error as e:
            raise CatalogError(f"catalog {str(path)!r}: the CSV header cannot be parsed: {e}") from None
        if not header:
            raise CatalogError(f"catalog {str(path)!r} is empty (no header row)")
        if header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]
        header = [h.strip() for h in header]
        if _SURROGATE.search("".join(header)):
            raise CatalogError(f"catalog {str(path)!r}: the header is not valid UTF-8")
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise CatalogError(f"catalog {str(path)!r}: duplicate column names in the header: {', '.join(dup)}")
        return header, lines.pos


def _csv_records(path: Path, header: list[str], data_offset: int, start: int, stop: int | None) -> Iterator[tuple[int, Any]]:
    """``(row, dict | RowError)`` for data rows in ``[start, stop)``.

    The reader is strict about quoting; a malformed record (or one longer than MAX_RECORD_BYTES) becomes
    one RowError and reading resumes on the physical line after the record's first line.
    """
    src = _LineSource(path)
    row, offset = 0, data_offset
    sp = src.seek_point(start)
    if sp is not None and sp[0] > 0:
        row, offset = sp
    width = len(header)
    with _open(path) as f:
        while True:
            lines = _Lines(f, offset, MAX_RECORD_BYTES)
            reader = csv.reader(iter(lines), strict=True)
            while True:
                if stop is not None and row >= stop:
                    return
                row_start = lines.record_start = lines.pos
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except (csv.Error, _RecordTooLong) as e:
                    src.note(row, row_start)
                    if row >= start:
                        yield row, RowError(row, None, f"malformed CSV: {e}")
                    row += 1
                    f.seek(row_start)
                    f.readline()
                    offset = f.tell()
                    break  # resynchronize on the next physical line
                if not values:  # a blank line is not a row
                    continue
                src.note(row, row_start)
                if row >= start:
                    if len(values) != width:
                        yield row, RowError(row, None, f"wrong column count: expected {width} fields, got {len(values)}")
                    elif any(_SURROGATE.search(v) for v in values):
                        yield row, RowError(row, None, "encoding: the row is not valid UTF-8")
                    else:
                        yield row, dict(zip(header, values))
                row += 1


def _jsonl_records(path: Path, start: int, stop: int | None) -> Iterator[tuple[int, Any]]:
    src = _LineSource(path)
    row, offset = 0, 0
    sp = src.seek_point(start)
    if sp is not None:
        row, offset = sp
    with _open(path) as f:
        lines = _Lines(f, offset)
        for line in lines:
            if stop is not None and row >= stop:
                return
            if not line.strip():
                continue
            src.note(row, lines.start)
            if row >= start:
                if _SURROGATE.search(line):
                    yield row, RowError(row, None, "encoding: the line is not valid UTF-8")
                else:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield row, RowError(row, None, f"malformed JSON: {e.msg} at column {e.colno}")
                    else:
                        if isinstance(obj, dict):
                            yield row, obj
                        else:
                            yield row, RowError(row, None, f"malformed JSON: the line is a {type(obj).__name__}, not an object")
            row += 1


def _jsonl_keys(path: Path, probe: int = 100) -> list[str]:
    keys: dict[str, None] = {}
    for _, rec in _jsonl_records(path, 0, probe):
        if isinstance(rec, dict):
            keys.update(dict.fromkeys(rec))
    return list(keys)


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("reading Parquet catalogs needs pyarrow; install pyarrow") from None
    try:
        return pq.ParquetFile(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise CatalogError(f"catalog {str(path)!r} is not a readable Parquet file: {e}") from None


def _parquet_records(path: Path, columns: list[str], start: int, stop: int | None) -> Iterator[tuple[int, Any]]:
    pf = _parquet_file(path)
    md = pf.metadata
    total = md.num_rows
    stop = total if stop is None else min(stop, total)
    first = 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        lo, hi = first, first + n
        first = hi
        if hi <= start or lo >= stop:
            continue
        try:
            table = pf.read_row_group(g, columns=columns)
        except Exception as e:  # noqa: BLE001
            raise CatalogError(f"catalog {str(path)!r}: row group {g} cannot be read: {e}") from None
        a, b = max(start, lo) - lo, min(stop, hi) - lo
        for i, rec in enumerate(table.slice(a, b - a).to_pylist()):
            yield lo + a + i, rec


# ----------------------------------------------------------------------------------------- values

_WS = re.compile(r"\s+")


def _text(v: Any, *, sep: str = " ") -> str:
    """A cell as normalized text: NFC, whitespace collapsed, stripped; lists joined; None/NaN -> ''."""
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    if isinstance(v, (list, tuple)):
        return sep.join(t for t in (_text(x) for x in v) if t)
    if isinstance(v, dict):
        return " ".join(f"{_text(k)} {_text(x)}".strip() for k, x in v.items())
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = v if isinstance(v, str) else str(v)
    return _WS.sub(" ", unicodedata.normalize("NFC", s)).strip()


class _Bad(Exception):
    """A per-row problem; becomes a RowError."""


def _number(v: Any, name: str, *, nonneg: bool = False) -> float | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, bool):
        raise _Bad(f"non-numeric {name}: {v!r}")
    if isinstance(v, (int, float)):
        x = float(v)
    else:
        s = _text(v)
        try:
            x = float(s)
        except ValueError:
            raise _Bad(f"non-numeric {name}: {s[:60]!r}") from None
    if math.isnan(x) and not isinstance(v, str):
        return None  # a Parquet/JSON null-ish NaN is a missing value
    if not math.isfinite(x):
        raise _Bad(f"non-numeric {name}: {v!r} is not a finite number")
    if nonneg and x < 0:
        raise _Bad(f"negative {name}: {x:g}")
    return x


def _year(v: Any) -> int | None:
    x = _number(v, "year")
    if x is None:
        return None
    if not x.is_integer():
        raise _Bad(f"non-numeric year: {v!r} is not a whole number")
    return int(x)


def _to_product(
    row: int,
    rec: Mapping[str, Any],
    fm: FieldMap,
    seen: dict[str, int],
    duplicate_rows: frozenset[int],
    max_text_chars: int,
    images_root: Path | None,
) -> Product | RowError:
    pid = _text(rec.get(fm.id))
    if not pid:
        return RowError(row, None, "missing id")
    if len(pid.encode("utf-8")) > MAX_ID_BYTES:
        return RowError(row, pid[:64], f"id too long: {len(pid.encode('utf-8'))} bytes (limit {MAX_ID_BYTES})")
    first = seen.get(pid)
    if first is not None:
        return RowError(row, pid, f"duplicate id: {pid!r} first seen at row {first}")
    seen[pid] = row
    if row in duplicate_rows:
        return RowError(row, pid, f"duplicate id: {pid!r} appears earlier in the catalog")
    try:
        out: dict[str, Any] = {}
        texts = {
            F.TITLE: _text(rec.get(fm.title)),
            F.DESCRIPTION: _text(rec.get(fm.description)) if fm.description else "",
            F.BRAND: _text(rec.get(fm.brand)) if fm.brand else "",
            F.CATEGORY: CATEGORY_SEP.join(t for t in (_text(rec.get(c), sep=CATEGORY_SEP) for c in fm.category) if t),
            F.ATTRIBUTES: " ".join(t for t in (_text(rec.get(c)) for c in fm.attributes) if t),
        }
        for name, value in texts.items():
            if len(value) > max_text_chars:
                raise _Bad(f"text too long: {name} has {len(value)} characters (limit {max_text_chars})")
            if value:
                out[name] = value
        if F.TITLE not in out:
            raise _Bad(f"missing title: column {fm.title!r} is empty")
        for target, col in fm.keywords:
            if target == F.YEAR:
                y = _year(rec.get(col))
                if y is not None:
                    out[F.YEAR] = y
                continue
            value = _text(rec.get(col))
            if len(value) > max_text_chars:
                raise _Bad(f"text too long: {target} has {len(value)} characters (limit {max_text_chars})")
            if value:
                out[target] = value
        for target, col, nonneg in ((F.PRICE, fm.price, True), (F.RATING, fm.rating, False), (F.POPULARITY, fm.popularity, False)):
            if col:
                x = _number(rec.get(col), target, nonneg=nonneg)
                if x is not None:
                    out[target] = x
        image = _text(rec.get(fm.image)) if fm.image else ""
        if image:
            if len(image) > MAX_IMAGE_REF_CHARS:
                raise _Bad(f"image: reference too long ({len(image)} characters, limit {MAX_IMAGE_REF_CHARS})")
            try:
                check_image_ref(image, images_root)
            except ImageError as e:
                raise _Bad(f"image: {e}") from None
    except _Bad as e:
        return RowError(row, pid, str(e))
    return Product(id=pid, row=row, fields=out, image=image or None)


# ----------------------------------------------------------------------------------------- API


def _prepare(path: Path | str, field_map: FieldMap | str | None) -> tuple[Path, str, FieldMap, dict[str, Any]]:
    p = Path(path)
    fmt = catalog_format(p)
    if not p.is_file():
        raise CatalogError(f"catalog {str(p)!r} does not exist" if not p.exists() else f"catalog {str(p)!r} is not a file")
    extra: dict[str, Any] = {}
    if fmt == "csv":
        header, data_offset = _csv_header(p)
        extra.update(header=header, data_offset=data_offset)
        columns: list[str] | None = header
    elif fmt == "parquet":
        columns = list(_parquet_file(p).schema_arrow.names)
    else:
        columns = None  # JSONL: absent keys are missing values
    if isinstance(field_map, str):
        fm = preset_field_map(field_map)
    elif field_map is None:
        fm = detect_field_map(columns if columns is not None else _jsonl_keys(p))
    else:
        fm = field_map
    if columns is not None:
        missing = fm.missing_columns(columns)
        if missing:
            raise CatalogError(f"catalog {str(p)!r} lacks the column(s) {', '.join(missing)} that field map {fm.name!r} reads")
        extra["columns"] = fm.columns()
    return p, fmt, fm, extra


def _records(p: Path, fmt: str, extra: dict[str, Any], start: int, stop: int | None) -> Iterator[tuple[int, Any]]:
    if fmt == "csv":
        return _csv_records(p, extra["header"], extra["data_offset"], start, stop)
    if fmt == "parquet":
        return _parquet_records(p, extra["columns"], start, stop)
    return _jsonl_records(p, start, stop)


def read_catalog(
    path: Path | str,
    *,
    field_map: FieldMap | str | None = None,
    images_root: Path | str | None = None,
    start: int = 0,
    stop: int | None = None,
    duplicate_rows: Iterable[int] = frozenset(),
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
) -> Iterator[Product | RowError]:
    """Products (and RowErrors) of data rows ``[start, stop)``, in file order.

    ``field_map``: a FieldMap, a preset name, or None (detect from the header). ``duplicate_rows``: rows
    known (from :func:`scan_catalog`) to repeat an earlier id; duplicates within the range read are found
    here too. Image references are checked for their form only; the files are not opened.
    The file is opened and its header checked now (CatalogError), rows are read lazily.
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative integer, got {start!r}")
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop < start):
        raise ValueError(f"stop must be None or an integer >= start ({start}), got {stop!r}")
    if max_text_chars <= 0:
        raise ValueError(f"max_text_chars must be positive, got {max_text_chars!r}")
    p, fmt, fm, extra = _prepare(path, field_map)
    dups = frozenset(duplicate_rows)
    root = Path(images_root) if images_root is not None else None

    def gen() -> Iterator[Product | RowError]:
        seen: dict[str, int] = {}
        for row, rec in _records(p, fmt, extra, start, stop):
            if isinstance(rec, RowError):
                yield rec
            else:
                yield _to_product(row, rec, fm, seen, dups, max_text_chars, root)

    return gen()


def scan_catalog(path: Path | str, field_map: FieldMap | str | None = None) -> CatalogScan:
    """Count the data rows and find the rows whose id repeats an earlier one (ids only, no validation)."""
    p, fmt, fm, extra = _prepare(path, field_map)
    seen: set[str] = set()
    dups: set[int] = set()
    missing: set[int] = set()
    rows = 0
    if fmt == "parquet":
        pf = _parquet_file(p)
        rows = pf.metadata.num_rows
        ids = (
            _text(v)
            for batch in pf.iter_batches(columns=[fm.id], batch_size=65536)
            for v in batch.column(0).to_pylist()
        )
        items: Iterable[tuple[int, str | None]] = enumerate(ids)
    else:

        def items_gen() -> Iterator[tuple[int, str | None]]:
            for row, rec in _records(p, fmt, extra, 0, None):
                yield row, (None if isinstance(rec, RowError) else _text(rec.get(fm.id)))

        items = items_gen()
    for row, pid in items:
        rows = max(rows, row + 1)
        if not pid:
            missing.add(row)
        elif pid in seen:
            dups.add(row)
        else:
            seen.add(pid)
    log.info("scanned %s: %d rows, %d duplicate ids, %d without id", p, rows, len(dups), len(missing))
    return CatalogScan(rows=rows, duplicate_rows=frozenset(dups), field_map=fm, format=fmt, missing_id_rows=frozenset(missing))


def catalog_columns(path: Path | str) -> list[str]:
    """The columns of a CSV/Parquet catalog, or the keys of a JSONL catalog's first objects."""
    p = Path(path)
    fmt = catalog_format(p)
    if not p.is_file():
        raise CatalogError(f"catalog {str(p)!r} does not exist")
    if fmt == "csv":
        return _csv_header(p)[0]
    if fmt == "parquet":
        return list(_parquet_file(p).schema_arrow.names)
    return _jsonl_keys(p)


__all__ = [
    "CatalogScan",
    "FieldMap",
    "FIELD_MAPS",
    "Product",
    "RowError",
    "catalog_columns",
    "catalog_format",
    "detect_field_map",
    "preset_field_map",
    "preset_names",
    "read_catalog",
    "scan_catalog",
]
